"""Training-step time with simulated multipliers vs native fp32 (LeNet-5 and ResNet-8 of train_t2.py).

One Adam step (forward, backward, update) on a batch of Fashion-MNIST-shaped random data, median of ``--repeats``
after a warm-up, models interleaved in one run so that they see the same machine load.

    OMP_NUM_THREADS=1 python benchmarks/approx/step_time.py --out benchmarks/results/approx-steptime-<date>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import edgetrain as et
from edgetrain.approx import _kernel
from edgetrain.bench import provenance
from edgetrain.techniques import ApproxMultiply

from train_t2 import MULTIPLIERS, lenet5, resnet8  # noqa: E402  (same directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)
    rows = []
    for arch, build in (("lenet5", lenet5), ("resnet8", lambda: resnet8(8))):
        torch.manual_seed(0)
        base = build()
        models = {}
        for mult, spec in MULTIPLIERS.items():
            m = copy.deepcopy(base)
            if spec is not None:
                et.apply_(m, ApproxMultiply(model=spec[0], mantissa_bits=spec[1]), x[:2])
            models[mult] = (m, torch.optim.Adam(m.parameters(), lr=1e-3))
        times: dict[str, list[float]] = {k: [] for k in models}

        def step(m, opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

        for k, (m, opt) in models.items():
            step(m, opt)  # warm-up
        for _ in range(args.repeats):
            for k, (m, opt) in models.items():
                t = time.perf_counter()
                step(m, opt)
                times[k].append(time.perf_counter() - t)
        base_t = statistics.median(times["fp32"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append({"name": f"{arch}-{k}", "model": arch, "multiplier": k,
                         "techniques": [] if k == "fp32" else ["approx_multiply"],
                         "step_seconds": med, "step_ratio": round(med / base_t, 2)})
            print(f"{arch}/{k}: {med * 1e3:.1f} ms/step (x{med / base_t:.1f} fp32)", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta = {"work": "approx-steptime", "batch_size": args.batch_size, "repeats": args.repeats, "load": load,
            "compiled_kernel": _kernel.available(), "data": "random N(0,1) inputs of Fashion-MNIST shape"}
    Path(args.out).write_text(json.dumps({"provenance": provenance(args.threads, meta), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
