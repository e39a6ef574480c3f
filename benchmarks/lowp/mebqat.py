"""T2: one MEBQAT model against bit-width-dedicated QAT models, trained from scratch on Fashion-MNIST.

Youn et al., *Bitwidth-Adaptive Quantization-Aware Neural Network Training: A Meta-Learning Approach*, ECCV 2022,
arXiv:2207.10188. Rows, from the same seeded initialisation, batch order and number of optimizer steps:

* ``mebqat``: :class:`edgetrain.mebqat.MEBQATTraining` (S = 4 subtasks per step with (FP, FP) and (1, 1)
  guaranteed, self-distillation from the FP pass, gradient clamp +-10): 4 forward/backward passes per step;
* ``qat-2``, ``qat-4``, ``qat-8``: the same quantizers fixed at (b, b), plain cross-entropy training;
* ``fp``: the same model trained at full precision (quantizers at 32), i.e. post-training quantization at eval.

Model: a 4-conv CNN (``--width`` w: 3x3 convs of w, 2w (stride 2), 2w, 4w (stride 2) channels, each with
BatchNorm + ReLU, global average pooling, linear); the first conv and the classifier stay full precision, as in
the paper. Quantizer ``--method`` (default Yu21/DoReFa, the paper's CIFAR-10 and SVHN configs). AdamW (lr 1e-3,
the paper's optimizer; torch's default weight decay 0.01), cosine schedule, batch 128, ``--steps`` steps, dataset
mean/std normalisation, no augmentation.

Each model is evaluated at every uniform bit width (1..8, 16, fp32) on the 10,000 test images with BatchNorm
(a) recalibrated per bit width on 20 x 256 training images (the deployable mode) and (b) on each test batch's own
statistics (batch 256: the paper's transductive test). For selected bit widths the model is exported with integer
weights (:mod:`edgetrain.lowp.intexport`): file size and the agreement of its predictions with the fake-quantized
model's on the test set. Writes ``<out>/t2-<name>.{json,md,png}``.

    OMP_NUM_THREADS=1 python benchmarks/lowp/mebqat.py --out benchmarks/results --name mebqat-2026-12-02 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import tempfile
import time

import torch
from torch import nn

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_t2
from edgetrain.lowp.fakequant import FP, set_bits
from edgetrain.lowp.intexport import export_integer, load_integer
from edgetrain.mebqat import EVAL_BITS, MEBQATTraining, calibrate, evaluate_bitwidths
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, lr_at

CLAIM = ("MEBQAT: the meta-trained model can be quantized to any candidate bit width without much accuracy drop; "
         "merging bit widths into meta-learning tasks is more robust than bit-width-dedicated QAT (abstract; the "
         "paper's numbers were not retrieved)")
CALIB_BATCHES = 20


def cnn(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """Four 3x3 conv-BN-ReLU layers (w, 2w/2, 2w, 4w/2 channels/stride), global average pooling, a linear head."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(*block(1, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1), *block(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))  # (N, classes)


def train(model: nn.Module, data, args, mebqat: bool, label: str) -> dict:  # noqa: ANN001
    """``args.steps`` AdamW steps (cosine); ``mebqat``: MEBQAT's outer step, else plain cross-entropy."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, schedule="cosine")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    outer = MEBQATTraining(model) if mebqat else None
    torch.manual_seed(0)  # the subtask sampler's stream
    step, t0, running, curve = 0, time.perf_counter(), None, []
    while step < args.steps:
        for x, y in data.batches(args.batch_size, seed=0, epoch=step // data.steps_per_epoch(args.batch_size)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, args.steps)
            if outer is not None:
                loss = outer.step(x, y, opt)
            else:
                model.train()
                opt.zero_grad(set_to_none=True)
                out = nn.functional.cross_entropy(model(x), y)
                out.backward()
                opt.step()
                loss = float(out.detach())
            step += 1
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if step % 50 == 0 or step == args.steps:
                curve.append((step, round(running, 4)))
                print(f"[mebqat] {label} step {step}/{args.steps} loss {running:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if step >= args.steps:
                break
    seconds = time.perf_counter() - t0
    return {"train_seconds": round(seconds, 1), "step_seconds": round(seconds / step, 4), "steps": step,
            "final_train_loss": running, "loss_curve": curve}


@torch.no_grad()
def _predict(model: nn.Module, data) -> torch.Tensor:  # noqa: ANN001
    model.eval()
    return torch.cat([model(x).argmax(1) for x, _ in data.batches(256, shuffle=False, drop_last=False)])


def export_check(model: nn.Module, bits: int, train_data, test_data, width: int) -> dict:  # noqa: ANN001
    """Recalibrate BatchNorm at (bits, bits), export with integer weights, reload into a fresh CNN and compare its
    test predictions with the fake-quantized model's (the model's own state is put back)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        set_bits(model, bits, bits)
        calibrate(model, train_data, CALIB_BATCHES)
        fake = _predict(model, test_data)
        with tempfile.TemporaryDirectory() as d:
            info = export_integer(model, os.path.join(d, "model.safetensors"), bits)
            skeleton = cnn(width)
            load_integer(info["path"], skeleton)
            ints = _predict(skeleton, test_data)
        labels = torch.cat([y for _, y in test_data.batches(256, shuffle=False, drop_last=False)])
        return {"bits": bits, "file_bytes": info["bytes"], "fp32_file_bytes": info["fp32_bytes"],
                "ideal_bytes": info["ideal_bytes"], "agreement": float((fake == ints).double().mean()),
                "fake_accuracy": float((fake == labels).double().mean()),
                "integer_accuracy": float((ints == labels).double().mean())}
    finally:
        model.load_state_dict(state)
        set_bits(model, FP, FP)


def figure(rows: list[dict], args):  # noqa: ANN001, ANN201
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(b) if b != FP else "fp32" for b in EVAL_BITS]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, mode, title in ((axes[0], "recalibrate", "BatchNorm recalibrated per bit width (deployable)"),
                            (axes[1], "batch", "BatchNorm on each test batch of 256 (paper's transductive test)")):
        for r in rows:
            acc = [r["accuracy"][mode].get(str(b)) for b in EVAL_BITS]
            xs = [i for i, a in enumerate(acc) if a is not None]
            ax.plot(xs, [100 * acc[i] for i in xs], marker="o", lw=2.2 if r["name"] == "mebqat" else 1.2,
                    label=r["name"])
        ax.set(title=title, xlabel="uniform bit width (weights = inputs)", xticks=range(len(labels)),
               xticklabels=labels)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.suptitle(f"Fashion-MNIST from scratch, CNN width {args.width}, {args.method}, {args.steps} AdamW steps x "
                 f"batch {args.batch_size} per model (MEBQAT: 4 subtasks per step)", fontsize=9)
    fig.tight_layout()
    return fig


def table(rows: list[dict], mode: str) -> list[str]:
    head = "| model | " + " | ".join(str(b) if b != FP else "fp32" for b in EVAL_BITS) + " |"
    lines = [head, "|---|" + "---:|" * len(EVAL_BITS)]
    for r in rows:
        cells = [r["accuracy"][mode].get(str(b)) for b in EVAL_BITS]
        lines.append(f"| {r['name']} | " + " | ".join("n/a" if a is None else f"{100 * a:.2f}" for a in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--method", default="dorefa", choices=("dorefa", "lsq"))
    ap.add_argument("--dedicated", default="2,4,8", help="bit widths of the dedicated QAT rows")
    ap.add_argument("--export-bits", default="1,2,4,8", help="bit widths the MEBQAT model is exported at")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    stem = f"t2-{a.name}"
    paths = result_paths(a.out, stem, force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    example = next(iter(train_data.batches(2, shuffle=False)))[0]  # (2, 1, 28, 28)
    torch.manual_seed(0)
    base = cnn(a.width)
    lowest = 1 if a.method == "dorefa" else 2
    specs = [("mebqat", FP, True)] + [(f"qat-{b}", b, False) for b in map(int, a.dedicated.split(","))] + \
        [("fp", FP, False)]
    rows = []
    for name, bits, meta in specs:
        model = copy.deepcopy(base)
        et.apply_(model, et.MEBQAT(method=a.method, weight_bits=bits, act_bits=bits), example)
        res = train(model, train_data, a, meta, name)
        set_bits(model, FP, FP)
        acc = {}
        for mode in ("recalibrate", "batch", "running"):
            t0 = time.perf_counter()
            got = evaluate_bitwidths(model, test_data, EVAL_BITS, bn=mode, calib_data=train_data,
                                     calib_batches=CALIB_BATCHES)
            acc[mode] = {str(b): v for b, v in got.items()}
            print(f"[mebqat] {name} eval ({mode} BN, {time.perf_counter() - t0:.0f}s): "
                  + " ".join(f"{b}:{'-' if v is None else f'{100 * v:.1f}'}" for b, v in got.items()), flush=True)
        export_bits = [int(b) for b in a.export_bits.split(",") if int(b) >= lowest] if meta else \
            ([bits] if bits != FP else [])
        exports = [export_check(model, b, train_data, test_data, a.width) for b in export_bits]
        rows.append({"name": name, "techniques": ["mebqat"], "method": a.method,
                     "trained_at": "MEBQAT subtasks" if meta else ("fp32" if bits == FP else f"w{bits}a{bits}"),
                     **res, "accuracy": acc, "exports": exports, "paper_claim": CLAIM if meta else None})
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, work="T2",
                dataset="fashion-mnist 60k/10k, 28x28x1, dataset mean/std, no augmentation",
                model=f"4-conv CNN width {a.width} (first conv and classifier full precision)",
                schedule=f"{a.steps} AdamW steps (lr {a.lr}, cosine, weight decay 0.01) x batch {a.batch_size} per "
                         "model, seed 0, same initialisation and batch order",
                mebqat="S=4 subtasks, guaranteed (FP,FP) and (lowest,lowest), KD from the FP pass, clamp 10",
                bn_modes={"recalibrate": f"{CALIB_BATCHES} x 256 training images per bit width, cumulative average",
                          "batch": "batch statistics of each test batch of 256", "running": "as training left them"})
    result = {"provenance": prov, "rows": rows}
    lines = [f"# MEBQAT vs dedicated QAT ({a.method}), Fashion-MNIST T2", "",
             "Test accuracy % (10,000 images) at uniform bit widths; BatchNorm recalibrated per bit width:", "",
             *table(rows, "recalibrate"), "", "BatchNorm on each test batch's statistics (batch 256, transductive):",
             "", *table(rows, "batch"), "", "Integer export (file bytes; agreement of predictions with the fake-"
             "quantized model on the test set):", "",
             "| model | bits | file bytes | fp32 file bytes | ideal bytes | agreement | integer acc % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for e in r["exports"]:
            lines.append(f"| {r['name']} | {e['bits']} | {e['file_bytes']:,} | {e['fp32_file_bytes']:,} | "
                         f"{e['ideal_bytes']:,} | {100 * e['agreement']:.2f}% | {100 * e['integer_accuracy']:.2f} |")
    lines += ["", "| model | train s | s/step | final train loss |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['train_seconds']} | {r['step_seconds']} | {r['final_train_loss']:.4f} |"
              for r in rows]
    write_report(paths[0], result, paths[2], lines)
    import matplotlib.pyplot as plt

    fig = figure(rows, a)
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    print(paths[3])
    return 0


if __name__ == "__main__":
    run_main(main, "mebqat")
