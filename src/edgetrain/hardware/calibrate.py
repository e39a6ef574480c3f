"""The ``host`` profile: this machine's compute rates and memory bandwidths, measured by micro-benchmarks.

Each constant's source is the measurement that produced it (which kernel, what size, best of three after a warm-up),
at the torch thread count current when it was measured. Cache capacities come from Linux's
``/sys/devices/system/cpu/cpu0/cache``. No energy constant can be measured here (no power meter), so the host
profile has none and an energy estimate on it is refused by name; it exists to validate the time model against
measured step times (``benchmarks/hardware/step_time.py``).

* ``macs_per_second``: a 1024 x 1024 x 1024 fp32 matmul.
* ``efficiency``: a kind's rate over the matmul's: conv (3x3, 64 -> 64 channels, 32 x 32, batch 8), depthwise (3x3,
  192 channels, 32 x 32, batch 8), linear (batch 256, 512 -> 512); ``<kind>_backward``: the same kernels' input and
  weight gradients (two products each); ``other`` / ``other_backward``: train-mode BatchNorm + ReLU on
  8 x 64 x 32 x 32, the bytes the energy model counts for them over the L3 copy bandwidth (elementwise kernels are
  slower than a copy).
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


def _backward_rate(x, w, kw, op, fwd_rate) -> float:  # noqa: ANN001
    """MACs per second of the backward (input and weight gradients: two products the size of the forward's)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        gy = torch.ones_like(op(x, w, **kw))
    macs = gy.numel() * (w[0].numel() if op is F.conv2d else w.shape[1])
    seconds = _best(lambda: op(x, w, **kw).backward(gy)) - macs / fwd_rate  # less the forward
    return 2 * macs / max(seconds, 1e-9)


def _elementwise_seconds(x: torch.Tensor) -> tuple[float, float]:
    """Forward and backward seconds of train-mode BatchNorm + ReLU on ``x`` (the cost model's elementwise rows)."""
    c = x.shape[1]
    xg = x.clone().requires_grad_()
    wb, bb = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)

    def fwd() -> torch.Tensor:
        return F.relu(F.batch_norm(xg, None, None, wb, bb, training=True))

    t_fwd = _best(fwd)
    t_both = _best(lambda: fwd().backward(torch.ones_like(x)))
    return t_fwd, max(t_both - t_fwd, 1e-9)


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
    back = {"conv": (x, w, {"padding": 1}, F.conv2d, conv), "depthwise": (xd, wd, {"padding": 1, "groups": 192},
                                                                            F.conv2d, dw),
            "linear": (xl, wl, {}, F.linear, lin)}
    backward = {k: _backward_rate(*v) for k, v in back.items()}
    xe = torch.randn(8, 64, 32, 32, generator=g)  # 2 MiB: in + out of each op fit the L3 level
    other_fwd, other_bwd = _elementwise_seconds(xe)
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
    # the bytes the energy model counts for BN + ReLU on xe: forward reads in, writes out (x2 ops); backward reads
    # the output's gradient and the saved input, writes the input's gradient (x2 ops)
    n = xe.numel() * 4
    l3 = next((lv for lv in levels if lv["name"] == "l3"), levels[-1])["bandwidth"]["value"]
    other = 2 * 2 * n / l3 / other_fwd
    other_back = 2 * 3 * n / l3 / other_bwd
    kinds = {"conv": "3x3 conv 64->64 at 32x32, batch 8", "depthwise": "3x3 depthwise, 192 channels at 32x32, "
             "batch 8", "linear": "linear 512->512, batch 256"}
    efficiency = {"conv": conv / mm, "depthwise": dw / mm, "linear": lin / mm}
    eff = {k: {"value": v, "source": f"{src}: {kinds[k]}, over the matmul"} for k, v in efficiency.items()}
    eff.update({f"{k}_backward": {"value": backward[k] / mm, "source": f"{src}: input and weight gradients of the "
                                  f"{kinds[k]}, over the matmul"} for k in kinds})
    eff["other"] = {"value": other, "source": f"{src}: BatchNorm (train) + ReLU forward on 8x64x32x32, the bytes "
                    "this model counts over the L3 copy bandwidth"}
    eff["other_backward"] = {"value": other_back, "source": f"{src}: the same ops' backward"}
    return {
        "name": "host", "description": f"this machine ({threads} torch thread(s)): rates measured, no energy constants",
        "compute": {
            "macs_per_second": {"value": mm, "source": f"{src}: 1024^3 fp32 matmul"},
            "efficiency": eff,
            "op_overhead_s": {"value": overhead, "source": f"{src}: per Linear(1, 1) per pass"},
            "step_overhead_s": {"value": max(per_step, 0.0), "source": f"{src}: a whole SGD-momentum step of "
                                "Linear(1, 1) with cross-entropy, less its layer's two passes"},
        },
        "levels": levels,
    }


def host_profile() -> Profile:
    """This machine's profile at the current torch thread count (measured once per process and thread count)."""
    return parse_profile(_measure(torch.get_num_threads()))
