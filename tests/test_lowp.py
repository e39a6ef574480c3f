"""Low-bit floats and block floating point (edgetrain.lowp) against exhaustive and reference encoders."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.errors import ConfigError
from edgetrain.lowp import bfp
from edgetrain.lowp.formats import FORMATS, cast, decode, encode, get_format, representable

SMALL = [f for f in FORMATS.values() if f.bits <= 16]
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_every_code_round_trips_and_every_value_is_a_fixed_point(fmt):
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    exp = (codes >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    man = codes & ((1 << fmt.man_bits) - 1)
    canonical = codes[(exp != 0) | (man == 0)].to(torch.int16)  # no subnormal codes: the formats flush them
    values = decode(canonical, fmt)
    finite = torch.isfinite(values)
    assert torch.equal(encode(values, fmt)[finite], canonical[finite])
    assert torch.equal(_bits(cast(values[finite], fmt)), _bits(values[finite]))
    assert torch.isnan(values[~finite]).sum() == (1 << fmt.man_bits) * 2 - 2  # all-ones exponent, mantissa != 0
    assert len(representable(fmt)) == 2 * ((2 ** fmt.exp_bits - 2) * 2 ** fmt.man_bits) + 1


def _table_truncate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The largest representable magnitude <= |x| (flush below the smallest normal, saturate above the largest)."""
    pos = table[table > 0].double()
    mag = x.double().abs()
    i = torch.searchsorted(pos, mag, right=True) - 1
    out = torch.where(i < 0, torch.zeros_like(mag), pos[i.clamp(min=0)])
    return (torch.sign(x.double()) * out).float()


def _table_nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The nearest representable magnitude, ties to the even mantissa; below the smallest normal: flush when the
    rounded magnitude is below it; above the largest: saturate."""
    pos = table[table > 0].double()
    mag = x.double().abs()
    i = torch.searchsorted(pos, mag, right=True) - 1
    lo = torch.where(i < 0, torch.zeros_like(mag), pos[i.clamp(min=0)])
    hi = pos[(i + 1).clamp(max=len(pos) - 1)]
    even_lo = ((_bits(lo.float()) >> (23 - FMT_NEAREST.man_bits)) & 1) == 0
    pick_hi = (mag - lo > hi - mag) | ((mag - lo == hi - mag) & ~even_lo)
    out = torch.where(pick_hi & (i + 1 < len(pos)), hi, lo)
    out = torch.where(mag >= pos[-1], pos[-1], out)
    return (torch.sign(x.double()) * out).float()


FMT_NEAREST = FORMATS["fp10_154"]


@settings(max_examples=60, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=64), st.sampled_from(["fp10_154", "fp10_163", "fp8_143", "fp12_165"]))
def test_truncation_is_the_largest_representable_below(values, name):
    fmt = FORMATS[name]
    x = torch.tensor(values, dtype=torch.float32)
    got, want = cast(x, fmt), _table_truncate(x, representable(fmt))
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e5, max_value=1e5, width=32, allow_nan=False), min_size=1, max_size=64))
def test_nearest_rounds_half_to_even(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = cast(x, FMT_NEAREST, "nearest")
    want = _table_nearest(x, representable(FMT_NEAREST))
    # below the smallest normal both flush or round up to it: nearest may give the smallest normal, the table 0
    tiny = x.abs() < 2.0 ** FMT_NEAREST.emin
    assert torch.equal(got[~tiny], want[~tiny])


@pytest.mark.parametrize("name,native", [("fp16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_nearest_equals_torchs_own_conversion_in_the_normal_range(name, native):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-12, 14, (100_000,), generator=g).float())
    x = x[x.abs() >= 2.0 ** fmt.emin]
    assert torch.equal(_bits(cast(x, fmt, "nearest")), _bits(x.to(native).float()))


def test_truncation_is_the_simulations_bit_mask_within_range():
    """BFPSim's fp10_154: ``v & (0x80000000 | exponent bits | top-4 mantissa mask)`` for in-range exponents."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-12, 14, (50_000,), generator=g).float())
    x = x[(x.abs() >= 2.0 ** -14) & (x.abs() < 2.0 ** 16)]  # the exponent range where the simulation's clamp is a no-op
    mask = -(1 << 31) | 0x7F800000 | ((0xFFFFFFFF << (23 - 4)) & 0x007FFFFF)
    sim = (_bits(x) & mask).view(torch.float32)
    assert torch.equal(_bits(cast(x, FORMATS["fp10_154"])), _bits(sim))


def test_specials_flush_and_saturate():
    f = FORMATS["fp10_154"]
    x = torch.tensor([1e-9, -1e-9, 1e9, -1e9, math.inf, -math.inf, math.nan, 0.0])
    y = cast(x, f)
    largest = (2 - 2 ** -4) * 2.0 ** 15
    assert y[:2].tolist() == [0.0, 0.0] and y[2].item() == largest and y[3].item() == -largest
    assert y[4].item() == math.inf and y[5].item() == -math.inf and math.isnan(y[6].item())
    assert torch.isnan(decode(encode(y, f), f)[6])


def test_unknown_format_is_one_line():
    with pytest.raises(ConfigError, match="unknown floating-point format 'fp11'.*fp10_154"):
        get_format("fp11")


# ------------------------------------------------------------------------------------------------ BFP
def _reference_bfp(x: torch.Tensor, cfg: bfp.BFP) -> torch.Tensor:
    """A slow per-block encoder on the int32 bit patterns, as the module docstring states the rule (BFPSim's
    ``make_groups_4d_internal`` with the stated difference for elements of the largest exponent)."""
    m = cfg.man_bits
    xs = x.movedim(1, -1).reshape(-1, x.shape[1]).clone()
    bits = xs.view(torch.int32)
    for row in range(bits.shape[0]):
        for start in range(0, bits.shape[1], cfg.block):
            blk = bits[row, start:start + cfg.block]
            e = [(int(v) >> 23) & 0xFF for v in blk]
            top = sorted(e, reverse=True) + [0]
            e1, e2 = top[0], (top[0] if cfg.variant == "standard" else top[1])
            for j, v in enumerate(blk.tolist()):
                grid = e1 if e[j] == e1 else e2
                keep = m - 1 - (grid - e[j])  # fraction bits kept
                if e1 == 0 or keep < 0 or e[j] == 0:
                    blk[j] = 0 if v >= 0 else -(1 << 31)
                else:
                    blk[j] = v & ~((1 << (23 - keep)) - 1)
    return xs.reshape(*x.shape[:1], *x.shape[2:], x.shape[1]).movedim(-1, 1)


@pytest.mark.parametrize("variant", bfp.VARIANTS)
@pytest.mark.parametrize("channels,block", [(8, 4), (10, 4), (6, 32)])
def test_bfp_equals_the_reference_encoder(variant, channels, block):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(3, channels, 2, 2, generator=g) * torch.exp2(torch.randint(-6, 6, (3, channels, 2, 2),
                                                                              generator=g).float())
    x[0, 0] = 0.0  # zeros in a block
    cfg = bfp.BFP(5, block, variant)
    assert torch.equal(bfp.quantize(x, cfg), _reference_bfp(x, cfg))  # -0.0 == 0.0


blocks = st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=80, deadline=None)
@given(blocks, st.integers(2, 7), st.sampled_from(bfp.VARIANTS), st.sampled_from(["truncate", "nearest"]),
       st.integers(2, 16))
def test_bfp_error_bound_and_storage(values, m, variant, rounding, block):
    """|x - Q(x)| < step (truncate) or <= step / 2 (nearest), step = 2^(E - m + 1) of the element's grid; and the
    stored form decodes to exactly the quantised values."""
    x = torch.tensor(values, dtype=torch.float32).view(1, -1)
    cfg = bfp.BFP(m, block, variant, rounding)
    q = bfp.quantize(x, cfg)
    enc = bfp.encode(x, cfg)
    assert torch.equal(bfp.decode(enc, cfg), q)
    assert enc.codes.dtype == torch.int8 and enc.codes.abs().max() <= 2 ** m - 1
    b, pad = bfp._blocks(x, block)
    e1, e2, at = bfp._analyse(b, cfg)
    grid = e2.unsqueeze(2).expand(b.shape).scatter(2, at.unsqueeze(2), e1.unsqueeze(2))
    step = bfp._unblocks(bfp._pow2(grid, cfg, 1).float(), x.shape, pad).reshape(-1)
    err = (x - q).abs().reshape(-1).double()
    clamped = q.abs().reshape(-1) == (2 ** m - 1) * step  # nearest rounding clamped at the largest code
    if rounding == "truncate":
        assert bool((err < step.double()).all())
    else:
        assert bool((err[~clamped] <= step.double()[~clamped] / 2).all()) and bool((err < step.double()).all())
    if variant == "standard":  # the whole block on its largest exponent's grid
        big = torch.nn.functional.pad(x.abs(), (0, (-x.numel()) % block)).view(-1, block).amax(1)
        assert bool((err.view(1, -1) < 2.0 ** (1 - m) * big.repeat_interleave(block)[: x.numel()]
                     .double() + 1e-45).all())


def test_bfp_is_the_identity_on_values_it_can_hold_and_idempotent():
    x = torch.tensor([[1.0, 1.5, -1.25, 1.875], [0.5, 0.25, -0.75, 0.375]]).T.contiguous()  # blocks along dim 1
    cfg = bfp.BFP(4, 2, "flexblock")
    assert torch.equal(bfp.quantize(x, cfg), x)
    y = torch.randn(4, 64, 3)
    q = bfp.quantize(y, bfp.BFP(5))
    assert torch.equal(bfp.quantize(q, bfp.BFP(5)), q)


def test_bfp_stores_about_one_byte_per_element():
    x = torch.randn(8, 64, 4, 4)
    enc = bfp.encode(x, bfp.BFP(5, 32))
    assert enc.nbytes == x.numel() + 3 * x.numel() // 32
    part = torch.randn(8, 24, 4, 4)  # a partial block: its padding is not stored
    assert bfp.encode(part, bfp.BFP(5, 32)).nbytes == part.numel() + 3 * 8 * 16


def test_bfp_non_finite_is_not_hidden_and_bad_configs_are_one_line():
    x = torch.ones(1, 4)
    x[0, 1] = math.inf
    assert bfp.quantize(x, bfp.BFP(5, 4))[0, 1] == math.inf
    assert torch.isnan(bfp.decode(bfp.encode(x, bfp.BFP(5, 4)), bfp.BFP(5, 4))).all()
    for kwargs, msg in [(dict(man_bits=1), "man_bits"), (dict(man_bits=5, block=1), "block"),
                        (dict(man_bits=5, variant="x"), "variant")]:
        with pytest.raises(ConfigError, match=msg):
            bfp.BFP(**kwargs)
