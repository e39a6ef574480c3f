"""The tiny base every technique config shares: targets and serialisation.

A technique is plain data: a frozen, keyword-only dataclass whose fields are validated in
``__post_init__``. Behaviour (``apply``, ``estimate``, capability metadata) is registered separately in
:mod:`edgetrain.registry`, so configs can be written, compared, saved and planned without touching torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from edgetrain.errors import ConfigError


def _as_patterns(value: str | Sequence[str] | None, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field}: expected a glob string or a list of glob strings, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Technique:
    """Base of all technique configs.

    Args:
        targets: glob patterns over qualified module names (``"features.1[5-8].*"``, ``"classifier.*"``)
            selecting the layers the technique acts on. ``None`` means the technique's own default
            (documented on each technique) or the recipe's default targets.
    """

    name: ClassVar[str] = ""  # registry key, set by each subclass ("freeze", "bias_only", ...)

    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _as_patterns(self.targets, f"{type(self).__name__}.targets"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"type": name, **fields}`` (tuples become lists)."""
        out: dict[str, Any] = {"type": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes: Any) -> Technique:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def check(cond: bool, cls: type, field: str, msg: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``cls.field`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{cls.__name__}.{field}: {msg}")
