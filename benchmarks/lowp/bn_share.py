"""BatchNorm's share of a training step on this CPU, before and after LightNorm, and whether BN is memory-bound.

LightNorm's motivation (Noh et al., ICCD 2022, §1): in mobile-friendly nets BN is a large share of training time
because it is memory-bound (few operations per byte). This script measures, with ``torch.profiler`` over
``--steps`` training steps after a warm-up, on T1 (MobileNetV2, 64x64x3, batch 32) and T2 (small CNN, 28x28x1,
batch 64), each with random data of the workload's shape (time does not depend on the values):

* the step time and the time inside BN: stock ``aten::batch_norm`` + ``NativeBatchNormBackward0`` for fp32 BN,
  the ``lightnorm::forward``/``lightnorm::backward`` ranges for LightNorm's emulation;
* BN's share of the FLOPs: the convolutions and linears counted by ``torch.utils.flop_counter`` against BN's
  ``10`` floating-point operations per element forward and backward (our count: mean, variance, normalise,
  scale-shift; the backward's two reductions and the elementwise update);
* BN's achieved bandwidth: the bytes stock BN moves (forward reads the input twice and writes the output; backward
  reads the input and the output gradient and writes the input gradient: ``6 x 4`` bytes per element, our count)
  over its measured time, against this machine's copy bandwidth (``Tensor.copy_`` of 64 MiB).

A share of time far above the share of FLOPs, at a bandwidth near the copy bandwidth, is what memory-bound means.
LightNorm's emulation runs more passes in fp32 than the BN hardware it models: its times say what the emulation
costs here, not what LightNorm's unit would.

    OMP_NUM_THREADS=1 python benchmarks/lowp/bn_share.py --out benchmarks/results/lowp-bn-share-2026-12-02.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance
from edgetrain.models import create_model

WORKS = {  # name: (model, in_channels, image size, batch)
    "T1 mobilenet_v2": ("mobilenet_v2", 3, 64, 32),
    "T2 small_cnn": ("small_cnn", 1, 28, 64),
}
BN_FLOPS_PER_ELEMENT = 10  # our count, see the module docstring
BN_BYTES_PER_ELEMENT = 6 * 4


def copy_bandwidth() -> float:
    """Bytes per second of ``dst.copy_(src)`` on 64 MiB fp32 (read + write counted), best of 10."""
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def bn_elements(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Elements BN normalises in one forward (the inputs of every ``BatchNorm`` module)."""
    total = 0

    def hook(_m, inp) -> None:
        nonlocal total
        total += inp[0].numel()

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def run(work: str, recipe: str, steps: int) -> dict:
    name, cin, size, batch = WORKS[work]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=cin, image_size=size)
    x, y = torch.randn(batch, cin, size, size), torch.randint(0, 10, (batch,))
    handle = et.apply_(model, et.LightNorm(), x) if recipe == "lightnorm" else None
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("edgetrain::step"):
                step()
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}  # microseconds, summed over the steps
    keys = ("lightnorm::forward", "lightnorm::backward") if recipe == "lightnorm" else \
        ("aten::batch_norm", "NativeBatchNormBackward0")
    bn_us = sum(events.get(k, 0.0) for k in keys)
    step_us = events["edgetrain::step"]
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    elements = bn_elements(model, x)
    bn_flops = BN_FLOPS_PER_ELEMENT * elements
    if handle is not None:
        handle.remove()
    bn_seconds = bn_us / 1e6 / steps
    return {
        "work": work, "recipe": recipe, "steps": steps, "step_seconds": statistics.median(walls),
        "profiled_step_seconds": step_us / 1e6 / steps, "bn_seconds": bn_seconds, "bn_time_share": bn_us / step_us,
        "bn_elements": elements, "bn_flops": bn_flops, "conv_linear_flops": fc.get_total_flops(),
        "bn_flop_share": bn_flops / (bn_flops + fc.get_total_flops()),
        "bn_bandwidth_bytes_per_s": BN_BYTES_PER_ELEMENT * elements / bn_seconds if recipe == "plain" else None,
    }


def render(rows: list[dict], copy_bw: float) -> str:
    lines = [f"Copy bandwidth of this machine: {copy_bw / 1e9:.1f} GB/s (read + write, 64 MiB fp32, best of 10).", "",
             "| work | BN | step s | BN s | BN share of time | BN share of FLOPs | BN GB/s (stock, our byte count) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bw = f"{r['bn_bandwidth_bytes_per_s'] / 1e9:.1f}" if r["bn_bandwidth_bytes_per_s"] else "-"
        lines.append(f"| {r['work']} | {r['recipe']} | {r['step_seconds']:.3f} | {r['bn_seconds']:.3f} | "
                     f"{100 * r['bn_time_share']:.1f}% | {100 * r['bn_flop_share']:.2f}% | {bw} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results JSON (a Markdown table is written beside it)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="overwrite existing results")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite")
    torch.set_num_threads(args.threads)
    prov = provenance(args.threads)
    steps = smoke.cap(args.steps, 1)
    works = list(WORKS)[-1:] if smoke.active() else list(WORKS)
    copy_bw = copy_bandwidth()
    rows = []
    for work in works:
        for recipe in ("plain", "lightnorm"):
            print(f"[bn-share] {work}, {recipe}: {steps} profiled steps", flush=True)
            rows.append(run(work, recipe, steps))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": prov, "copy_bandwidth_bytes_per_s": copy_bw, "rows": rows}, indent=2))
    table = render(rows, copy_bw)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
