"""AMSim: element-wise approximate multiplication of fp32 tensors through a mantissa-product LUT.

ApproxTrain (Gong, Saadat, Gamaarachchi, Javaid, Hu, Parameswaran; arXiv:2209.04161 §III-B, the CUDA device
function in ``cuda/AMsimulator.inl``; spec ``algorithms_B.md`` §1.3). Format: an fp32 container holding
(sign, exponent, mantissa) = (1, 8, M). Per product:

* sign: XOR; exponent: ``ea + eb - 127 + carry`` (integer, exact); mantissa: ``LUT[(ia << M) | ib]`` where
  ``ia``, ``ib`` are the operands' top M mantissa bits (**truncated**, not rounded).

Special values (ours; upstream gets zero and overflow wrong, spec §1.6):

* NaN in either operand -> NaN (always the canonical quiet NaN ``0x7FC00000``);
* ±inf x (±0 or subnormal) -> NaN; ±inf x finite non-zero -> ±inf;
* zero **and subnormal** operands are zero (denormals-are-zero, as upstream flushes them): the product is an
  exact ±0 with the XOR sign (upstream returns a tiny non-zero for ``0 * b`` with ``|b| >= 2``);
* exponent overflow (``ea + eb - 127 + carry >= 255``) -> ±inf (upstream wraps into the sign bit);
* underflow (``<= 0``, a subnormal or smaller result) -> ±0 (flush-to-zero). Upstream flushes when
  ``ea + eb <= 127`` *before* the carry; we keep the normal result ``2^-126 * 1.m`` when the carry lifts it.

:func:`amul` is the vectorised int32 implementation; :func:`amul_scalar` is the slow, independent
per-element Python model (it calls the functional model directly, no LUT) used as the golden reference.
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import Tensor

from edgetrain.approx.lut import LUT
from edgetrain.approx.multipliers import Model
from edgetrain.errors import ConfigError

SIGN = -(1 << 31)  # 0x80000000 as int32
INF_BITS = 0x7F800000
NAN_BITS = 0x7FC00000  # canonical quiet NaN


def check_fp32(*tensors: Tensor, what: str = "approximate multiply") -> None:
    """One-line ConfigError unless every tensor is float32 (AMSim simulates an fp32-container format)."""
    for t in tensors:
        if t.dtype != torch.float32:
            raise ConfigError(f"{what}: needs float32 tensors (an fp32 container of the (1, 8, M) format), "
                              f"got {t.dtype}")


def truncate(x: Tensor, M: int) -> Tensor:
    """``x`` with its mantissa truncated to M bits (toward zero): the operand the approximate multiplier sees."""
    check_fp32(x, what="truncate")
    keep = -(1 << (23 - M))  # 0xFFFFFFFF << (23 - M) as int32
    return (x.view(torch.int32) & keep).view(torch.float32)


def amul(a: Tensor, b: Tensor, lut: LUT) -> Tensor:
    """Approximate product ``a * b`` (broadcasting) through ``lut``; float32 in, float32 out, bit-exact."""
    check_fp32(a, b)
    a, b = torch.broadcast_tensors(a, b)
    M = lut.M
    ua, ub = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    ea, eb = (ua >> 23) & 0xFF, (ub >> 23) & 0xFF
    mask = (1 << M) - 1
    idx = (((ua >> (23 - M)) & mask) << M) | ((ub >> (23 - M)) & mask)
    entry = lut.bits[idx]  # (carry << 23) | (mant << (23 - M))
    e = ea + eb - 127
    ef = e + (entry >> 23)  # final biased exponent
    sign = (ua ^ ub) & SIGN
    out = sign | ((e.clamp(0, 254) << 23) + entry)  # 254 << 23 + entry < 2^31: no int32 overflow
    out = torch.where(ef <= 0, sign, out)  # underflow: flush to ±0
    out = torch.where(ef >= 255, sign | INF_BITS, out)  # overflow: ±inf
    out = torch.where((ea == 0) | (eb == 0), sign, out)  # zero or subnormal operand: exact ±0
    special = (ea == 255) | (eb == 255)  # inf or NaN operand
    if bool(special.any()):
        daz = lambda t, e_: torch.where(e_ == 0, t * 0.0, t)  # noqa: E731  (subnormal -> ±0)
        ieee = (daz(a, ea) * daz(b, eb)).view(torch.int32)  # inf*0 -> NaN, inf*x -> ±inf, NaN -> NaN
        ieee = torch.where(torch.isnan(ieee.view(torch.float32)), torch.full_like(ieee, NAN_BITS), ieee)
        out = torch.where(special, ieee, out)
    return out.view(torch.float32)


# --------------------------------------------------------------------------------------------- scalar golden model
def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def amul_scalar_bits(ua: int, ub: int, fn: Model, M: int) -> int:
    """The documented semantics for one pair of fp32 bit patterns, calling the functional model ``fn``."""
    s = ((ua ^ ub) >> 31) << 31
    ea, eb = (ua >> 23) & 0xFF, (ub >> 23) & 0xFF
    fa, fb = ua & 0x7FFFFF, ub & 0x7FFFFF
    if (ea == 255 and fa) or (eb == 255 and fb):
        return NAN_BITS
    if ea == 255 or eb == 255:
        return NAN_BITS if ea == 0 or eb == 0 else s | INF_BITS
    if ea == 0 or eb == 0:
        return s
    mant, carry = fn(fa >> (23 - M), fb >> (23 - M), M)
    e = ea + eb - 127 + int(carry)
    if e >= 255:
        return s | INF_BITS
    if e <= 0:
        return s
    return s | (e << 23) | (int(mant) << (23 - M))


def amul_scalar(a: Any, b: Any, fn: Model, M: int) -> float:
    """Per-element reference: ``a * b`` as the approximate multiplier computes it (Python floats)."""
    return bits_f32(amul_scalar_bits(f32_bits(float(a)), f32_bits(float(b)), fn, M))
