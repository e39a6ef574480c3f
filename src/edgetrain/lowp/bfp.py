"""Block floating point (BFP): a block of values shares one exponent and keeps a few mantissa bits each.

LightNorm (Noh et al., ICCD 2022; spec algorithms_A §7.2) stores the tensors BatchNorm reads and writes in BFP
to cut off-chip traffic; its simulation (BFPSim, ``bfp/internal.py``, FlexBlock-style) groups 32 consecutive
channels at each position (block ``[1, 32, 1, 1]``) and, with ``m`` mantissa bits ("group_mantissa", the leading
one included):

* ``flexblock`` (the simulation's): the block's largest exponent ``E1`` and second largest ``E2`` (of the
  multiset: a tie makes them equal). An element of exponent ``e < E1`` keeps ``m - 1 - (E2 - e)`` fraction bits
  (truncated; none left -> zero), i.e. it lies on the grid of step ``2^(E2 - m + 1)``. The element of exponent
  ``E1`` is kept as it is by the simulation; here it keeps ``m - 1`` fraction bits (grid ``2^(E1 - m + 1)``),
  which is the same whenever the input has at most ``m - 1`` fraction bits, as in LightNorm's configs (fp10 1-5-4
  input, ``m = 5``), and lets it be stored in the same ``m + 1`` bits;
* ``standard``: every element on the grid of the largest exponent, step ``2^(E1 - m + 1)``.

Rounding is truncation toward zero (the simulation's masking) or ``nearest`` (half to even, clamped to the
largest code).
Error bound (tested): ``|x - Q(x)| < step`` (truncate) or ``<= step / 2`` (nearest) for every element, so in the
standard variant ``|x - Q(x)| < 2^(1 - m) * max|block|``.

Blocks run along dimension 1 (channels) at each position of the other dimensions; a last partial block (channel
count not a multiple of the block size) is a smaller block, as in the simulation. Blocks whose largest
exponent field is 0 (zeros, fp32 subnormals) become zeros. Non-finite values pass through :func:`quantize`;
a stored block holding one decodes to NaN (the training has diverged; the NaN is not hidden).

:func:`encode` stores a block-quantised tensor in its real size: one signed ``int8`` code per element
(``m <= 7``; ``int16`` up to 15; a partial block's padding is not stored), and per block the exponent field
``E1`` (``uint8``) and, for flexblock, ``E2`` and the position of the element of exponent ``E1`` (``uint8``):
``1 + 3 / block`` bytes per element at ``m = 5`` (standard: ``1 + 1 / block``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from edgetrain.errors import ConfigError

VARIANTS = ("flexblock", "standard")


@dataclasses.dataclass(frozen=True)
class BFP:
    """A BFP configuration: ``man_bits`` per element (leading one included), ``block`` channels per block."""

    man_bits: int
    block: int = 32
    variant: str = "flexblock"
    rounding: str = "truncate"

    def __post_init__(self) -> None:
        if not (isinstance(self.man_bits, int) and 2 <= self.man_bits <= 15):
            raise ConfigError(f"BFP.man_bits: expected an int in [2, 15], got {self.man_bits!r}")
        if not (isinstance(self.block, int) and self.block >= 2):
            raise ConfigError(f"BFP.block: expected an int >= 2 (channels per block), got {self.block!r}")
        if self.block > 256:
            raise ConfigError(f"BFP.block: at most 256 (positions are stored in one byte), got {self.block}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"BFP.variant: expected one of {list(VARIANTS)}, got {self.variant!r}")
        if self.rounding not in ("truncate", "nearest"):
            raise ConfigError(f"BFP.rounding: expected 'truncate' or 'nearest', got {self.rounding!r}")


def _blocks(t: Tensor, block: int) -> tuple[Tensor, int]:
    """``t`` (channels in dim 1) as ``(N, blocks, block, rest)``, channels zero-padded to whole blocks (a view when
    none is needed); and the pad width."""
    x = t.reshape(t.shape[0], t.shape[1], -1)
    pad = (-t.shape[1]) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], -1, block, x.shape[2]), pad


def _unblocks(b: Tensor, shape: torch.Size, pad: int) -> Tensor:
    x = b.reshape(b.shape[0], -1, b.shape[3])
    if pad:
        x = x[:, : x.shape[1] - pad]
    return x.reshape(shape)


def _field(v: Tensor) -> Tensor:
    """Exponent fields (int32) of fp32 values."""
    return (v.contiguous().view(torch.int32) >> 23) & 0xFF


def _analyse(b: Tensor, cfg: BFP) -> tuple[Tensor, Tensor, Tensor]:
    """Per block ``(N, blocks, rest)``: exponent fields E1 and E2 (int32) and the position of the largest
    magnitude (int64), whose exponent is E1. E2 is the exponent of the second largest magnitude (of the multiset:
    exponents grow with magnitudes), E1 for the standard variant."""
    mag = b.abs()
    top, at = mag.max(2, keepdim=True)
    e1 = _field(top)
    if cfg.variant == "standard":
        return e1.squeeze(2), e1.squeeze(2), at.squeeze(2)
    e2 = _field(mag.scatter_(2, at, -1.0).amax(2, keepdim=True).clamp_(min=0.0))
    return e1.squeeze(2), e2.squeeze(2), at.squeeze(2)


def _pow2(field: Tensor, cfg: BFP, sign: int) -> Tensor:
    """``2^(sign * (E - 127 - m + 1))`` for exponent fields ``field``. Fields 0 (zero blocks, flushed anyway) and 255
    (non-finite blocks, NaN anyway) are read as 127 so that fp32 suffices; float64 only for blocks of tiny normals
    (``E < m``, magnitudes below 2^-122) whose inverse step would overflow fp32."""
    field = torch.where((field == 0) | (field == 255), 127, field)
    k = (field - 127 - cfg.man_bits + 1) * sign
    dtype = torch.float32 if int(k.max()) < 127 else torch.float64
    return torch.pow(2.0, k.to(dtype))


def _codes(b: Tensor, e1: Tensor, e2: Tensor, at: Tensor, cfg: BFP) -> Tensor:
    """Integer-valued codes (float) ``|code| <= 2^m - 1``: every element on the E2 grid, the largest magnitude on the
    E1 grid (the same grid when E1 == E2); truncated toward zero, or rounded half to even and clamped."""
    top = 2.0 ** cfg.man_bits - 1
    inv2 = _pow2(e2, cfg, -1).unsqueeze(2)
    q = b.to(inv2.dtype) * inv2
    q = q.trunc_() if cfg.rounding == "truncate" else q.round_()
    q = q.clamp_(-top, top).masked_fill_((e2 == 0).unsqueeze(2), 0.0)  # zeros and fp32 subnormals flush
    big = b.gather(2, at.unsqueeze(2)).to(inv2.dtype) * _pow2(e1, cfg, -1).unsqueeze(2)
    big = big.trunc_() if cfg.rounding == "truncate" else big.round_()
    big = big.clamp_(-top, top).masked_fill_((e1 == 0).unsqueeze(2), 0.0)
    return q.scatter_(2, at.unsqueeze(2), big)


def _values(codes: Tensor, e1: Tensor, e2: Tensor, at: Tensor, cfg: BFP) -> Tensor:
    """fp32 values of codes ``(N, blocks, block, rest)``."""
    v = codes.to(torch.float32) * _pow2(e2, cfg, 1).to(torch.float32).unsqueeze(2)
    big = codes.gather(2, at.unsqueeze(2)).to(torch.float32) * _pow2(e1, cfg, 1).to(torch.float32).unsqueeze(2)
    v = v.scatter_(2, at.unsqueeze(2), big)
    special = e1 == 255  # a block holding inf or NaN
    if bool(special.any()):
        v = v.masked_fill(special.unsqueeze(2), float("nan"))
    return v


def quantize(t: Tensor, cfg: BFP) -> Tensor:
    """``t`` block-quantised (same shape and dtype; computed in fp32). Non-finite values pass through."""
    if t.dim() < 2:
        raise ValueError(f"BFP blocks run along dimension 1; got a tensor of shape {tuple(t.shape)}")
    x = t.to(torch.float32)
    b, pad = _blocks(x, cfg.block)
    e1, e2, at = _analyse(b, cfg)
    out = _unblocks(_values(_codes(b, e1, e2, at, cfg), e1, e2, at, cfg), x.shape, pad)
    if bool((e1 == 255).any()):
        out = torch.where(torch.isfinite(x), out, x)
    return out if t.dtype == torch.float32 else out.to(t.dtype)


@dataclasses.dataclass
class Encoded:
    """A BFP tensor at its stored size: codes (int8/int16) without the padding of a partial block, per-block
    exponent fields and positions (uint8)."""

    codes: Tensor
    e1: Tensor
    e2: Tensor
    at: Tensor | None
    shape: torch.Size
    pad: int

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.e1, self.e2, self.at) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def encode(t: Tensor, cfg: BFP) -> Encoded:
    """``t`` block-quantised and stored: :func:`decode` gives back exactly :func:`quantize`'s values."""
    b, pad = _blocks(t.to(torch.float32), cfg.block)
    e1, e2, at = _analyse(b, cfg)
    codes = _codes(b, e1, e2, at, cfg).to(torch.int8 if cfg.man_bits <= 7 else torch.int16)
    codes = codes.reshape(codes.shape[0], -1, codes.shape[3])
    codes = codes[:, : codes.shape[1] - pad].contiguous() if pad else codes
    if cfg.variant == "standard":  # one grid: no second exponent, no position
        return Encoded(codes, e1.to(torch.uint8), None, None, t.shape, pad)
    return Encoded(codes, e1.to(torch.uint8), e2.to(torch.uint8), at.to(torch.uint8), t.shape, pad)


def decode(enc: Encoded, cfg: BFP) -> Tensor:
    """fp32 values of an :class:`Encoded` tensor."""
    codes = torch.nn.functional.pad(enc.codes, (0, 0, 0, enc.pad)) if enc.pad else enc.codes
    codes = codes.view(codes.shape[0], -1, cfg.block, codes.shape[2])
    e1 = enc.e1.to(torch.int32)
    e2 = e1 if enc.e2 is None else enc.e2.to(torch.int32)
    at = torch.zeros_like(e1, dtype=torch.int64) if enc.at is None else enc.at.to(torch.int64)
    return _unblocks(_values(codes, e1, e2, at, cfg), enc.shape, enc.pad)
