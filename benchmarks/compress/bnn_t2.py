"""T2: a binary MLP trained from scratch on Fashion-MNIST, the standard way and the edge way.

Standard (Courbariaux & Bengio, BinaryNet, arXiv:1602.02830): every saved tensor, weight, gradient and Adam
state in fp32. Edge (Wang et al., arXiv:2102.04270): :class:`edgetrain.techniques.BNNEdge` (1-bit saved
activations and STE masks, l1 BatchNorm keeping sign(x_hat), fp16 latent weights, gradients and Adam state).
Model: the paper's MNIST MLP (4 x 256 binary hidden layers). Adam lr 1e-3, batch 100, inputs in [-1, 1]
(paper recipe, spec §4.4), for ``--epochs`` epochs (the paper trains 1000). Adam eps is 1e-4 for both runs
(1e-8 underflows in fp16). Memory is measured with :func:`edgetrain.measure` on one batch (interleaved
repeats for step time); accuracy on the 10,000 test images.

    OMP_NUM_THREADS=1 python benchmarks/compress/bnn_t2.py --epochs 5 --out benchmarks/results/t2-bnn-2026-11-24.json
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
from edgetrain.bench import provenance
from edgetrain.data import load_data
from edgetrain.measure import measure
from edgetrain.techniques import BNNEdge
from edgetrain.techniques.bnn_edge import binary_mlp

CLAIM_MEM = "Wang et al.: 3-5x less training memory (MNIST MLP bs 100: 2.78x modelled), accuracy within ~2 pt"


def _inputs(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1  # [0, 1] -> [-1, 1]


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-4)


def train_eval(model, train, test, epochs: int, lr: float, bs: int, name: str) -> float:
    opt = _optimizer(model, lr)
    steps = epochs * (len(train) // bs)
    bar = tqdm(total=steps, desc=f"train {name}", unit="step")
    for epoch in range(epochs):
        model.train()
        for x, y in train.batches(bs, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(_inputs(x)), y)
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test.batches(1000, shuffle=False, drop_last=False):
            correct += int((model(_inputs(x)).argmax(1) == y).sum())
    return correct / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = load_data("fashion-mnist", "train", channels=1, normalize="none")
    test = load_data("fashion-mnist", "test", channels=1, normalize="none")
    torch.manual_seed(0)
    base = binary_mlp()
    models = {"standard": copy.deepcopy(base), "edge": copy.deepcopy(base)}
    x, y = next(iter(train.batches(args.batch_size, seed=0)))
    batch = (_inputs(x), y)
    et.apply_(models["edge"], BNNEdge(), batch[0][:2])
    meas = {k: measure(m, batch, optimizer=_optimizer(m, args.lr), repeats=1) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):  # interleave plain and edge so both see the same machine load
        for k, m in models.items():
            times[k].append(measure(m, batch, optimizer=_optimizer(m, args.lr), warmup=1, repeats=3).step_seconds)
    rows = []
    for k, m in models.items():
        acc = train_eval(m, train, test, args.epochs, args.lr, args.batch_size, k)
        d = meas[k].to_dict()
        d["step_seconds"] = statistics.median(times[k])
        d["model_bytes"] = d["saved_bytes"] + d["param_bytes"] + d["grad_bytes"] + d["optimizer_bytes"]
        rows.append({"name": f"bnn-mlp-{k}", "techniques": [] if k == "standard" else ["bnn_edge"], **d,
                     "accuracy": acc, "epochs": args.epochs})
    std = rows[0]
    for r in rows:
        for f in ("saved_bytes", "peak_bytes", "model_bytes", "step_seconds"):
            r[f"{f.removesuffix('_bytes').removesuffix('_seconds')}_ratio"] = round(r[f] / std[f], 4)
    rows[1]["paper_claim"] = CLAIM_MEM
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"provenance": provenance(args.threads, {"work": "T2", "load": load, "batch_size": args.batch_size,
                                                      "lr": args.lr, "adam_eps": 1e-4}), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['name']}: saved {r['saved_bytes'] / 2**20:.2f} MiB, peak {r['peak_bytes'] / 2**20:.2f} MiB, "
              f"model {r['model_bytes'] / 2**20:.2f} MiB (x{r['model_ratio']}), step {r['step_seconds'] * 1e3:.1f} ms, "
              f"acc {100 * r['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
