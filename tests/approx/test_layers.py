"""ApproxLinear / ApproxConv2d: forward and both gradients vs a slow per-element reference with the same products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetrain.approx import ApproxConv2d, ApproxLinear, amul, approx_conv2d, approx_linear, build_lut, get_lut
from edgetrain.errors import ConfigError


def close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, k: int) -> None:
    """fp32 accumulation of k products: |got - ref| <= (k + 1) 2^-24 sum|p| (ref, mag in float64)."""
    err = (got.double() - ref).abs()
    bound = (k + 1) * 2.0**-24 * mag + 1e-30
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def first_operand(a, b, M):
    """Non-commutative model (mantissa of the first operand): checks the operand order of every GEMM."""
    return a, 0 * b


@pytest.mark.parametrize("lut", [get_lut("mitchell", 7), build_lut(first_operand, 6)],
                         ids=["mitchell", "noncommutative"])
def test_linear_forward_and_gradients_match_per_element_reference(lut):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, requires_grad=True)
    w = torch.randn(5, 9, generator=g, requires_grad=True)
    bias = torch.randn(5, generator=g, requires_grad=True)
    gy = torch.randn(6, 5, generator=g)
    y = approx_linear(x, w, bias, lut)
    y.backward(gy)
    xs, ws = x.detach(), w.detach()
    # per-element products, explicit index loops (a = activation / output gradient, b = weight / output gradient)
    y_ref = torch.zeros(6, 5, dtype=torch.float64)
    y_mag = torch.zeros_like(y_ref)
    gx_ref, gx_mag = torch.zeros(6, 9, dtype=torch.float64), torch.zeros(6, 9, dtype=torch.float64)
    gw_ref, gw_mag = torch.zeros(5, 9, dtype=torch.float64), torch.zeros(5, 9, dtype=torch.float64)
    for n in range(6):
        for o in range(5):
            for i in range(9):
                p = amul(xs[n, i], ws[o, i], lut).double()
                y_ref[n, o] += p
                y_mag[n, o] += p.abs()
                q = amul(gy[n, o], ws[o, i], lut).double()
                gx_ref[n, i] += q
                gx_mag[n, i] += q.abs()
                r = amul(xs[n, i], gy[n, o], lut).double()
                gw_ref[o, i] += r
                gw_mag[o, i] += r.abs()
    close(y.detach() - bias.detach(), y_ref, y_mag, 9)
    close(x.grad, gx_ref, gx_mag, 5)
    close(w.grad, gw_ref, gw_mag, 6)
    torch.testing.assert_close(bias.grad, gy.sum(0))
    # the test has teeth: exact products are far outside the bound
    assert not torch.allclose(x.grad, gy @ ws, rtol=1e-3, atol=1e-3)


def conv_reference(x, w, gy, stride, padding, dilation, groups, lut):
    """Direct (index-arithmetic) convolution with per-element approximate products, and its two gradients."""
    n, cin, h, wd = x.shape
    cout, cig, kh, kw = w.shape
    _, _, ho, wo = gy.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    y = torch.zeros(n, cout, ho, wo, dtype=torch.float64)
    ym = torch.zeros_like(y)
    gxp = torch.zeros(xp.shape, dtype=torch.float64)
    gxm = torch.zeros_like(gxp)
    gw = torch.zeros(w.shape, dtype=torch.float64)
    gwm = torch.zeros_like(gw)
    cog = cout // groups
    for co in range(cout):
        grp = co // cog
        for c in range(cig):
            ci = grp * cig + c
            for i in range(kh):
                for j in range(kw):
                    r0, c0 = i * dilation[0], j * dilation[1]
                    rows = slice(r0, r0 + stride[0] * (ho - 1) + 1, stride[0])
                    cols = slice(c0, c0 + stride[1] * (wo - 1) + 1, stride[1])
                    patch = xp[:, ci, rows, cols]  # (N, Ho, Wo)
                    p = amul(patch, w[co, c, i, j].expand_as(patch), lut).double()
                    y[:, co] += p
                    ym[:, co] += p.abs()
                    q = amul(gy[:, co], w[co, c, i, j].expand_as(patch), lut).double()
                    gxp[:, ci, rows, cols] += q
                    gxm[:, ci, rows, cols] += q.abs()
                    r = amul(patch, gy[:, co], lut).double()
                    gw[co, c, i, j] += r.sum()
                    gwm[co, c, i, j] += r.abs().sum()
    crop = lambda t: t[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd]  # noqa: E731
    return (y, ym), (crop(gxp), crop(gxm)), (gw, gwm)


@pytest.mark.parametrize("name", ["mbm", "mitchell", "noncommutative"])
@pytest.mark.parametrize("stride,padding,dilation,groups", [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2)])
def test_conv_forward_and_gradients_match_per_element_reference(name, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(1)
    lut = build_lut(first_operand, 6) if name == "noncommutative" else get_lut(name, 7)
    x = torch.randn(2, 4, 7, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 2, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    y = approx_conv2d(x, w, b, stride, padding, dilation, groups, lut)
    assert y.shape == F.conv2d(x, w, b, stride, padding, dilation, groups).shape
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    (yr, ym), (gxr, gxm), (gwr, gwm) = conv_reference(x.detach(), w.detach(), gy, stride, padding, dilation,
                                                      groups, lut)
    cig = 4 // groups
    close(y.detach() - b.detach().view(1, -1, 1, 1), yr, ym, cig * 6)
    close(x.grad, gxr, gxm, 6 * 6)
    close(w.grad, gwr, gwm, y[:, 0].numel())
    torch.testing.assert_close(b.grad, gy.sum((0, 2, 3)))
    exact = torch.autograd.grad(F.conv2d(x, w, b, stride, padding, dilation, groups), w, gy)[0]
    assert not torch.allclose(w.grad, exact, rtol=1e-3, atol=1e-3)


def test_modules_run_and_reject_non_fp32():
    lin = ApproxLinear(4, 3, multiplier="mbm", mantissa_bits=5)
    conv = ApproxConv2d(2, 3, 3, padding=1, multiplier="trunc_exact")
    assert lin(torch.randn(2, 4)).shape == (2, 3)
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 3, 5, 5)
    assert "mbm" in repr(lin)
    with pytest.raises(ConfigError, match="float32"):
        lin(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="float32"):
        conv.double()(torch.randn(1, 2, 5, 5, dtype=torch.float64))


def test_trunc_exact_layer_tracks_the_exact_layer():
    torch.manual_seed(0)
    conv = ApproxConv2d(3, 8, 3, padding=1, multiplier="trunc_exact", mantissa_bits=11)
    x = torch.randn(2, 3, 8, 8)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=2e-3, atol=2e-3)


def test_conv_padding_modes_same_and_deepcopy():
    import copy

    torch.manual_seed(1)
    conv = ApproxConv2d(2, 3, 3, padding="same", padding_mode="reflect", multiplier="trunc_exact", mantissa_bits=11)
    x = torch.randn(1, 2, 6, 6)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), ref, rtol=2e-3, atol=2e-3)
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.zero_()
    torch.testing.assert_close(twin(x), conv.bias.detach().view(1, -1, 1, 1).expand(1, 3, 6, 6))
    torch.testing.assert_close(conv(x), ref, rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError, match="asymmetric"):
        ApproxConv2d(2, 3, 4, padding="same")
