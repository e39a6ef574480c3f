"""What the benchmark scripts share: writing a results file pair (strict JSON + a markdown table) and a ``main``
that ends in one line on a :class:`~edgetrain.errors.ConfigError`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetrain.errors import ConfigError


def write_report(json_path: Path, result: dict[str, Any], md_path: Path, lines: list[str]) -> None:
    """``result`` as strict JSON (NaN as null) and ``lines`` as the markdown table; prints both paths."""
    from edgetrain.run import finite

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
    md_path.write_text("\n".join(lines) + "\n")
    print(json_path)
    print(md_path)


def run_main(main: Callable[[], int], who: str) -> None:
    """``sys.exit(main())``; a ConfigError is one line ``who: message`` and exit status 2."""
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"{who}: {e}", file=sys.stderr)
        sys.exit(2)
