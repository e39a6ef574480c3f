"""Bit packing: exact round trips, real byte counts, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.compress.bitpack import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask
from edgetrain.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8
    assert packed.untyped_storage().nbytes() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), v)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_extreme_values_and_layout(bits):
    top = 2**bits - 1
    v = torch.full((16,), top, dtype=torch.uint8)
    assert torch.equal(pack_bits(v, bits), torch.full((16 * bits // 8,), 255, dtype=torch.uint8))
    one = torch.zeros(8 // bits, dtype=torch.uint8)
    one[1] = 1  # value 1 lives at bit `bits` of byte 0 (little-endian within the byte)
    assert pack_bits(one, bits).tolist() == [1 << bits]


def test_non_contiguous_and_offset_input():
    v = torch.randint(0, 4, (40, 7), dtype=torch.uint8)
    view = v[3:, 1:].t()  # a strided view with a storage offset
    assert torch.equal(unpack_bits(pack_bits(view, 2), 2, view.numel()), view.reshape(-1))


def test_mask_is_one_bit_per_element():
    m = torch.rand(3, 5, 7) > 0.5
    packed = pack_mask(m)
    assert packed.numel() == math.ceil(105 / 8)
    assert torch.equal(unpack_mask(packed, m.shape), m)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="bits must be one of"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ConfigError, match="must be uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int32), 2, 16)
    with pytest.raises(ConfigError, match="cannot hold"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 2, 17)
    with pytest.raises(ConfigError, match="expects a bool"):
        pack_mask(torch.zeros(4))
