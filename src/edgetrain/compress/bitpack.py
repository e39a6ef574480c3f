"""Real bit-packing of 1-, 2-, 4- and 8-bit unsigned integers into ``uint8`` (spec algorithms_A §1.3).

``torch.bool`` takes one byte per element, so a "1-bit" mask stored as bool saves only 4x against fp32.
These helpers store ``8 // bits`` values per byte: element ``i`` of a group of ``k = 8 // bits`` values sits
in bits ``[i * bits, (i + 1) * bits)`` of its byte (little-endian within the byte). The packed tensor has
exactly ``ceil(numel * bits / 8)`` bytes; callers keep ``numel`` (or the shape) to unpack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edgetrain.errors import ConfigError

#: Bit widths that divide a byte; the only ones :func:`pack_bits` accepts.
SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bitpack: bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_bits` uses for ``numel`` values of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned integers ``0 <= v < 2**bits`` (any integer or bool dtype, any shape) into a flat uint8 tensor.

    Values are not range-checked (that would cost a pass); out-of-range values corrupt their neighbours.
    """
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.uint8)  # (n,)
    if bits == 8:
        return flat.clone() if flat.data_ptr() == values.data_ptr() else flat
    per = 8 // bits
    word = {1: torch.int64, 2: torch.int32, 4: torch.int16}[bits]  # ``per`` bytes -> one word
    pad = (-flat.numel()) % per
    if pad or flat.storage_offset() % per:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    w = flat.view(word)  # (ceil(n / per),) byte i of a word holds value i (little-endian)
    if bits == 4:
        out = w | (w >> 4)  # value 1 moves from bits 8..11 to 4..7
    else:
        # One multiply gathers the values: value i at bit 8i times 2^(top - (8 - bits) i) lands at
        # bit top + bits * i; the cross terms fall above the word (wrap away) or in distinct lower slots,
        # so they never carry into the top byte.
        top = 8 * per - 8
        magic = sum(1 << (top - (8 - bits) * i) for i in range(per))
        if magic >= 1 << (8 * per - 1):  # reinterpret as the signed word of the same bits
            magic -= 1 << (8 * per)
        out = (w * magic) >> top
    return (out & 0xFF).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` values as a flat uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ConfigError(f"bitpack: packed data must be uint8, got {packed.dtype}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ConfigError(f"bitpack: {packed.numel()} bytes cannot hold {numel} values of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    mask = (1 << bits) - 1
    out = (packed.view(-1, 1) >> shifts) & mask  # (ceil(n / per), per)
    return out.view(-1)[:numel]


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor as 1 bit per element (uint8, ``ceil(numel / 8)`` bytes)."""
    if mask.dtype != torch.bool:
        raise ConfigError(f"bitpack: pack_mask expects a bool tensor, got {mask.dtype}")
    return pack_bits(mask, 1)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    return unpack_bits(packed, 1, math.prod(shape)).view(shape).bool()
