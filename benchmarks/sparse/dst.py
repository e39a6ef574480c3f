"""T2: dynamic sparse training (SET, RigL, DST-EE) with layers stored sparse, against dense and masked dense.

Papers: SET (Mocanu et al., Nature Communications 2018, arXiv 1707.04780); RigL (Evci et al., ICML 2020, arXiv
1911.11134); DST-EE (Huang et al., DAC 2023, arXiv 2211.16667). Library: :mod:`edgetrain.sparse`.

Model: LeNet-300-100 (an MLP 784-300-100-10, ReLU), trained from scratch on Fashion-MNIST (dataset mean/std, no
augmentation): SGD momentum 0.9, lr ``--lr`` with a cosine schedule, L2 weight decay ``--wd``, batch 128,
``--steps`` steps, seed 0 (the same initialisation and batch order for every row). Sparse rows: every Linear made
sparse (ERK densities, so the small last layer may stay dense), update interval ``--delta-t``, zeta0 0.3, cosine
drop fraction, topology fixed after 75% of training (RigL's settings); DST-EE ``--c``, eps 1, |g| divided by its
layer mean (our assumptions: the paper's constants were not retrieved).

Memory and time (``edgetrain.measure``, one step of batch 128, SGD momentum): dense; masked dense (the dense layers
with a bool mask per sparse layer, re-applied in place after each optimizer step, as masking libraries do); the
sparse model (RigL/SET, and DST-EE with its coverage counters). The update step's extra cost (the dense gradient
made in the backward, the drop-and-grow) is measured with the profiler's allocator events over a whole update step
against a plain step. Writes ``<out>/<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/sparse/dst.py --out benchmarks/results --name t2-dst-2026-12-07
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_t2
from edgetrain.measure import PeakMeter
from edgetrain.report import run_main, write_report
from edgetrain.sparse import DynamicSparse
from edgetrain.train import TrainConfig, evaluate, lr_at

CLAIMS = {
    "dst_ee": "DST-EE above SET and RigL at 90-98% sparsity; above dense on VGG-19/CIFAR-100 and ResNet-50/CIFAR-10/100 "
              "(abstract; the tables were not retrieved)",
    "rigl": "RigL above SET and static sparse at equal FLOPs; ResNet-50/ImageNet at 80-90% sparsity near dense with "
            "longer training (RigL abstract and §4)",
    "set": "SET: sparse MLPs with adaptive connectivity match or beat dense ones (Fashion-MNIST among them)",
}
METHODS = ("set", "rigl", "dst_ee")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def controller(model: nn.Module, method: str, density: float, a, seed: int = 0) -> DynamicSparse:
    return DynamicSparse(model, density, method, total_steps=a.steps, delta_t=a.delta_t, c=a.c, seed=seed)


def train(model: nn.Module, ds: DynamicSparse | None, data, a, label: str, seed: int) -> dict:
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, optimizer="sgd", lr=a.lr, schedule="cosine")
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    step, t0, running = 0, time.perf_counter(), None
    model.train()
    while step < a.steps:
        for x, y in data.batches(a.batch_size, seed=seed, epoch=step // data.steps_per_epoch(a.batch_size)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, a.steps)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if ds is not None:
                ds.step(opt)
            step += 1
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            if step % 500 == 0 or step == a.steps:
                print(f"[dst] {label} step {step}/{a.steps} loss {running:.4f} ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
            if step >= a.steps:
                break
    return {"train_seconds": round(time.perf_counter() - t0, 1), "final_train_loss": running}


def add_masks(model: nn.Module, density: float, a) -> nn.Module:
    """Masked dense: the same layers dense, each sparse layer given a bool mask buffer at its ERK density."""
    ref = mlp()
    ds = controller(ref, "rigl", density, a)
    for name, layer in ds.layers.items():
        model.get_submodule(name).register_buffer("mask", layer.mask())
    return model


def sgd(model: nn.Module, masked: bool = False) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if masked:  # the masking libraries' step: the mask re-applied in place after every optimizer step
        pairs = [(m.weight, m.mask) for m in model.modules() if hasattr(m, "mask")]
        opt.register_step_post_hook(lambda *_: [w.data.mul_(mk) for w, mk in pairs])
    return opt


def interleaved_seconds(entries: list[tuple[nn.Module, torch.optim.Optimizer]], batch, rounds: int) -> list[float]:
    """Median wall time of a plain step (forward, backward, optimizer step) of each model, the models taking turns
    within each round so that a change of the machine's load falls on all of them alike."""
    x, y = batch
    times: list[list[float]] = [[] for _ in entries]
    for r in range(rounds + 2):
        for i, (model, opt) in enumerate(entries):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if r >= 2:  # two warm-up rounds
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def meter(model: nn.Module, batch, masked: bool = False) -> dict:
    opt = sgd(model, masked)
    m = et.measure(model, batch, optimizer=opt, repeats=smoke.cap(20, smoke.REPEATS), warmup=2)
    return {"param_bytes": m.param_bytes, "grad_bytes": m.grad_bytes, "optimizer_bytes": m.optimizer_bytes,
            "buffer_bytes": m.peak_split.get("buffers", 0), "peak_bytes": m.peak_bytes, "saved_bytes": m.saved_bytes,
            "step_seconds": m.step_seconds}


def update_step_cost(method: str, density: float, batch, a) -> dict:
    """Peak live-bytes increase (profiler allocator events) of a plain step and of an update step, same model."""
    torch.manual_seed(0)
    model = mlp()
    ds = controller(model, method, density, a)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch

    def one() -> int:
        opt.zero_grad(set_to_none=True)
        with PeakMeter() as pm:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ds.step(opt)
        return pm.peak_delta

    plain = [one() for _ in range(a.delta_t - 1)][-1]  # steps 1 .. delta_t - 1 (state exists after the first)
    t0 = time.perf_counter()
    update = one()  # step delta_t: armed backward, drop and grow
    return {"plain_step_peak_delta": plain, "update_step_peak_delta": update,
            "update_step_seconds": round(time.perf_counter() - t0, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0 .. n-1 (initialisation, patterns, batch order)")
    ap.add_argument("--skip-memory", action="store_true", help="accuracy rows only (no meter rows)")
    ap.add_argument("--skip-train", action="store_true", help="meter and timing rows only (no training)")
    ap.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, 4)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    if smoke.active():
        a.delta_t = min(a.delta_t, 2)
    sparsities = [float(s) for s in a.sparsities.split(",")]
    methods = a.methods.split(",")
    for s in sparsities:
        if not 0 <= s < 1:
            raise et.ConfigError(f"--sparsities: each must be in [0, 1) (density = 1 - sparsity), got {s}")
    for m in methods:
        if m not in METHODS:
            raise et.ConfigError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    paths = result_paths(a.out, a.name, force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    batch = next(iter(train_data.batches(a.batch_size, shuffle=False)))
    rows = []

    def run(method: str, sparsity: float, seed: int) -> None:
        torch.manual_seed(seed)
        model = mlp()
        ds = controller(model, method, 1 - sparsity, a, seed) if method != "dense" else None
        label = f"{method}@{sparsity:g} seed {seed}"
        res = train(model, ds, train_data, a, label, seed)
        acc = evaluate(model, test_data)
        print(f"[dst] {label}: test accuracy {100 * acc:.2f}%", flush=True)
        row = {"method": method, "sparsity": sparsity, "seed": seed, "accuracy": acc, **res,
               "densities": ds.densities if ds else None, "coverage": ds.coverage() if ds else None,
               "nnz": sum(m.nnz for m in ds.layers.values()) if ds else None, "paper_claim": CLAIMS.get(method)}
        rows.append(row)

    for seed in range(0 if a.skip_train else smoke.cap(a.seeds, 1)):
        run("dense", 0.0, seed)
        for s in sparsities:
            for m in methods:
                run(m, s, seed)
    mem, timed = [], []
    torch.manual_seed(0)
    if not a.skip_memory:
        model = mlp()
        mem.append({"kind": "dense", "sparsity": 0.0, **meter(model, batch)})
        timed.append((model, sgd(model)))
    for s in [] if a.skip_memory else sparsities:
        torch.manual_seed(0)
        model = add_masks(mlp(), 1 - s, a)
        mem.append({"kind": "masked dense", "sparsity": s, **meter(model, batch, masked=True)})
        timed.append((model, sgd(model, masked=True)))
        for kind in ("rigl", "dst_ee"):
            torch.manual_seed(0)
            model = mlp()
            controller(model, kind, 1 - s, a)
            row = {"kind": f"sparse ({'SET/RigL' if kind == 'rigl' else 'DST-EE'})", "sparsity": s,
                   **meter(model, batch), **update_step_cost(kind, 1 - s, batch, a)}
            mem.append(row)
            timed.append((model, sgd(model)))
            print(f"[dst] memory {row['kind']}@{s:g}: peak {row['peak_bytes']:,} B", flush=True)
    for row, sec in zip(mem, interleaved_seconds(timed, batch, smoke.cap(a.rounds, 1))):
        row["step_seconds_interleaved"] = sec
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, work="T2",
                dataset="fashion-mnist 60k/10k, 28x28x1, dataset mean/std, no augmentation",
                model="LeNet-300-100 (784-300-100-10 MLP, ReLU)",
                schedule=f"{a.steps} SGD steps (momentum 0.9, lr {a.lr} cosine, L2 {a.wd}) x batch {a.batch_size}, "
                         f"seeds 0..{a.seeds - 1}, the same initialisation and batch order for every row of a seed",
                dst=f"ERK, delta_t {a.delta_t}, zeta0 0.3 cosine, T_end 0.75 T; DST-EE c {a.c}, eps 1, |g| / mean|g|",
                memory=f"edgetrain.measure, batch {a.batch_size}, SGD momentum, 20 timed steps after 2 warm-up",
                interleaved=f"{a.rounds} rounds (after 2), each model one plain step per round in turn; median")
    result = {"provenance": prov, "rows": rows, "memory": mem}
    write_report(paths[0], result, paths[2], report_lines(rows, mem, a))
    return 0


def report_lines(rows: list[dict], mem: list[dict], a) -> list[str]:
    if not rows:
        lines = ["# Dynamic sparse training, Fashion-MNIST T2: memory and step time (no training rows)"]
        return lines + memory_lines(mem)
    sp = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    seeds = sorted({r["seed"] for r in rows})

    def cell(m: str, s: float) -> str:
        accs = [100 * r["accuracy"] for r in rows if r["method"] == m and r["sparsity"] == s]
        if not accs:
            return "-"
        mean = sum(accs) / len(accs)
        return f"{mean:.2f}" + (f" ({', '.join(f'{v:.2f}' for v in accs)})" if len(accs) > 1 else "")

    lines = ["# Dynamic sparse training, Fashion-MNIST T2 (LeNet-300-100 from scratch)", "",
             (f"Test accuracy % (10,000 images) after {a.steps} steps, mean over seeds {seeds} (each seed in "
              f"brackets); dense: {cell('dense', 0.0)}."), "",
             "| method | " + " | ".join(f"{100 * s:g}% sparse" for s in sp) + " |", "|---|" + "---:|" * len(sp)]
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        lines.append(f"| {m} | " + " | ".join(cell(m, s) for s in sp) + " |")
    return lines + memory_lines(mem)


def memory_lines(mem: list[dict]) -> list[str]:
    if not mem:
        return []
    lines = ["", ("Memory and time of one training step (edgetrain.measure, bytes; buffers: CSR indices, masks, "
                   "coverage counters; step ms: the meter's median of 20, and the median of the interleaved rounds):"),
              "", ("| kind | sparsity | params | grads | optimizer | buffers | peak | step ms (meter) | step ms "
                   "(interleaved) | update-step peak delta (plain step) |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in mem:
        upd = (f"{r['update_step_peak_delta']:,} ({r['plain_step_peak_delta']:,})" if "update_step_peak_delta" in r
               else "")
        lines.append(f"| {r['kind']} | {100 * r['sparsity']:g}% | {r['param_bytes']:,} | {r['grad_bytes']:,} | "
                     f"{r['optimizer_bytes']:,} | {r['buffer_bytes']:,} | {r['peak_bytes']:,} | "
                     f"{1e3 * r['step_seconds']:.2f} | {1e3 * r['step_seconds_interleaved']:.2f} | {upd} |")
    return lines


if __name__ == "__main__":
    run_main(main, "dst")
