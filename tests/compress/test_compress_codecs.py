"""Codecs and the saved-tensor compressor: round trips, unbiased rounding, real payload bytes, dedupe."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from edgetrain.compress import GroupQuantCodec, IdentityCodec, SavedCompressor, masked_activation, quant_payload_bytes
from edgetrain.compress.codec import compress_scopes
from edgetrain.errors import ConfigError
from edgetrain.ops import Undo
from edgetrain.measure import SavedTensorMeter


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([4, 64, 256]), n=st.integers(1, 4),
       d=st.integers(1, 600), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
@example(bits=1, group=4, n=2, d=421, scale=1.0, seed=9253)  # a narrow group far from zero: the bf16 range widens
def test_group_quant_round_trip_within_one_level(bits, group, n, d, scale, seed):
    torch.manual_seed(seed)
    x = torch.randn(n, d) * scale
    codec = GroupQuantCodec(bits, group)
    p = codec.encode(x)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    # every element lies within one quantisation level of its group's (bf16-widened) range; groups are per row,
    # or over the flattened tensor when a row is shorter than a group
    rows = x if d >= group else x.reshape(1, -1)
    width = rows.shape[1]
    groups = torch.nn.functional.pad(rows, (0, (-width) % group)).reshape(-1, group)
    # the range is stored in bf16 rounded outward: each end moves by at most one bf16 ulp of its own magnitude
    # (<= 2^-7 |v|), which is large against a narrow range far from zero (found by hypothesis: seed 9253)
    lo, hi = groups.amin(1), groups.amax(1)
    rng = (hi - lo) + 2**-7 * (lo.abs() + hi.abs()) + 1e-30
    step = (rng / (2**bits - 1)).repeat_interleave(group).reshape(len(rows), -1)[:, :width].reshape(n, d)
    assert ((y - x).abs() <= step * (1 + 1e-5) + 1e-6 * scale).all()
    assert p.nbytes == quant_payload_bytes(tuple(x.shape), bits, group)


def test_group_quant_is_exact_on_grid_values_and_constants():
    codec = GroupQuantCodec(2, 4, noise="none")
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]])
    assert torch.equal(codec.decode(codec.encode(x)), x)


@pytest.mark.parametrize("noise", ["pool", "independent"])
def test_stochastic_rounding_is_unbiased(noise):
    # mean of K decodes -> x; per-element std <= step/2, so the mean's std <= step / (2 sqrt(K)).
    # Tolerance: 5 standard deviations of the mean (the noise is seeded, so the test is deterministic).
    torch.manual_seed(0)
    x = torch.randn(2, 256)
    codec = GroupQuantCodec(2, 256, noise=noise)
    k = 800
    acc = torch.zeros_like(x)
    for _ in range(k):
        acc += codec.decode(codec.encode(x))
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 3
    err = (acc / k - x).abs()
    assert (err <= 5 * step / (2 * k**0.5)).all()
    biased = GroupQuantCodec(2, 256, noise="none")  # round-to-nearest is biased: the test can fail
    assert ((biased.decode(biased.encode(x)) - x).abs() > 5 * step / (2 * k**0.5)).any()


def test_two_bit_payload_is_sixteenth_of_fp32_plus_stats():
    x = torch.randn(8, 16, 16, 16)
    p = GroupQuantCodec(2).encode(x)
    assert p.nbytes == x.numel() // 4 + 4 * x.numel() // 256  # 2 bits + two bf16 stats per 256 elements
    assert p.ratio == pytest.approx(32 / 2.125)


def test_codec_errors():
    with pytest.raises(ConfigError, match="GroupQuantCodec.bits"):
        GroupQuantCodec(3)
    with pytest.raises(ConfigError, match="GroupQuantCodec.noise"):
        GroupQuantCodec(2, noise="gauss")
    with pytest.raises(ConfigError, match="floating-point"):
        GroupQuantCodec(2).encode(torch.ones(4, 4, dtype=torch.int64))


def test_compressor_dedupes_and_reports_payload_to_the_meter():
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    comp = SavedCompressor(lambda: [*a.parameters(), *b.parameters()], min_bytes=1024)
    codec = GroupQuantCodec(2, 64)
    undo = Undo()
    comp.codec = codec
    compress_scopes(a, comp, [""], undo)
    compress_scopes(b, comp, [""], undo)
    x = torch.randn(32, 64, requires_grad=True)
    with SavedTensorMeter(exclude=[*a.parameters(), *b.parameters()]) as meter:
        out = a(x) + b(x)  # both layers save the same input x: encoded once
    assert comp.encoded_bytes == x.numel() * 4
    assert meter.total_bytes == comp.payload_bytes == quant_payload_bytes((32, 64), 2, 64)
    out.sum().backward()
    assert a.weight.grad is not None and x.grad is not None
    undo.remove()
    assert not a._forward_pre_hooks and not a._forward_hooks


def test_compressor_passes_small_tensors_and_parameters_through():
    lin = nn.Linear(8, 8)
    comp = SavedCompressor(lambda: list(lin.parameters()), min_bytes=10**6, codec=IdentityCodec())
    compress_scopes(lin, comp, [""], Undo())
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum().backward()
    assert comp.encoded_bytes == 0
    assert meter.total_bytes == x.numel() * 4  # the input, counted through account_saved


@pytest.mark.parametrize("kind,lo,hi", [("relu", -3, 3), ("relu6", -3, 9)])
def test_masked_activation_gradcheck(kind, lo, hi):
    torch.manual_seed(0)
    x = (torch.rand(3, 37, dtype=torch.float64) * (hi - lo) + lo)
    x = x[(x.abs() > 1e-3) & ((x - 6).abs() > 1e-3)].reshape(-1).requires_grad_()  # away from the kinks
    assert torch.autograd.gradcheck(lambda t: masked_activation(t, kind), (x,))


def test_masked_activation_saves_one_bit_and_matches_stock_gradients():
    x = (torch.randn(4, 64) * 4).requires_grad_()
    with SavedTensorMeter() as meter:
        y = masked_activation(x, "relu6")
    assert meter.total_bytes == x.numel() // 8
    y.sum().backward()
    ref = torch.autograd.grad(torch.nn.functional.relu6(x).sum(), x)[0]
    assert torch.equal(x.grad, ref)


def test_hardswish_step_mask_and_errors():
    x = torch.linspace(-5, 5, 101, requires_grad=True)
    masked_activation(x, "hardswish", threshold=0.5).sum().backward()
    assert torch.equal(x.grad, (x > 0.5).float())
    with pytest.raises(ConfigError, match="kind must be one of"):
        masked_activation(x, "gelu")
    with pytest.raises(ConfigError, match="relu6_mode"):
        masked_activation(x, "relu6", relu6_mode="soft")



@pytest.mark.parametrize("kind,lo,hi,slope", [("hardtanh", -1.0, 1.0, 0.0), ("leaky_relu", 0.0, 0.0, 0.1),
                                              ("hardsigmoid", 0.0, 0.0, 0.0)])
def test_exact_masks_gradcheck_and_equal_stock(kind, lo, hi, slope):
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64) * 4
    x = x[((x.abs() - 1).abs() > 1e-3) & (x.abs() > 1e-3) & ((x.abs() - 3).abs() > 1e-3)].requires_grad_()
    fn = lambda t: masked_activation(t, kind, lo=lo, hi=hi, slope=slope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    stock = {"hardtanh": lambda t: torch.nn.functional.hardtanh(t, lo, hi),
             "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, slope),
             "hardsigmoid": torch.nn.functional.hardsigmoid}[kind]
    g = torch.randn(x.shape, dtype=torch.float64)
    assert torch.equal(fn(x), stock(x))
    assert torch.equal(torch.autograd.grad(fn(x), x, g)[0], torch.autograd.grad(stock(x), x, g)[0])


def test_in_place_activation_keeps_in_place_semantics():
    """``x.relu_()`` masked: the caller's tensor is changed, and gradients flow through the mask."""
    from edgetrain.compress.masks import mask_ops

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            h.relu_()  # in place, the return value ignored
            return h * 2

    torch.manual_seed(0)
    m, x = M(), torch.randn(4, 8)
    ref = m(x)
    gref = torch.autograd.grad(ref.sum(), m.lin.weight)[0]
    undo = Undo()
    mask_ops(m, undo)
    with SavedTensorMeter(m) as meter:
        out = m(x)
    assert undo.hits == 1 and torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out.sum(), m.lin.weight)[0], gref)
    assert meter.total_bytes == x.numel() * 4 + 4  # the linear's input and the 32-bit mask (4 bytes)
    undo.remove()
