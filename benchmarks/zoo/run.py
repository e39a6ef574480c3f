"""Every registered technique on the foreign zoo (edgetrain.testing.zoo): works or refuses, and what it saves.

For each zoo model and each technique (the config of ``edgetrain.testing.zoo.zoo_configs``), at batch 4:

* ``outcome``: ``works`` or ``refused`` with its one-line ``reason``;
* ``plain_saved`` / ``saved``: bytes saved for backward in one training forward (the meter's saved-tensor hooks);
* ``plain_peak`` / ``peak``: the meter's measured peak of a full training step (``et.measure``, SGD momentum);
* ``estimate``: the cost model's saved bytes (``None`` without a cost model);
* ``grad_cosine`` / ``grad_error``: one step's gradients against plain PyTorch with the same trainable set;
* ``restored``: ``remove()`` gave back parameters, flags, hooks and outputs.

Writes ``<out>/zoo-<name>.json`` (provenance + rows) and ``.md`` (the table of docs/techniques.md).

    OMP_NUM_THREADS=1 python benchmarks/zoo/run.py --out benchmarks/results --name 2026-12-01
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings

import torch

import edgetrain as et
from edgetrain.bench import provenance, result_paths
from edgetrain.structure import analyze
from edgetrain.testing.zoo import ZOO, available, evaluate, zoo_configs


def _kib(n: float | None) -> str:
    return "" if n is None else f"{n / 1024:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | technique | outcome | saved KiB (plain) | saved ×plain | peak KiB (plain) | peak ×plain | "
             "estimate = meter | grad cosine |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r["outcome"] == "refused":
            lines.append(f"| {r['model']} | {r['technique']} | refused: {r['reason']} | | | | | | |")
            continue
        est = "n/a" if r["estimate"] is None else ("yes" if r["estimate"] == r["saved"] else
                                                   f"{r['estimate'] / r['saved']:.3f}x")
        lines.append(f"| {r['model']} | {r['technique']} | works | {_kib(r['saved'])} ({_kib(r['plain_saved'])}) | "
                     f"{r['saved'] / r['plain_saved']:.3f} | {_kib(r['peak'])} ({_kib(r['plain_peak'])}) | "
                     f"{r['peak'] / r['plain_peak']:.3f} | {est} | {r['grad_cosine']:.4f} |")
    return "\n".join(lines)


def matrix(rows: list[dict]) -> str:
    """Technique x model: ``saved ×plain / peak ×plain``, or ``refused`` (docs/techniques.md)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    techniques = list(dict.fromkeys(r["technique"] for r in rows))
    cell = {(r["technique"], r["model"]): r for r in rows}
    lines = ["| technique | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for t in techniques:
        out = []
        for m in models:
            r = cell[(t, m)]
            out.append("refused" if r["outcome"] == "refused" else
                       f"{r['saved'] / r['plain_saved']:.3f} / {r['peak'] / r['plain_peak']:.2f}")
        lines.append(f"| {t} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", required=True)
    p.add_argument("--models", nargs="*", default=None, help="zoo entries (default: all installed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="overwrite existing results of this name")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    paths = result_paths(args.out, f"zoo-{args.name}", force=args.force)  # refuse before hours of work
    prov = provenance(args.threads, {"batch_size": args.batch_size})
    rows = []
    for name in args.models or available():
        entry = ZOO[name]
        base = entry.build()
        batch = entry.batch(args.batch_size)
        plain_peak = et.measure(copy.deepcopy(base), batch, warmup=1, repeats=1).peak_bytes
        for technique, cfg in zoo_configs(analyze(base, batch[0])).items():
            row = evaluate(entry, cfg, batch_size=args.batch_size, model=base)
            if row["outcome"] == "works":
                row["plain_peak"] = plain_peak
                row["peak"] = et.measure(copy.deepcopy(base), batch, recipe=cfg, warmup=1, repeats=1).peak_bytes
            rows.append(row)
            print(f"{name:12s} {technique:16s} {row['outcome']}", file=sys.stderr, flush=True)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps({"provenance": prov, "rows": rows}, indent=2) + "\n")
    paths[2].write_text(matrix(rows) + "\n\n" + table(rows) + "\n")
    print(paths[0], paths[2], sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
