"""Where a training step's peak comes from, measured: the meter's peak split for a list of recipes on one workload.

For each recipe of a bench config (``benchmarks/peak/t1_peak.yaml``), one metered step (``edgetrain.measure``: the
step census of edgetrain.census) on the workload's first batch, and the cost model's predicted peak beside it.
Writes ``<out>/<work>-<name>.json`` (provenance + rows: the contract fields, ``peak_split``, ``peak_phase``,
``peak_where``, ``ram_peak_flash``, ``predicted_peak``) and a stacked-bar PNG of the categories (docs/memory.md).

    OMP_NUM_THREADS=1 python benchmarks/peak/peaks.py --config benchmarks/peak/t1_peak.yaml --name peak-2026-12-01
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import edgetrain as et
from edgetrain.bench import BenchSpec, provenance, result_paths
from edgetrain.cost import estimate
from edgetrain.measure import CATEGORIES

COLORS = {"weights_trainable": "#1f77b4", "weights_frozen": "#aec7e8", "buffers": "#c7c7c7", "gradients": "#ff7f0e",
          "optimizer": "#ffbb78", "saved": "#2ca02c", "hidden": "#98df8a", "batch": "#9467bd", "state": "#c5b0d5",
          "transient": "#d62728"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    for cat in CATEGORIES:
        vals = [r["peak_split"].get(cat, 0) / 2**20 for r in rows]
        if not any(vals):
            continue
        ax.barh(names, vals, left=left, color=COLORS[cat], label=cat.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i] + 1, i, f"{r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_phase']})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB at the step's peak (measured)")
    ax.set_xlim(0, max(left) * 1.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = BenchSpec.load(args.config)
    paths = result_paths(args.out, f"{spec.work.lower()}-{args.name}", force=args.force)
    prov = provenance(args.threads, {"config": args.config, "workload": spec.workload.to_dict()})
    wl = spec.workload
    data = wl.load_data("train")
    batch = wl.example_batch(data)
    rows = []
    for recipe in spec.recipes:
        print(f"[peaks] {recipe.name}", file=sys.stderr, flush=True)
        model = wl.build_model(data.num_classes)
        m = et.measure(model, batch, recipe=recipe, warmup=1, repeats=3)
        pred = estimate(model, recipe, batch_size=wl.batch_size, example=batch[0], peak=True).peak
        rows.append({"name": recipe.name, "techniques": recipe.technique_names, **m.to_dict(),
                     "ram_peak_flash": m.ram_peak(flash=True), "predicted_peak": pred.bytes,
                     "predicted_phase": pred.phase, "recipe": recipe.to_dict()})
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps({"provenance": prov, "rows": rows}, indent=2) + "\n")
    plot(rows, paths[3], f"{spec.work}: what holds the peak of one training step (batch {wl.batch_size})")
    plain = next((r["peak_bytes"] for r in rows if r["name"] == "plain"), None)
    lines = ["| recipe | peak MiB | ×plain | saved MiB | phase | where | predicted MiB |", "|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        ratio = f"{r['peak_bytes'] / plain:.3f}" if plain else ""
        lines.append(f"| {r['name']} | {r['peak_bytes'] / 2**20:.2f} | {ratio} | {r['saved_bytes'] / 2**20:.2f} | "
                     f"{r['peak_phase']} | {r['peak_where']} | {r['predicted_peak'] / 2**20:.2f} |")
    paths[2].write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
