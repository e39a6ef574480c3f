"""T2 from scratch with simulated approximate multipliers (ApproxTrain, Gong et al., arXiv:2209.04161).

LeNet-5-style CNN and a small ResNet (ResNet-8: stem + three BasicBlocks, widths ``w, 2w, 4w``) trained from the
same seeded initialisation and the same batch order on Fashion-MNIST (28x28, dataset mean/std normalisation) with

* ``fp32``: native multiplies (plain PyTorch);
* ``bf16_trunc``: ``ApproxMultiply(model="trunc_exact", mantissa_bits=7)`` -- ApproxTrain's ACC_7 truncated bfloat16;
* ``mitchell``: ``ApproxMultiply(model="mitchell", mantissa_bits=7)``;
* ``mbm``: ``ApproxMultiply(model="mbm", mantissa_bits=7)``.

Every Linear/Conv2d forward and both backward GEMMs use the simulated multiplier, evaluation too (inference on the
same hardware). Adam (lr 1e-3), batch 64, ``--steps`` steps (a fraction of an epoch: the CPU budget, stated in the
results); test accuracy on a fixed 1,000-image test subset every ``--eval-every`` steps and on the full 10,000-image
test set at the end. Writes ``<out>.json`` and ``<out>.png`` (convergence curves).

    OMP_NUM_THREADS=1 python benchmarks/approx/train_t2.py --out benchmarks/results/approx-t2-<date>
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import edgetrain as et
from edgetrain.approx import _kernel
from edgetrain import smoke
from edgetrain.bench import plain_log_ticks, provenance
from edgetrain.data import load_data
from edgetrain.techniques import ApproxMultiply
from edgetrain.train import finite

MULTIPLIERS = {"fp32": None, "bf16_trunc": ("trunc_exact", 7), "mitchell": ("mitchell", 7), "mbm": ("mbm", 7)}
CLAIM = "ApproxTrain: convergence similar to and test accuracy within a negligible change of FP32/bfloat16 (MBM)"


def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, 28x28 input padded by 2 in the first conv."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (N, 6, 14, 14)
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # (N, 400)
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


def resnet8(width: int = 8, num_classes: int = 10) -> nn.Module:
    """He et al. 2016 CIFAR-style ResNet with one BasicBlock per stage (8 weight layers incl. the 1x1 shortcuts)."""
    return nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def accuracy(model: nn.Module, data, limit: int | None = None) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.batches(500, shuffle=False, drop_last=False):
            if limit is not None and total >= limit:
                break
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return correct / total


def train(model, train_data, test_data, args, label: str) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve, evals, step, t0 = [], [], 0, time.perf_counter()
    running = None
    for epoch in range(1000):
        for x, y in train_data.batches(args.batch_size, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % 10 == 0:
                curve.append((step, round(running, 5)))
            if step % args.eval_every == 0 or step == args.steps:
                evals.append((step, accuracy(model, test_data, args.eval_subset)))
                print(f"{label} step {step} loss {running:.4f} acc@{args.eval_subset} {evals[-1][1]:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if step >= args.steps:
                break
        if step >= args.steps:
            break
    if not curve or curve[-1][0] != step:  # the curves always end at the last step (also for runs under 10 steps)
        curve.append((step, round(running, 5)))
    train_s = time.perf_counter() - t0
    final = accuracy(model, test_data)
    return {"loss_curve": curve, "eval_curve": evals, "accuracy": final, "final_train_loss": running,
            "train_seconds": round(train_s, 1), "step_seconds": round(train_s / step, 4), "steps": step}


def figure(rows: list[dict], args):
    """Loss (log, plain-number ticks) and accuracy curves per model; each panel's legend outside its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(archs), figsize=(7.5 * len(archs), 7), squeeze=False)
    for col, arch in enumerate(archs):
        for r in (r for r in rows if r["model"] == arch):
            for ax, curve, scale, label in ((axes[0][col], r["loss_curve"], 1, r["multiplier"]),
                                            (axes[1][col], r["eval_curve"], 100,
                                             f"{r['multiplier']} ({100 * r['accuracy']:.2f}%)")):
                if curve:
                    s, v = zip(*curve)
                    ax.plot(s, [scale * x for x in v], marker="o" if scale == 100 or len(s) < 3 else None,
                            label=label)
        axes[0][col].set(title=f"{arch}: training loss (EMA 0.95)", xlabel="step", ylabel="loss", yscale="log")
        axes[1][col].set(title=f"{arch}: test accuracy on {args.eval_subset} images (final: full test set)",
                         xlabel="step", ylabel="accuracy %")
        axes[0][col].autoscale_view()
        plain_log_ticks(axes[0][col].yaxis)
        for ax in (axes[0][col], axes[1][col]):
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.suptitle(f"Fashion-MNIST from scratch, {args.steps} steps x batch {args.batch_size}, Adam {args.lr}; "
                 "multipliers simulated in forward + both backward GEMMs (M=7)", fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, args)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-subset", type=int, default=1000)
    ap.add_argument("--resnet-width", type=int, default=8)
    ap.add_argument("--models", default="lenet5,resnet8")
    ap.add_argument("--multipliers", default=",".join(MULTIPLIERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .png are written)")
    args = ap.parse_args()
    args.steps = smoke.cap(args.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    torch.set_num_threads(args.threads)
    try:
        train_data = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
        test_data = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    except et.EdgetrainError as e:
        raise SystemExit(f"Fashion-MNIST is needed for T2 (Debian package dataset-fashion-mnist): {e}")
    test_data.transform = train_data.transform  # evaluate with the training split's statistics
    builders = {"lenet5": lenet5, "resnet8": lambda: resnet8(args.resnet_width)}
    rows = []
    for arch in args.models.split(","):
        torch.manual_seed(0)
        base = builders[arch]()
        for mult in args.multipliers.split(","):
            model = copy.deepcopy(base)
            techniques = []
            if MULTIPLIERS[mult] is not None:
                name, bits = MULTIPLIERS[mult]
                example = next(iter(train_data.batches(2, shuffle=False)))[0]  # (2, 1, 28, 28): apply_ traces it
                et.apply_(model, ApproxMultiply(model=name, mantissa_bits=bits), example)
                techniques = ["approx_multiply"]
            res = train(model, train_data, test_data, args, f"{arch}/{mult}")
            rows.append({"name": f"{arch}-{mult}", "model": arch, "multiplier": mult, "techniques": techniques,
                         "mantissa_bits": None if MULTIPLIERS[mult] is None else MULTIPLIERS[mult][1], **res,
                         "paper_claim": CLAIM})
            print(f"== {arch}/{mult}: test accuracy {100 * res['accuracy']:.2f}% ({res['step_seconds']}s/step)",
                  flush=True)
            out = Path(args.out)
            load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            meta = {"work": "T2", "dataset": "fashion-mnist 60k/10k, 28x28, dataset mean/std", "load": load,
                    "schedule": f"{args.steps} steps x batch {args.batch_size} (Adam lr {args.lr}), seed 0, same "
                                f"init and batch order for every multiplier; eval subset {args.eval_subset} images",
                    "resnet_width": args.resnet_width, "compiled_kernel": _kernel.available()}
            out.with_suffix(".json").write_text(json.dumps(finite({"provenance": provenance(args.threads, meta),
                                                                   "rows": rows}), indent=1, allow_nan=False) + "\n")
            plot(rows, out.with_suffix(".png"), args)


if __name__ == "__main__":
    main()
