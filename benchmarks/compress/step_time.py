"""Interleaved step-time and memory of the compression recipes against plain on the T1 batch.

The bench runner measures each recipe once, one after the other; with other jobs on the machine that makes
step ratios drift. Here plain and each recipe alternate (``--rounds`` rounds of ``measure`` with 3 timed
steps each), the ratio is the median over rounds of recipe/plain, and the load (``uptime``) is recorded.
Models are random-initialised MobileNetV2 (timing and memory do not depend on the weights).

    OMP_NUM_THREADS=1 python benchmarks/compress/step_time.py --config benchmarks/compress/t1_compress.yaml \\
        --out benchmarks/results/t1-compress-steptime-2026-11-24.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
from pathlib import Path

import torch
from tqdm import tqdm

import edgetrain as et
from edgetrain.bench import BenchSpec, provenance
from edgetrain.measure import measure
from edgetrain.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = BenchSpec.load(args.config)
    wl = spec.workload
    torch.manual_seed(0)
    x = torch.randn(wl.batch_size, wl.channels, wl.image_size, wl.image_size)  # (N, C, H, W)
    y = torch.randint(0, 10, (wl.batch_size,))
    base = create_model(wl.model, num_classes=10, in_channels=wl.channels)
    base.train()
    plain = copy.deepcopy(base)
    rows = []
    for recipe in tqdm([r for r in spec.recipes if r.name != "plain"], desc="recipes"):
        model = copy.deepcopy(base)
        et.apply_(model, recipe)
        ratios, tp, tr, mem = [], [], [], None
        for _ in range(args.rounds):
            p = measure(plain, (x, y), warmup=1, repeats=3)
            r = measure(model, (x, y), warmup=1, repeats=3)
            tp.append(p.step_seconds)
            tr.append(r.step_seconds)
            ratios.append(r.step_seconds / p.step_seconds)
            mem = (p, r)
        p, r = mem
        rows.append({"name": recipe.name, "techniques": recipe.technique_names,
                     "step_ratio_median": round(statistics.median(ratios), 3),
                     "step_seconds": statistics.median(tr), "plain_step_seconds": statistics.median(tp),
                     "saved_bytes": r.saved_bytes, "plain_saved_bytes": p.saved_bytes,
                     "saved_ratio": round(r.saved_bytes / p.saved_bytes, 4),
                     "peak_bytes": r.peak_bytes, "plain_peak_bytes": p.peak_bytes,
                     "peak_ratio": round(r.peak_bytes / p.peak_bytes, 4)})
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = {"provenance": provenance(args.threads, {"work": "T1", "load": load, "rounds": args.rounds,
                                                   "weights": "random init"}), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for row in rows:
        print(f"{row['name']}: step x{row['step_ratio_median']}, saved x{row['saved_ratio']}, "
              f"peak x{row['peak_ratio']}")


if __name__ == "__main__":
    main()
