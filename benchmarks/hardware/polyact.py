"""T2: PolyMPCNet's trainable polynomial activations on Fashion-MNIST: accuracy vs ReLUs replaced vs modelled 2PC cost.

Peng et al., *PolyMPCNet: Towards ReLU-free Neural Architecture Search in Two-party Computation Based Private
Inference*, arXiv 2209.09424 (and PASNet, DAC 2023, arXiv 2306.15513). :mod:`edgetrain.hardware.polyact` replaces
ReLUs by ``s w2 x^2 + w1 x + w0`` (straight-through init ``w = (0, 1, 0.005)``, the authors' public code) and prices
each site with the latency model of the authors' code and our communication model (docs/private_inference.md).

Model: a 4-conv CNN (``--width`` w: 3x3 convs of w, 2w (stride 2), 2w, 4w (stride 2) channels, each BatchNorm + ReLU,
global average pooling, linear): 4 ReLU sites of 28x28w, 14x14x2w, 14x14x2w, 7x7x4w elements per image. Every row
trains from the same seeded initialisation and batch order for ``--steps`` AdamW steps (lr 1e-3, cosine, batch 128),
gradient norm clipped at 5 (PASNet ``config.py``), from scratch. Rows:

* ``first-k`` / ``last-k``: the first (or last) k of the 4 sites replaced by degree-2 polynomials, k = 0..4;
* ``gate-lambda``: the paper's search: every site gated (``c0 relu + c1 poly``, ``c = softmax(alpha)``), loss
  ``CE + lambda * latency / latency(all ReLU)`` for ``--steps // 2`` steps (alphas: Adam, ``--alpha-lr``), then each
  site keeps its argmax and the network is fine-tuned for the remaining steps.

Test accuracy on the 10,000 test images; latency in the PASNet code's units, communication in bytes per image.
Writes ``<out>/fashion-polyact-<name>.{json,md,png}``.

    OMP_NUM_THREADS=1 python benchmarks/hardware/polyact.py --out benchmarks/results --name 2026-12-07 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time

import torch
from torch import nn

from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_t2
from edgetrain.hardware.polyact import PolyActivations
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, lr_at

CLAIM = ("PolyMPCNet/PASNet: trainable polynomial activations with the 2PC comparison latency in the loss keep "
         "accuracy while removing most ReLUs; PASNet-A (ResNet-18 backbone, ImageNet) 63 ms private inference, 147x "
         "faster than CryptGPU, 70.54% top-1 (PASNet abstract; PolyMPCNet's own numbers were not retrieved)")
CLIP = 5.0  # PASNet config.py w_grad_clip


def cnn(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """Four 3x3 conv-BN-ReLU layers (w, 2w/2, 2w, 4w/2 channels/stride), global average pooling, a linear head."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(*block(1, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1), *block(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))  # (N, classes)


def train(model: nn.Module, acts: PolyActivations, data, args, lam: float | None) -> dict:
    """``args.steps`` AdamW steps (cosine); ``lam`` given: the gated search for the first half, then harden."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, schedule="cosine")
    params = list(model.parameters()) + list(acts.coeffs.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    alpha_opt = torch.optim.Adam(acts.alphas.parameters(), lr=args.alpha_lr) if lam is not None else None
    search_steps = args.steps // 2 if lam is not None else 0
    step, t0, running, curve, hardened = 0, time.perf_counter(), None, [], None
    model.train()
    while step < args.steps:
        for x, y in data.batches(args.batch_size, seed=0, epoch=step // data.steps_per_epoch(args.batch_size)):
            if step == search_steps and alpha_opt is not None:
                hardened, alpha_opt = acts.harden(), None
                print(f"[polyact] lambda {lam}: hardened at step {step}, polynomial sites {hardened}", flush=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, args.steps)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if alpha_opt is not None:
                alpha_opt.zero_grad(set_to_none=True)
                loss = loss + lam * acts.cost_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            if alpha_opt is not None:
                alpha_opt.step()
            step += 1
            v = float(loss.detach())
            running = v if running is None else 0.98 * running + 0.02 * v
            if step % 100 == 0 or step == args.steps:
                curve.append((step, round(running, 4)))
            if step >= args.steps:
                break
    seconds = time.perf_counter() - t0
    return {"train_seconds": round(seconds, 1), "steps": step, "final_train_loss": running, "loss_curve": curve,
            "search_steps": search_steps, "hardened_sites": hardened}


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    hits = n = 0
    for x, y in data.batches(256, shuffle=False, drop_last=False):
        hits += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return hits / n


def figure(rows: list[dict], args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    styles = {"first": ("o", "C0"), "last": ("s", "C1"), "gate": ("*", "C3")}
    for kind, (marker, color) in styles.items():
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        label = {"first": "first k sites", "last": "last k sites", "gate": "gated search (lambda)"}[kind]
        axes[0].plot([100 * r["relu_fraction_replaced"] for r in rs], [100 * r["accuracy"] for r in rs], marker,
                     color=color, label=label, ms=9 if kind == "gate" else 6)
        axes[1].plot([r["latency"] for r in rs], [100 * r["accuracy"] for r in rs], marker, color=color, label=label,
                     ms=9 if kind == "gate" else 6)
        for r in rs:
            if kind == "gate":
                axes[1].annotate(f"lambda={r['lambda']:g}", (r["latency"], 100 * r["accuracy"]), fontsize=7)
    axes[0].set(xlabel="ReLU elements replaced by polynomials, % of the network's", ylabel="test accuracy %")
    axes[1].set(xlabel="modelled 2PC latency per image (PASNet latency model units, log)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST from scratch, 4-conv CNN width {args.width}, {args.steps} AdamW steps x batch "
                 f"{args.batch_size}; degree-2 trainable polynomials (PolyMPCNet)", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha-lr", type=float, default=0.05, help="Adam lr of the gate logits (ours; PASNet 3e-4 "
                    "over 50+ epochs)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lambdas", default="0,0.01,0.1,1", help="latency weights of the gated rows (empty: none)")
    ap.add_argument("--orders", default="first,last", help="which k-site rows: first, last or both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    paths = result_paths(a.out, f"fashion-polyact-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    example = next(iter(train_data.batches(2, shuffle=False)))[0]  # (2, 1, 28, 28)
    torch.manual_seed(0)
    base = cnn(a.width)
    sites = [s.name for s in PolyActivations(copy.deepcopy(base), example, 0).sites]
    specs: list[tuple[str, str, object, float | None]] = []
    orders = [o for o in a.orders.split(",") if o]
    for k in range(len(sites) + 1):
        if "first" in orders:
            specs.append((f"first-{k}", "first", k, None))
        if "last" in orders and 0 < k < len(sites):
            specs.append((f"last-{k}", "last", sites[len(sites) - k:], None))
    specs += [(f"gate-{lam:g}", "gate", "gate", lam) for lam in map(float, filter(None, a.lambdas.split(",")))]
    rows = []
    for name, kind, replace, lam in specs:
        model = copy.deepcopy(base)
        acts = PolyActivations(model, example, replace)
        res = train(model, acts, train_data, a, lam)
        acc = accuracy(model, test_data)
        cost = acts.network_cost()
        total = cost["relus_kept"] + cost["relus_replaced"]
        row = {"name": name, "kind": kind, "lambda": lam, "replaced_sites": acts.replaced(), "accuracy": acc,
               **cost, "comm_bytes": cost["comm_bits"] / 8, "relu_fraction_replaced": cost["relus_replaced"] / total,
               "coefficients": {k: [round(v, 5) for v in w.detach().flatten().tolist()]
                                for k, w in acts.coeffs.items()}, **res}
        rows.append(row)
        print(f"[polyact] {name}: acc {100 * acc:.2f}% sites {acts.replaced()} latency {cost['latency']:.0f} "
              f"comm {cost['comm_bits'] / 8 / 1024:.0f} KiB ({res['train_seconds']}s)", flush=True)
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, work="T2", sites=sites,
                dataset="fashion-mnist 60k/10k, 28x28x1, dataset mean/std, no augmentation",
                model=f"4-conv CNN width {a.width}, BatchNorm + ReLU after each conv",
                schedule=f"{a.steps} AdamW steps (lr {a.lr}, cosine, weight decay 0.01) x batch {a.batch_size}, grad "
                         f"norm clip {CLIP}, seed 0, same initialisation and batch order for every row, from scratch",
                polynomial="degree 2 per site, straight-through init (0, 1, 0.005), scale 1",
                gate=f"all sites gated, alphas Adam lr {a.alpha_lr}, search {a.steps // 2} steps then argmax and "
                     "fine-tune; loss CE + lambda * latency / latency(all ReLU)",
                cost="latency: PASNet code (13.6 n + 0.4 per ReLU site, 0.03 n + 0.2 per degree-2 polynomial site); "
                     "communication: 28672 bits per ReLU (GC, l=32, kappa=128), 128 bits per degree-2 polynomial",
                paper_claim=CLAIM)
    result = {"provenance": prov, "rows": rows}
    lines = ["# PolyMPCNet polynomial activations, Fashion-MNIST T2", "",
             f"4-conv CNN width {a.width}, {a.steps} steps per row; sites in call order: {', '.join(sites)}.", "",
             ("| row | polynomial sites | ReLUs replaced | test acc % | latency (PASNet units) | comm KiB/image | "
              "train s |"), "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {', '.join(r['replaced_sites']) or '-'} | {r['relus_replaced']:,} "
                     f"({100 * r['relu_fraction_replaced']:.0f}%) | {100 * r['accuracy']:.2f} | {r['latency']:,.1f} | "
                     f"{r['comm_bytes'] / 1024:,.1f} | {r['train_seconds']} |")
    write_report(paths[0], result, paths[2], lines)
    import matplotlib.pyplot as plt

    fig = figure(rows, a)
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    print(paths[3])
    return 0


if __name__ == "__main__":
    run_main(main, "polyact")
