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

Rounding is truncation toward zero (the simulation's masking) or ``nearest`` (clamped to the largest code).
Error bound (tested): ``|x - Q(x)| < step`` (truncate) or ``<= step / 2`` (nearest) for every element, so in the
standard variant ``|x - Q(x)| < 2^(1 - m) * max|block|``.

Blocks run along dimension 1 (channels) at each position of the other dimensions; a last partial block (channel
count not a multiple of the block size) is a smaller block, as in the simulation. Blocks whose largest
exponent field is 0 (zeros, fp32 subnormals) become zeros. Non-finite values pass through :func:`quantize`;
a stored block holding one decodes to NaN (the training has diverged; the NaN is not hidden).

:func:`encode` stores a block-quantised tensor in its real size: one signed ``int8`` code per element
(``m <= 7``; ``int16`` up to 15), and per block the exponent fields ``E1``, ``E2`` (``uint8``) and, for flexblock,
the position of the element of exponent ``E1`` (``uint8``): ``1 + 3 / block`` bytes per element at ``m = 5``.
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
    """``t`` (fp32, channels in dim 1) as ``(positions, blocks, block)``, zero-padded; and the pad width."""
    x = t.movedim(1, -1)  # (..., C)
    c = x.shape[-1]
    pad = (-c) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(-1, (c + pad) // block, block), pad


def _unblocks(b: Tensor, shape: torch.Size, pad: int) -> Tensor:
    x = b.reshape(*shape[:1], *shape[2:], -1)
    if pad:
        x = x[..., : x.shape[-1] - pad]
    return x.movedim(-1, 1).reshape(shape)


def _fields(b: Tensor) -> Tensor:
    return (b.contiguous().view(torch.int32) >> 23) & 0xFF


def _analyse(b: Tensor, cfg: BFP) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per block: exponent fields E1, E2 (int32), the position of an element of exponent E1 (int64); and each
    element's grid field (E1 for the elements of exponent E1, else E2)."""
    e = _fields(b)
    top = e.topk(2, dim=-1)
    e1, e2, at = top.values[..., 0], top.values[..., 1], top.indices[..., 0]
    if cfg.variant == "standard":
        e2 = e1
    grid = torch.where(e == e1.unsqueeze(-1), e1.unsqueeze(-1), e2.unsqueeze(-1))
    return e1, e2, at, grid


def _step(grid: Tensor, cfg: BFP) -> Tensor:
    """The grid step ``2^(E - 127 - m + 1)`` of exponent fields ``grid`` (fp32; subnormal for tiny blocks)."""
    return torch.pow(2.0, (grid - 127 - cfg.man_bits + 1).to(torch.float32))


def _codes(b: Tensor, grid: Tensor, cfg: BFP) -> Tensor:
    """Signed integer codes of ``b`` on the grids of exponent fields ``grid``, ``|code| <= 2^m - 1``: the
    significand shifted right, in integers (exact, no overflow for any fp32 exponent). Truncated, or rounded half
    up (``nearest``) and clamped."""
    bits = b.contiguous().view(torch.int32)
    e = (bits >> 23) & 0xFF
    sig = torch.where(e > 0, (bits & 0x7FFFFF) | (1 << 23), torch.zeros_like(bits))
    shift = (grid - e + 24 - cfg.man_bits).clamp_(0, 31)  # >= 9: an element's exponent never exceeds its grid's
    if cfg.rounding == "nearest":
        sig = sig + (1 << (shift - 1))
    q = (sig >> shift).clamp_(max=2 ** cfg.man_bits - 1)
    return torch.where(bits < 0, -q, q)


def quantize(t: Tensor, cfg: BFP) -> Tensor:
    """``t`` block-quantised (same shape and dtype; computed in fp32). Non-finite values pass through."""
    x = t.to(torch.float32)
    if x.dim() < 2:
        raise ValueError(f"BFP blocks run along dimension 1; got a tensor of shape {tuple(t.shape)}")
    b, pad = _blocks(x, cfg.block)
    _, _, _, grid = _analyse(b, cfg)
    q = _codes(b, grid, cfg).to(torch.float32) * _step(grid, cfg)
    out = _unblocks(q, x.shape, pad)
    out = torch.where(torch.isfinite(x), out, x)
    return out if t.dtype == torch.float32 else out.to(t.dtype)


@dataclasses.dataclass
class Encoded:
    """A BFP tensor at its stored size: codes (int8/int16), per-block exponent fields and positions (uint8)."""

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
    """``t`` block-quantised and stored: :func:`decode` gives back exactly :func:`quantize`'s values. The codes of
    a partial block's padding are not stored."""
    b, pad = _blocks(t.to(torch.float32), cfg.block)
    e1, e2, at, grid = _analyse(b, cfg)
    codes = _codes(b, grid, cfg).reshape(b.shape[0], -1)
    codes = codes[:, : codes.shape[1] - pad] if pad else codes
    dtype = torch.int8 if cfg.man_bits <= 7 else torch.int16
    flex = cfg.variant == "flexblock"
    return Encoded(codes.to(dtype).contiguous(), e1.to(torch.uint8), e2.to(torch.uint8),
                   at.to(torch.uint8) if flex else None, t.shape, pad)


def decode(enc: Encoded, cfg: BFP) -> Tensor:
    """fp32 values of an :class:`Encoded` tensor."""
    codes = torch.nn.functional.pad(enc.codes, (0, enc.pad)) if enc.pad else enc.codes
    codes = codes.view(enc.e1.shape[0], enc.e1.shape[1], -1)
    e1, e2 = enc.e1.to(torch.int32).unsqueeze(-1), enc.e2.to(torch.int32).unsqueeze(-1)
    grid = e2.expand(codes.shape).clone()
    if enc.at is not None:
        grid.scatter_(-1, enc.at.to(torch.int64).unsqueeze(-1), e1)
    values = codes.to(torch.float32) * _step(grid, cfg)
    values = torch.where(e1 == 255, torch.full_like(values, float("nan")), values)  # a non-finite input: NaN
    return _unblocks(values, enc.shape, enc.pad)
