"""Lookup tables of approximate mantissa products (ApproxTrain's AMSim LUT, arXiv:2209.04161 §III-B).

For a format with M mantissa bits the approximate mantissa product depends on 2M bits only, so it is
tabulated once: entry ``(a << M) | b`` (the **first** operand is the row, spec §1.3) holds the model's
``(mant, carry)`` for the mantissas ``a`` and ``b``.

Storage (ours, not upstream's uint8 packing, which only works for M <= 7):

* ``bits``: int32 ``(carry << 23) | (mant << (23 - M))``: the pair pre-placed in an fp32 word, so AMSim
  adds it to ``exponent << 23`` in one integer add (the carry lands in the exponent field).
* ``values``: float32 ``(1 + mant / 2^M) * 2^carry`` in ``[1, 4)``, the mantissa product as a number
  (exact in fp32), used by the GEMM kernels.

Sizes: 2^(2M) entries x 8 bytes. M = 11 (the largest the ApproxTrain README lists, and ours):
4 Mi entries, 32 MiB; M = 7: 16,384 entries, 128 KiB.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from edgetrain.approx.multipliers import MULTIPLIERS, Model
from edgetrain.errors import ConfigError

MAX_LUT_BITS = 11  # ApproxTrain README: LUT simulation for M = 1..11 (spec §1.2); 32 MiB of tables here


@dataclasses.dataclass(frozen=True, eq=False)
class LUT:
    """A tabulated multiplier: ``name``, ``M`` and the two views of the table (see the module docstring)."""

    name: str
    M: int
    bits: Tensor  # (2^2M,) int32
    values: Tensor  # (2^M, 2^M) float32, row = first operand's mantissa

    @property
    def mant_carry(self) -> tuple[Tensor, Tensor]:
        """The table as ``(mant, carry)`` int32 tensors of shape ``(2^M, 2^M)``."""
        n = 1 << self.M
        return ((self.bits >> (23 - self.M)) & (n - 1)).view(n, n), (self.bits >> 23).view(n, n)


def _check_m(M: int) -> None:
    if not isinstance(M, int) or isinstance(M, bool) or not 1 <= M <= MAX_LUT_BITS:
        raise ConfigError(f"mantissa_bits: must be an int in 1..{MAX_LUT_BITS} (the LUT holds 4^M entries), got {M!r}")


def _grid(M: int) -> tuple[Tensor, Tensor]:
    a = torch.arange(1 << M, dtype=torch.int64)
    return a.repeat_interleave(1 << M), a.repeat(1 << M)  # row-major (a, b) pairs: index (a << M) | b


def tabulate(fn: Model, M: int) -> tuple[Tensor, Tensor]:
    """``(mant, carry)`` int64 tensors over all ``4^M`` pairs, validated; vectorised models in one call."""
    a, b = _grid(M)
    if getattr(fn, "vectorized", False):
        mant, carry = fn(a, b, M)
        mant, carry = torch.as_tensor(mant, dtype=torch.int64), torch.as_tensor(carry, dtype=torch.int64)
    else:
        pairs = [fn(int(i), int(j), M) for i, j in zip(a.tolist(), b.tolist())]
        mant = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        carry = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    name = getattr(fn, "__name__", repr(fn))
    if mant.shape != a.shape or carry.shape != a.shape:
        raise ConfigError(f"multiplier {name}: returned shapes {tuple(mant.shape)}/{tuple(carry.shape)} for M={M}")
    if bool(((mant < 0) | (mant >= 1 << M)).any()) or bool(((carry != 0) & (carry != 1)).any()):
        raise ConfigError(f"multiplier {name}: mantissa must be in [0, 2^{M}) and carry in {{0, 1}} for M={M}")
    return mant, carry


def build_lut(fn: Model | str, M: int) -> LUT:
    """Tabulate a functional model (or a built-in name: ``trunc_exact``, ``mitchell``, ``mbm``) for M bits."""
    _check_m(M)
    if isinstance(fn, str):
        if fn not in MULTIPLIERS:
            raise ConfigError(f"unknown multiplier {fn!r}; built-in: {', '.join(sorted(MULTIPLIERS))}")
        return get_lut(fn, M)
    mant, carry = tabulate(fn, M)
    bits = ((carry << 23) | (mant << (23 - M))).to(torch.int32)
    values = ((1.0 + mant.double() / (1 << M)) * (1 << carry).double()).float().view(1 << M, 1 << M)
    return LUT(getattr(fn, "__name__", "custom"), M, bits, values)


@functools.lru_cache(maxsize=16)
def get_lut(name: str, M: int) -> LUT:
    """The (cached) table of a built-in multiplier."""
    _check_m(M)
    if name not in MULTIPLIERS:
        raise ConfigError(f"unknown multiplier {name!r}; built-in: {', '.join(sorted(MULTIPLIERS))}")
    lut = build_lut(MULTIPLIERS[name], M)
    return dataclasses.replace(lut, name=name)
