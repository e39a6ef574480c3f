"""Gradient filtering against plain PyTorch (radius 1) and a slow loop reference of the spec's math."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.measure import SavedTensorMeter, measure
from edgetrain.techniques.gradient_filter import FilteredConv2d, estimate_conv, patch_geometry


def slow_reference(x, w, b, stride, padding, groups, r, g, correct=False):
    """The spec's formulas (algorithms_A.md §2.2) with explicit loops over patches and pixels."""
    n, cin, h, wd = x.shape
    cout, cin_g = w.shape[:2]
    ho, wo = g.shape[-2:]
    (ph, pw), (rh, rw), (pxh, pxw), (pgh, pgw) = patch_geometry(h, wd, ho, wo, r, stride)
    gbar = torch.zeros(n, cout, ph, pw, dtype=x.dtype)
    xsum = torch.zeros(n, cin, ph, pw, dtype=x.dtype)
    for i, j in itertools.product(range(ph), range(pw)):
        r0, c0 = max(0, i * r - pgh), max(0, j * r - pgw)
        r1, c1 = min(ho, i * r - pgh + r), min(wo, j * r - pgw + r)
        gbar[:, :, i, j] = g[:, :, r0:r1, c0:c1].mean((2, 3))  # average of the valid elements only
        a0, b0 = max(0, i * rh - pxh), max(0, j * rw - pxw)
        a1, b1 = min(h, i * rh - pxh + rh), min(wd, j * rw - pxw + rw)
        xsum[:, :, i, j] = x[:, :, a0:a1, b0:b1].sum((2, 3))
    wsum = w.sum((2, 3))
    cout_g = cout // groups
    gx = torch.zeros_like(x)
    for a, bb in itertools.product(range(h), range(wd)):
        i, j = (a + pxh) // rh, (bb + pxw) // rw
        for ci in range(cin):
            grp = ci // cin_g
            cos = range(grp * cout_g, (grp + 1) * cout_g)
            gx[:, ci, a, bb] = sum(wsum[co, ci % cin_g] * gbar[:, co, i, j] for co in cos)
    gw = torch.zeros_like(w)
    for co in range(cout):
        grp = co // cout_g
        for cl in range(cin_g):
            gw[co, cl] = (gbar[:, co] * xsum[:, grp * cin_g + cl]).sum()
    s = 1.0 / (stride[0] * stride[1]) if correct else 1.0
    return gx * s, gw * s, (g.sum((0, 2, 3)) if b is not None else None)


CASES = [  # (cin, cout, k, stride, padding, groups, hw, r)
    (4, 6, 3, 1, 1, 1, 7, 2),  # dense 3x3, non-divisible 7x7 map
    (4, 6, 3, 2, 1, 1, 9, 2),  # stride 2
    (6, 6, 3, 1, 1, 6, 8, 4),  # depthwise
    (6, 12, 3, 2, 1, 6, 7, 2),  # depthwise with channel multiplier 2, stride 2
    (4, 6, 3, 1, 1, 2, 6, 2),  # general grouped conv (groups=2)
    (8, 4, 1, 1, 0, 1, 7, 4),  # pointwise 1x1
    (4, 4, 1, 2, 0, 1, 8, 7),  # strided 1x1, radius 7
    (3, 5, 5, 1, 2, 1, 7, 2),  # 5x5, odd padding
]


@pytest.mark.parametrize("cin,cout,k,s,p,groups,hw,r", CASES)
@pytest.mark.parametrize("correct", [False, True])
def test_filtered_conv_equals_slow_reference(cin, cout, k, s, p, groups, hw, r, correct):
    g0 = torch.Generator().manual_seed(cin * 100 + k * 10 + r)
    x = torch.randn(2, cin, hw, hw, dtype=torch.float64, generator=g0, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64, generator=g0, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=g0, requires_grad=True)
    y = FilteredConv2d.apply(x, w, b, (s, s), (p, p), groups, r, correct)
    torch.testing.assert_close(y, F.conv2d(x, w, b, s, p, 1, groups))  # forward unchanged
    g = torch.randn(y.shape, dtype=torch.float64, generator=g0)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    rx, rw, rb = slow_reference(x.detach(), w.detach(), b, (s, s), (p, p), groups, r, g, correct)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)


def test_formula_with_radius_1_on_pointwise_conv_is_exact():
    """r = 1 on a 1x1 stride-1 conv: nothing is approximated, so the filtered formulas equal autograd."""
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    y = FilteredConv2d.apply(x, w, None, (1, 1), (0, 0), 1, 1, False)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), g)
    ref = torch.autograd.grad(F.conv2d(x, w), (x, w), g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_pointwise_filtered_gradient_equals_exact_backprop_of_the_averaged_gradient():
    """For 1x1 stride-1 convs the method is exactly backprop of the patch-constant ḡ (spec §2.2)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    y = FilteredConv2d.apply(x, w, None, (1, 1), (0, 0), 1, 4, False)
    g = torch.randn_like(y)
    gbar = F.avg_pool2d(g, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    for a, r in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(F.conv2d(x, w), (x, w), gbar)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).double()


def test_radius_1_technique_equals_plain_training_of_the_same_layers():
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    a, b = _model(), _model()
    et.apply_(a, et.GradientFilter(radius=1, last_n_convs=2), x)
    et.apply_(b, et.Freeze(targets=["3", "6"]), x)  # same trainable convs, frozen BatchNorms, exact
    for m in (a, b):
        F.cross_entropy(m(x), y).backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_protocol_freezes_below_the_filtered_convs():
    m = _model()
    et.apply_(m, et.GradientFilter(radius=2, last_n_convs=2), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == ["11.bias", "11.weight", "3.weight", "6.weight"]


def test_saved_bytes_match_the_estimate():
    m = _model().float()
    x = torch.randn(8, 3, 16, 16)
    et.apply_(m, et.GradientFilter(radius=2, last_n_convs=2), x)
    with SavedTensorMeter(m) as meter:
        m(x)
    # conv "3": depthwise 3x3 stride 2 on (8, 8, 16, 16) -> 8x8 output; conv "6": 1x1 on (8, 8, 8, 8)
    e3 = estimate_conv((8, 8, 16, 16), (8, 1, 3, 3), (8, 8), (2, 2), 8, 2, input_grad=False)
    e6 = estimate_conv((8, 8, 8, 8), (16, 8, 1, 1), (8, 8), (1, 1), 1, 2)
    assert meter.by_module["3"] == e3["saved_bytes"] == 8 * 8 * 4 * 4 * 4  # first trainable conv: x̃ only
    # x̃ only: θ̃ is summed from the weight (a parameter, not counted) in backward
    assert meter.by_module["6"] == e6["saved_bytes"] == 8 * 8 * 4 * 4 * 4
    assert "0" not in meter.by_module  # frozen conv below the filtered ones saves nothing
    assert e6["plain_saved_bytes"] == 4 * e6["saved_bytes"]  # (r s)^2 = 4 times smaller input


def test_filtering_saves_memory_against_plain_training_of_the_same_convs():
    m = _model().float()
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    plain = measure(m, batch, recipe=et.Freeze(targets=["3", "6"]), repeats=1)
    filt = measure(m, batch, recipe=et.GradientFilter(radius=4, last_n_convs=2), repeats=1)
    assert filt.saved_by_module["3"] < plain.saved_by_module["3"] / 10
    assert filt.saved_by_module["6"] < plain.saved_by_module["6"] / 10
    assert filt.saved_bytes < plain.saved_bytes
    assert filt.grad_bytes == plain.grad_bytes  # same trainable parameters


def test_estimate_counts_macs():
    e = estimate_conv((32, 960, 7, 7), (320, 960, 1, 1), (7, 7), (1, 1), 1, 4)
    assert e["plain_backward_macs"] == 2 * 32 * 320 * 960 * 49
    assert e["backward_macs"] == 2 * 32 * 320 * 960 * 4  # 2x2 patches of a 7x7 map at r = 4


@pytest.mark.parametrize("kw,match", [({"radius": 3}, "radius"), ({"last_n_convs": 0}, "last_n_convs"),
                                      ({"stride_correction": 1}, "stride_correction")])
def test_bad_configs(kw, match):
    with pytest.raises(et.ConfigError, match=f"GradientFilter.{match}"):
        et.GradientFilter(**kw)


def test_unsupported_layers_are_clear_errors():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(et.ConfigError, match="dilated conv"):
        et.apply_(m, et.GradientFilter(last_n_convs=1), x)
    with pytest.raises(et.ConfigError, match="last_n_convs: 5 > the model's 1 conv2d layers"):
        et.apply_(m, et.GradientFilter(last_n_convs=5), x)
    with pytest.raises(et.ConfigError, match="select no conv2d layer"):
        et.apply_(m, et.GradientFilter(targets=["1"]), x)


def test_a_filtered_dense_3x3_conv_never_saves_more_than_a_plain_one():
    """At batch 1 on a 2x2 map a 512x512 3x3 conv's input is 8 KiB; a saved θ̃ would be 1 MiB."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 2, 2, requires_grad=True)
    with SavedTensorMeter(conv) as plain:  # parameters excluded in both
        conv(x)
    et.apply_(conv, et.GradientFilter(radius=4, last_n_convs=1, classifier=False), x.detach())
    with SavedTensorMeter(conv) as filt:
        y = conv(x)
    assert plain.total_bytes == 64 * 2 * 2 * 4
    assert filt.total_bytes == 64 * 4  # x̃: one patch per channel
    y.sum().backward()  # θ̃ from the weight in backward
    assert conv.weight.grad is not None and x.grad is not None
