"""AMSim GEMM speed at the GEMM sizes of LeNet-5 and ResNet-8 training (batch 64, Fashion-MNIST 28x28).

For each GEMM (m, k, n) of a training step (forward, input gradient, weight gradient; im2col sizes for convs)
this times, in one run, interleaved, median of ``--repeats`` after a warm-up:

* ``native``: ``torch.matmul`` in fp32;
* ``amm``: :func:`edgetrain.approx.amm` (the compiled kernel when it builds, else the torch path);
* ``torch_path``: :func:`edgetrain.approx.amm_torch`, the pure-torch blocked implementation (the fallback);
* ``compiled_reference``: a naive per-element C++ simulator (scalar integer AMSim per product, dot-product loop,
  no blocking or vectorisation), timed on the first rows and scaled per product;
* ``reference``: the per-element Python model :func:`edgetrain.approx.amul_scalar` (the multiplier's functional
  model called per product, fp32 sum), timed on ``--ref-products`` products and scaled per product.

Rows carry ``speedup_vs_reference`` (reference / amm), ``slowdown_vs_native`` (amm / native) and the same for the
other paths. Data: standard normal operands (no zeros, so the kernel's zero skip does not flatter it).

    OMP_NUM_THREADS=1 python benchmarks/approx/speed.py --out benchmarks/results/approx-speed-<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from edgetrain.approx import MULTIPLIERS, _kernel, amm, amm_torch, amul_scalar, get_lut
from edgetrain.bench import provenance


def lenet5_gemms(n: int = 64) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of one LeNet-5 training step (conv1 input gradient is not needed)."""
    return [("lenet5.conv1.fwd", n * 784, 25, 6), ("lenet5.conv1.wgrad", 25, n * 784, 6),
            ("lenet5.conv2.fwd", n * 100, 150, 16), ("lenet5.conv2.igrad", n * 100, 16, 150),
            ("lenet5.conv2.wgrad", 150, n * 100, 16),
            ("lenet5.fc1.fwd", n, 400, 120), ("lenet5.fc1.igrad", n, 120, 400), ("lenet5.fc1.wgrad", 400, n, 120),
            ("lenet5.fc2.fwd", n, 120, 84), ("lenet5.fc3.fwd", n, 84, 10)]


def resnet8_gemms(n: int = 64, w: int = 8) -> list[tuple[str, int, int, int]]:
    """A 3x3 conv of each stage of ResNet-8 (width w: 28x28 w->w, 14x14 2w->2w, 7x7 4w->4w)."""
    rows = []
    for stage, (hw, c) in enumerate([(28, w), (14, 2 * w), (7, 4 * w)], 1):
        mm = n * hw * hw
        rows += [(f"resnet8.s{stage}.conv.fwd", mm, 9 * c, c), (f"resnet8.s{stage}.conv.igrad", mm, c, 9 * c),
                 (f"resnet8.s{stage}.conv.wgrad", 9 * c, mm, c)]
    return rows


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def python_reference_per_product(a, b, fn, M: int, products: int) -> float:
    """Seconds per product of the per-element Python model (dot products of whole rows until ``products``)."""
    al, bl = a.tolist(), b.t().tolist()
    k = a.shape[1]
    done, t = 0, time.perf_counter()
    for i in range(len(al)):
        for j in range(len(bl)):
            acc = 0.0
            for x, y in zip(al[i], bl[j]):
                acc = acc + amul_scalar(x, y, fn, M)  # (float64 sum: the multiply dominates the cost)
            done += k
            if done >= products:
                return (time.perf_counter() - t) / done
    return (time.perf_counter() - t) / max(done, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--multiplier", default="mbm", choices=sorted(MULTIPLIERS))
    ap.add_argument("--mantissa-bits", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-products", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lut = get_lut(args.multiplier, args.mantissa_bits)
    fn = MULTIPLIERS[args.multiplier]
    naive = _kernel.naive()
    rows = []
    for name, m, k, n in lenet5_gemms(args.batch) + resnet8_gemms(args.batch):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        products = m * k * n
        ref_pp = python_reference_per_product(a[:8], b, fn, args.mantissa_bits, args.ref_products)
        t_native, t_amm = [], []
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            t_native.append(median_time(lambda: a @ b, 1))
            t_amm.append(median_time(lambda: amm(a, b, lut), 1))
        native, fast = statistics.median(t_native), statistics.median(t_amm)
        torch_path = median_time(lambda: amm_torch(a, b, lut), 1 if products > 2e7 else 3)
        row = {"name": name, "m": m, "k": k, "n": n, "products": products,
               "native_seconds": native, "amm_seconds": fast, "torch_path_seconds": torch_path,
               "reference_seconds_scaled": ref_pp * products, "reference_products_timed": args.ref_products,
               "speedup_vs_reference": round(ref_pp * products / fast, 1),
               "slowdown_vs_native": round(fast / native, 2),
               "torch_path_speedup_vs_reference": round(ref_pp * products / torch_path, 1),
               "torch_path_slowdown_vs_native": round(torch_path / native, 2),
               "amm_ns_per_product": round(fast / products * 1e9, 4)}
        if naive is not None:
            rows_c = max(1, min(m, int(2e6 // (k * n)) or 1))
            t_c = median_time(lambda: naive(a[:rows_c], b, lut.bits, lut.M), 1)
            row["compiled_reference_seconds_scaled"] = t_c * m / rows_c
            row["speedup_vs_compiled_reference"] = round(t_c * m / rows_c / fast, 1)
        rows.append(row)
        print(f"{name:24s} ({m}x{k}x{n}): native {native * 1e3:8.2f} ms, amm {fast * 1e3:8.2f} ms "
              f"(x{row['slowdown_vs_native']} native), torch path {torch_path * 1e3:8.1f} ms, "
              f"vs python ref x{row['speedup_vs_reference']:.0f}, vs C++ per-element "
              f"x{row.get('speedup_vs_compiled_reference', float('nan')):.1f}", flush=True)
    tot = {f: sum(r[f] for r in rows) for f in ("native_seconds", "amm_seconds", "torch_path_seconds",
                                                   "reference_seconds_scaled")}
    summary = {"name": "total (all GEMMs above)", "speedup_vs_reference": round(tot["reference_seconds_scaled"] /
                                                                                 tot["amm_seconds"], 1),
               "slowdown_vs_native": round(tot["amm_seconds"] / tot["native_seconds"], 2),
               "torch_path_slowdown_vs_native": round(tot["torch_path_seconds"] / tot["native_seconds"], 2), **tot}
    if naive is not None:
        c = sum(r["compiled_reference_seconds_scaled"] for r in rows)
        summary["speedup_vs_compiled_reference"] = round(c / tot["amm_seconds"], 1)
    rows.append(summary)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta = {"work": "approx-speed", "multiplier": args.multiplier, "mantissa_bits": args.mantissa_bits,
            "batch": args.batch, "compiled_kernel": _kernel.available(), "load": load,
            "reference": f"per-element Python functional model timed on {args.ref_products} products, scaled per "
                         "product; compiled reference timed on the first rows, scaled",
            "paper_claim": "ApproxTrain (GPU): >2500x faster than CPU per-element simulation; native TF only 8x "
                           "faster than ApproxTrain"}
    Path(args.out).write_text(json.dumps({"provenance": provenance(args.threads, meta), "rows": rows}, indent=1) + "\n")
    print(f"total: x{summary['slowdown_vs_native']} native, x{summary['speedup_vs_reference']} vs python reference")


if __name__ == "__main__":
    main()
