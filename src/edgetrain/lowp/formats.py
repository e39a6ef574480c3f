"""Low-bit floating-point formats, emulated on fp32 by bit manipulation.

LightNorm (Noh et al., ICCD 2022; spec algorithms_A §7.2) computes and stores BatchNorm in 10-bit floats: fp10 1-5-4
(sign, exponent, mantissa bits) in the forward pass, fp10 1-6-3 in the backward pass, with 8 extra mantissa bits
for accumulations. Its simulation (BFPSim, ``bfp/internal.py``) casts fp32 tensors by masking their bit pattern;
so does :func:`cast`, on the ``int32`` view of an fp32 tensor:

* the mantissa keeps its top ``man_bits`` bits: ``"truncate"`` (toward zero, the simulation's masking) or
  ``"nearest"`` (round half to even, carrying into the exponent);
* exponents follow IEEE 754's range for the exponent width (bias ``2^(e-1) - 1``; normal exponents
  ``[2 - 2^(e-1), 2^(e-1) - 1]``: fp10 1-5-4 is ``[-14, 15]``, 1-6-3 is ``[-30, 31]``, the spec's ranges);
* a value below the smallest normal flushes to (signed) zero: no subnormals (the simulation has none either);
* a finite value above the largest normal saturates to it; inf and NaN pass through.

Deviation, stated: the simulation "clamps" out-of-range exponents by ANDing the exponent field with the clamped
exponent's bits, which maps such values to unrelated magnitudes; here underflow flushes and overflow saturates.
Within the range the two are bit for bit the same (``tests/test_lightnorm.py``).

A cast value of a format of at most 16 bits is stored as its code in an ``int16`` container (:func:`encode`,
:func:`decode`): sign, biased exponent (0 = zero, all ones = inf/NaN), mantissa, the IEEE layout.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from edgetrain.errors import ConfigError

ROUNDINGS = ("truncate", "nearest")


@dataclasses.dataclass(frozen=True)
class FPFormat:
    """A binary floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits."""

    name: str
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return self.bias

    @property
    def identity(self) -> bool:
        """fp32 itself: casting changes nothing."""
        return self.exp_bits == 8 and self.man_bits == 23

    def plus(self, extra_man_bits: int) -> FPFormat:
        """The accumulation format: ``extra_man_bits`` more mantissa bits (LightNorm's "+8"), at most fp32's 23."""
        man = min(23, self.man_bits + extra_man_bits)
        return FPFormat(f"{self.name}+{man - self.man_bits}", self.exp_bits, man)


#: the formats of LightNorm's simulation (``set_precision``; spec §7.2), by name
FORMATS = {f.name: f for f in (
    FPFormat("fp32", 8, 23),
    FPFormat("bfloat16", 8, 7),
    FPFormat("fp16", 5, 10),
    FPFormat("fp15_168", 6, 8),
    FPFormat("fp12_156", 5, 6),
    FPFormat("fp12_165", 6, 5),
    FPFormat("fp10_154", 5, 4),
    FPFormat("fp10_163", 6, 3),
    FPFormat("fp8_143", 4, 3),
    FPFormat("fp8_152", 5, 2),
)}


def get_format(name: str, owner: str = "format") -> FPFormat:
    """The format called ``name``; an unknown name is a one-line :class:`ConfigError` listing the known ones."""
    if name not in FORMATS:
        raise ConfigError(f"{owner}: unknown floating-point format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


_MAN = (1 << 23) - 1
_SIGN = -(1 << 31)  # 0x80000000 as int32


def cast(t: Tensor, fmt: FPFormat, rounding: str = "truncate") -> Tensor:
    """``t`` (fp32) rounded to the nearest-below (``truncate``) or nearest (``nearest``) value of ``fmt``, as fp32.
    Other dtypes: float64 is cast through fp32; ``fmt`` fp32 returns ``t`` unchanged."""
    if fmt.identity:
        return t
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding: expected one of {list(ROUNDINGS)}, got {rounding!r}")
    bits = t.to(torch.float32).contiguous().view(torch.int32)
    drop = 23 - fmt.man_bits
    mag = bits & 0x7FFFFFFF
    if rounding == "nearest" and drop > 0:
        mag += ((mag >> drop) & 1) + ((1 << (drop - 1)) - 1)  # round half to even; a carry moves into the exponent
    mag &= ~((1 << drop) - 1)
    max_mag = ((fmt.emax + 127) << 23) | (_MAN & ~((1 << drop) - 1))
    out = mag.clamp_(max=max_mag)  # overflow saturates
    out.masked_fill_(out < ((fmt.emin + 127) << 23), 0)  # below the smallest normal: zero
    out |= bits & _SIGN
    special = (bits & 0x7F800000) == 0x7F800000  # inf and NaN keep their bits
    if bool(special.any()):
        out = torch.where(special, bits, out)
    out = out.view(torch.float32)
    return out if t.dtype == torch.float32 else out.to(t.dtype)


def encode(t: Tensor, fmt: FPFormat) -> Tensor:
    """The codes of ``t`` (values of ``fmt``, e.g. from :func:`cast`) in an ``int16`` container (formats of at
    most 16 bits)."""
    if fmt.bits > 16:
        raise ValueError(f"{fmt.name} has {fmt.bits} bits: no 16-bit code")
    bits = t.to(torch.float32).contiguous().view(torch.int32)
    sign = (bits >> 31) & 1
    field = (bits >> 23) & 0xFF
    man = (bits & _MAN) >> (23 - fmt.man_bits)
    top = (1 << fmt.exp_bits) - 1
    exp = torch.where(field == 0, torch.zeros_like(field), field - 127 + fmt.bias)
    exp = torch.where(field == 0xFF, torch.full_like(field, top), exp)
    man = torch.where(field == 0xFF, (man != 0).to(man.dtype), man)  # inf: mantissa 0; NaN: 1
    man = torch.where(field == 0, torch.zeros_like(man), man)
    code = (sign << (fmt.exp_bits + fmt.man_bits)) | (exp << fmt.man_bits) | man
    return code.to(torch.int16) if fmt.bits < 16 else (code - ((code >> 15) << 16)).to(torch.int16)


def decode(code: Tensor, fmt: FPFormat) -> Tensor:
    """fp32 values of ``int16`` codes made by :func:`encode`."""
    c = code.to(torch.int32) & 0xFFFF
    man = c & ((1 << fmt.man_bits) - 1)
    exp = (c >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    sign = (c >> (fmt.exp_bits + fmt.man_bits)) & 1
    top = (1 << fmt.exp_bits) - 1
    field = torch.where(exp == 0, torch.zeros_like(exp), exp - fmt.bias + 127)
    field = torch.where(exp == top, torch.full_like(exp, 0xFF), field)
    m32 = torch.where(exp == 0, torch.zeros_like(man), man << (23 - fmt.man_bits))
    m32 = torch.where(exp == top, (man != 0).to(man.dtype) << 22, m32)  # NaN: a quiet NaN
    return ((sign << 31) | (field << 23) | m32).view(torch.float32)


def representable(fmt: FPFormat) -> Tensor:
    """Every finite value of ``fmt`` with at most 16 bits, once (zero once, as +0), sorted: for exhaustive tests."""
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    exp = (codes >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    man = codes & ((1 << fmt.man_bits) - 1)
    canonical = (exp != (1 << fmt.exp_bits) - 1) & ((exp != 0) | (man == 0))
    values = decode(codes[canonical].to(torch.int16), fmt)
    return torch.unique(torch.where(values == 0, torch.zeros_like(values), values))  # -0 and +0 as one
