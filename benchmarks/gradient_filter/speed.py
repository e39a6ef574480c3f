"""Backward time of gradient-filtered vs plain Conv2d at the layer shapes the paper filters, and the whole T1
training step with the last 2 / 4 convs filtered vs the same convs trained plainly.

Plain and filtered runs alternate inside one loop (same process, same threads), and each row's
``backward_speedup`` is plain median / filtered median from that loop.

    python benchmarks/gradient_filter/speed.py --threads 2 --out benchmarks/results/gradient_filter-speed-<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import edgetrain as et
from edgetrain.bench import provenance
from edgetrain.techniques.gradient_filter import FilteredConv2d, estimate_conv

# (layer, C_in, C_out, k, stride, groups, H_in at 224 input) — the convs "last 2 / last 4" filter
# (MobileNetV2 features.17 / .18; ResNet-18 layer4), shapes from the models in edgetrain.models.
LAYERS = [
    ("mbv2.features.17.expand", 160, 960, 1, 1, 1, 7),
    ("mbv2.features.17.dw", 960, 960, 3, 1, 960, 7),
    ("mbv2.features.17.project", 960, 320, 1, 1, 1, 7),
    ("mbv2.features.18", 320, 1280, 1, 1, 1, 7),
    ("resnet18.layer4.0.conv1", 256, 512, 3, 2, 1, 14),
    ("resnet18.layer4.1.conv2", 512, 512, 3, 1, 1, 7),
]


def time_backward(fn, x, w, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        y = fn(x, w)
        g = torch.ones_like(y)
        t0 = time.perf_counter()
        torch.autograd.grad(y, (x, w), g)
        out.append(time.perf_counter() - t0)
    return out


def layer_rows(batches, inputs, radii, reps):
    rows = []
    todo = [(L, n, res, r) for L in LAYERS for n in batches for res in inputs for r in radii]
    for (name, cin, cout, k, s, groups, h224), n, res, r in tqdm(todo, desc="layers"):
        h = max(1, round(h224 * res / 224))
        x = torch.randn(n, cin, h, h, requires_grad=True)
        w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
        pad = (k - 1) // 2

        def plain(x, w):
            return F.conv2d(x, w, None, s, pad, 1, groups)

        def filtered(x, w):
            return FilteredConv2d.apply(x, w, None, (s, s), (pad, pad), groups, r, False)

        tp, tf = [], []
        for _ in range(reps):  # alternate so that load changes hit both alike
            tp += time_backward(plain, x, w, 1)
            tf += time_backward(filtered, x, w, 1)
        ho = (h + 2 * pad - k) // s + 1
        est = estimate_conv((n, cin, h, h), tuple(w.shape), (ho, ho), (s, s), groups, r)
        mp, mf = statistics.median(tp), statistics.median(tf)
        rows.append({"name": f"{name}@{res}px/b{n}/r{r}", "techniques": ["gradient_filter"], "layer": name,
                     "input_px": res, "batch": n, "radius": r, "in_shape": [n, cin, h, h],
                     "plain_backward_ms": round(mp * 1e3, 4), "filtered_backward_ms": round(mf * 1e3, 4),
                     "backward_speedup": round(mp / mf, 2), **est,
                     "paper_claim": "single conv backward up to 114x (R4) on a Jetson Nano CPU; 15-28x (R2)"})
    return rows


def step_rows(reps, threads):
    """Whole T1 training step: the convs of the last 2 / 4 blocks filtered (r=4) vs the same convs trained
    plainly (Freeze with those convs as targets: BatchNorms frozen in both, classifier trained in both)."""
    wl = et.Workload(train_subset=256, eval_subset=64)
    data = wl.load_data("train")
    batch = wl.example_batch(data)
    rows = []
    for n_blocks in (2, 4):
        model = wl.build_model(data.num_classes)
        blocks = model.block_names[-n_blocks:]
        convs = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and any(k.startswith(b + ".") or k == b for b in blocks)]
        recipes = {"plain-same-convs": et.Freeze(targets=convs),
                   "filtered-r4": et.GradientFilter(radius=4, targets=convs)}
        res = {k: [] for k in recipes}
        for _ in range(reps):
            for k, rec in recipes.items():
                res[k].append(et.measure(model, batch, recipe=rec, warmup=1, repeats=3))
        med = {k: statistics.median(m.step_seconds for m in v) for k, v in res.items()}
        for k, v in res.items():
            m = v[-1]
            rows.append({"name": f"T1-step/last{n_blocks}blocks/{k}", "blocks": blocks, "techniques": sorted({r.name for r in [recipes[k]]}),
                         "convs": convs, "step_seconds": round(med[k], 4),
                         "step_ratio": round(med[k] / med["plain-same-convs"], 3),
                         "backward_speedup": None, "saved_bytes": m.saved_bytes, "peak_bytes": m.peak_bytes,
                         "param_bytes": m.param_bytes, "grad_bytes": m.grad_bytes,
                         "optimizer_bytes": m.optimizer_bytes})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = layer_rows([32, 1], [224, 64], [2, 4, 7], args.reps) + step_rows(3, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": provenance(args.threads, {"work": "gradient_filter-speed"}),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
