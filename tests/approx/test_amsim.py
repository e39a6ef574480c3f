"""AMSim element-wise multiply: bit-identity with the per-element functional model, special values, LUTs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.approx import MULTIPLIERS, amul, build_lut, get_lut, mbm, mitchell, trunc_exact, truncate
from edgetrain.approx.amsim import NAN_BITS, amul_scalar_bits
from edgetrain.errors import ConfigError

NAMES = sorted(MULTIPLIERS)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def from_bits(u: torch.Tensor) -> torch.Tensor:
    return u.to(torch.int64).to(torch.int32).view(torch.float32) if u.dtype != torch.int32 else u.view(torch.float32)


def pack(sign, exp, mant) -> torch.Tensor:
    """fp32 tensor from int64 sign/exponent/23-bit mantissa fields."""
    u = (sign << 31) | (exp << 23) | mant
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)  # wrap to int32


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, name: str, M: int) -> None:
    got = bits(amul(a, b, get_lut(name, M))).tolist()
    fn = MULTIPLIERS[name]
    ua, ub = bits(a).tolist(), bits(b).tolist()
    want = [amul_scalar_bits(x & 0xFFFFFFFF, y & 0xFFFFFFFF, fn, M) for x, y in zip(ua, ub)]
    got = [g & 0xFFFFFFFF for g in got]
    bad = [(i, hex(ua[i] & 0xFFFFFFFF), hex(ub[i] & 0xFFFFFFFF), hex(g), hex(w))
           for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{name} M={M}: {len(bad)} mismatches, first {bad[:3]}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("M", [1, 3, 5, 7])
def test_exhaustive_mantissa_pairs_bit_identical(name, M):
    """Every (ia, ib) pair, random low (truncated) bits, and a grid of signs and exponents incl. the range edges."""
    g = torch.Generator().manual_seed(M)
    ia = torch.arange(1 << M).repeat_interleave(1 << M)
    ib = torch.arange(1 << M).repeat(1 << M)
    low = lambda: torch.randint(0, 1 << (23 - M), ia.shape, generator=g)  # noqa: E731  (dropped by truncation)
    exps = [(127, 127), (1, 126), (1, 127), (126, 1), (200, 180), (254, 1), (190, 190), (60, 68), (0, 130), (255, 3)]
    for k, (ea, eb) in enumerate(exps if M <= 5 else exps[:4]):
        sa, sb = torch.randint(0, 2, ia.shape, generator=g), torch.randint(0, 2, ia.shape, generator=g)
        a = pack(sa, torch.full_like(ia, ea), (ia << (23 - M)) | low())
        b = pack(sb, torch.full_like(ib, eb), (ib << (23 - M)) | low())
        assert_bit_identical(a, b, name, M)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=200),
       st.sampled_from(NAMES), st.sampled_from([2, 7, 11]))
def test_random_bit_patterns_bit_identical(pairs, name, M):
    """Any 32-bit patterns (normals, subnormals, zeros, inf, NaN payloads) match the scalar model."""
    ua = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    ub = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    a = (ua - ((ua >> 31) << 32)).to(torch.int32).view(torch.float32)
    b = (ub - ((ub >> 31) << 32)).to(torch.int32).view(torch.float32)
    assert_bit_identical(a, b, name, M)


def test_random_normals_m7_bit_identical():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, generator=g) * 3, torch.randn(20000, generator=g) / 7
    for name in NAMES:
        assert_bit_identical(a, b, name, 7)


@pytest.mark.parametrize("name", NAMES)
def test_special_values(name):
    lut = get_lut(name, 7)
    inf, nan = math.inf, math.nan
    sub = 1e-40  # subnormal: treated as zero (denormals-are-zero)
    big, tiny = 2.0**127, 2.0**-100
    a = torch.tensor([0.0, -0.0, 0.0, 3.0, sub, -sub, inf, -inf, inf, nan, 2.0, big, -big, tiny, 0.0, inf, 1.5])
    b = torch.tensor([5.0, 5.0, -7.0, -0.0, 2.0, 4.0, 0.0, 2.0, -sub, 1.0, nan, big, 4.0, tiny, 1e30, -inf, 1.5])
    out = amul(a, b, lut)
    ob = [u & 0xFFFFFFFF for u in bits(out).tolist()]
    assert ob[0] == 0x00000000 and ob[1] == 0x80000000 and ob[2] == 0x80000000 and ob[3] == 0x80000000  # exact ±0
    assert ob[4] == 0x00000000 and ob[5] == 0x80000000  # subnormal operand -> ±0
    assert ob[6] == NAN_BITS and ob[8] == NAN_BITS  # inf * 0 and inf * subnormal -> NaN
    assert out[7].item() == -inf  # -inf * 2
    assert ob[9] == NAN_BITS and ob[10] == NAN_BITS  # NaN propagates (canonical)
    assert out[11].item() == inf and out[12].item() == -inf  # exponent overflow -> ±inf (upstream wraps)
    assert ob[13] == 0  # underflow -> +0 (flush to zero)
    assert ob[14] == 0  # 0 * 1e30: exact zero (upstream returns ~|b| 2^-127)
    assert out[15].item() == -inf
    assert 1.5 * 1.5 * 0.85 < out[16].item() <= 2.25 * 1.01


def test_carry_lifts_a_product_out_of_underflow():
    """ea + eb - 127 == 0 with a carry is the normal number 2^-126 * 1.m (upstream flushes it)."""
    a = torch.tensor([1.875 * 2.0**-63])
    b = torch.tensor([1.875 * 2.0**-63])  # product 3.5 * 2^-126 = 1.75 * 2^-125
    for name in NAMES:
        out = amul(a, b, get_lut(name, 7)).item()
        assert out >= 2.0**-126, name


def test_truncation_not_rounding():
    x = torch.tensor([1.0 + 255 / 256])  # 1.11111111b: 8 fraction bits
    assert truncate(x, 7).item() == 1.0 + 127 / 128
    lut = get_lut("trunc_exact", 7)
    assert amul(x, torch.tensor([1.0]), lut).item() == 1.0 + 127 / 128


def test_trunc_exact_is_truncated_bfloat16():
    """Spec §1.5 test 2: trunc_exact at M=7 equals trunc16(trunc16(a) * trunc16(b)) on normal products."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50000, generator=g), torch.randn(50000, generator=g) * 5
    want = truncate(truncate(a, 7) * truncate(b, 7), 7)  # the 16-bit product is exact in fp32
    assert torch.equal(amul(a, b, get_lut("trunc_exact", 7)), want)


def test_multipliers_differ_and_have_their_known_bias():
    """Upstream issue #1: all LUTs gave identical results. Mitchell <= exact, at most -11.2%; MBM nearly unbiased."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20000, generator=g), torch.randn(20000, generator=g)
    exact = truncate(a, 7).double() * truncate(b, 7).double()
    outs = {n: amul(a, b, get_lut(n, 7)) for n in NAMES}
    assert not torch.equal(outs["mitchell"], outs["mbm"]) and not torch.equal(outs["mbm"], outs["trunc_exact"])
    rel = {n: (o.double() / exact - 1) for n, o in outs.items()}
    assert rel["mitchell"].max() <= 0 and rel["mitchell"].min() >= -0.112
    assert rel["mitchell"].mean() < -0.03  # spec [CHK]: mean -4.29% incl. input truncation
    assert abs(rel["mbm"].mean()) < 0.01 and rel["mbm"].abs().max() < 0.09  # spec [CHK]: mean +0.28%, |err| <= 8.2%
    assert -0.008 < rel["trunc_exact"].mean() < 0 and rel["trunc_exact"].min() > -2.0**-7


def test_build_lut_from_a_scalar_designer_function_matches_builtins():
    def mitchell_scalar(a: int, b: int, M: int) -> tuple[int, int]:
        x = a + b
        if x >= 1 << M:
            return x - (1 << M), 1
        return x, 0

    for M in (1, 4, 6):
        mine, ref = build_lut(mitchell_scalar, M), get_lut("mitchell", M)
        assert torch.equal(mine.bits, ref.bits) and torch.equal(mine.values, ref.values)


def test_vectorised_and_scalar_builtins_agree():
    for fn in (trunc_exact, mitchell, mbm):
        for M in (1, 3, 7):
            lut = get_lut(fn.__name__, M)
            mant, carry = lut.mant_carry
            n = 1 << M
            for i in range(0, n, max(1, n // 16)):
                for j in range(n):
                    assert fn(i, j, M) == (int(mant[i, j]), int(carry[i, j])), (fn.__name__, M, i, j)


def test_lut_errors():
    with pytest.raises(ConfigError, match="mantissa_bits"):
        get_lut("mitchell", 12)
    with pytest.raises(ConfigError, match="mantissa_bits"):
        build_lut(mitchell, 0)
    with pytest.raises(ConfigError, match="unknown multiplier"):
        build_lut("booth", 7)
    with pytest.raises(ConfigError, match="carry"):
        build_lut(lambda a, b, M: (a, 2), 2)
    with pytest.raises(ConfigError, match="mantissa"):
        build_lut(lambda a, b, M: (a + b, 0), 2)
    with pytest.raises(ConfigError, match="float32"):
        amul(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), get_lut("mbm", 7))


def test_lut_m11_size():
    lut = get_lut("trunc_exact", 11)
    assert lut.bits.numel() == 4**11 and lut.bits.dtype == torch.int32
