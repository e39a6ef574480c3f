"""The ``host`` profile: this machine's compute rates and memory bandwidths, measured by micro-benchmarks.

Each constant's source is the measurement that produced it (which kernel, what size, best of three after a warm-up),
at the torch thread count current when it was measured. Cache capacities come from Linux's
``/sys/devices/system/cpu/cpu0/cache``. No energy constant can be measured here (no power meter), so the host
profile has none and an energy estimate on it is refused by name; it exists to validate the time model against
measured step times (``benchmarks/hardware/step_time.py``).

* ``macs_per_second``: a 1024 x 1024 x 1024 fp32 matmul.
* ``efficiency``: a kind's rate over the matmul's: conv (3x3, 64 -> 64 channels, 32 x 32, batch 8), depthwise (3x3,
  192 channels, 32 x 32, batch 8), linear (batch 256, 512 -> 512).
* ``op_overhead_s``: the time one more ``Linear(1, 1)`` adds to a forward and backward on one sample, halved
  (PyTorch's per-op dispatch and autograd bookkeeping, charged once per layer per pass): 33 layers against 1.
* ``step_overhead_s``: a whole step (zero_grad, cross-entropy, backward, SGD-momentum step) of ``Linear(1, 1)`` less
  that layer's two passes: the fixed cost of a step.
* bandwidths: ``copy_`` of a tensor that fits the level (256 KiB for L2, 4 MiB for L3, 256 MiB for DRAM);
  bytes moved = 2 x size (read + write).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetrain.hardware.profiles import Profile, parse_profile


def _best(fn: Callable[[], object], repeat: int = 3, inner: int = 1) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def _cache_bytes(level: int) -> int | None:
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if int((d / "level").read_text()) == level and (d / "type").read_text().strip() in ("Unified", "Data"):
                text = (d / "size").read_text().strip().upper()
                scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
                return int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return None


def _bandwidth(nbytes: int) -> float:
    a, b = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
    a.fill_(1.0)
    inner = max(1, (64 * 1024**2) // nbytes)
    return 2 * nbytes / _best(lambda: b.copy_(a), inner=inner)


@functools.lru_cache(maxsize=4)
def _measure(threads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    mm = 1024**3 / _best(lambda: a @ b)
    x, w = torch.randn(8, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    conv = 8 * 64 * 32 * 32 * 64 * 9 / _best(lambda: F.conv2d(x, w, padding=1))
    xd, wd = torch.randn(8, 192, 32, 32, generator=g), torch.randn(192, 1, 3, 3, generator=g)
    dw = 8 * 192 * 32 * 32 * 9 / _best(lambda: F.conv2d(xd, wd, padding=1, groups=192))
    xl, wl = torch.randn(256, 512, generator=g), torch.randn(512, 512, generator=g)
    lin = 256 * 512 * 512 / _best(lambda: F.linear(xl, wl), inner=10)
    one = torch.ones(1, 1)
    short, long = torch.nn.Sequential(torch.nn.Linear(1, 1)), torch.nn.Sequential(*[torch.nn.Linear(1, 1)] * 33)
    overhead = (_best(lambda: long(one).sum().backward(), inner=50)
                - _best(lambda: short(one).sum().backward(), inner=50)) / 32 / 2
    tiny = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(tiny.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(tiny(one), torch.zeros(1, dtype=torch.long)).backward()
        opt.step()

    per_step = _best(step, inner=50) - 2 * overhead
    src = f"measured on this machine at {threads} torch thread(s) (edgetrain.hardware.calibrate)"
    levels = []
    for lvl, size in ((2, 256 * 1024), (3, 4 * 1024**2)):
        cap = _cache_bytes(lvl)
        if cap is not None and cap >= 2 * size:
            levels.append({"name": f"l{lvl}", "capacity": {"value": cap, "source": f"/sys cache index, L{lvl}"},
                           "bandwidth": {"value": _bandwidth(size), "source": f"{src}: copy_ of {size // 1024} KiB"}})
    levels.append({"name": "dram", "bandwidth": {"value": _bandwidth(256 * 1024**2),
                                                 "source": f"{src}: copy_ of 256 MiB"}})
    return {
        "name": "host", "description": f"this machine ({threads} torch thread(s)): rates measured, no energy constants",
        "compute": {
            "macs_per_second": {"value": mm, "source": f"{src}: 1024^3 fp32 matmul"},
            "efficiency": {
                "conv": {"value": conv / mm, "source": f"{src}: 3x3 conv 64->64 at 32x32, batch 8, over the matmul"},
                "depthwise": {"value": dw / mm, "source": f"{src}: 3x3 depthwise, 192 channels at 32x32, batch 8"},
                "linear": {"value": lin / mm, "source": f"{src}: linear 512->512, batch 256"}},
            "op_overhead_s": {"value": overhead, "source": f"{src}: per Linear(1, 1) per pass"},
            "step_overhead_s": {"value": max(per_step, 0.0), "source": f"{src}: a whole SGD-momentum step of "
                                "Linear(1, 1) with cross-entropy, less its layer's two passes"},
        },
        "levels": levels,
    }


def host_profile() -> Profile:
    """This machine's profile at the current torch thread count (measured once per process and thread count)."""
    return parse_profile(_measure(torch.get_num_threads()))
