"""The no-save frozen forwards against plain PyTorch, and the memory truths they rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.apply import Undo
from edgetrain.techniques._frozen import FrozenWeightConv2d, frozen_bn_forward, patch_frozen


def _saved(fn):
    """Bytes of non-parameter tensors saved for backward while running ``fn`` (plain hooks, no dedupe needed)."""
    total = []

    def pack(t):
        if not isinstance(t, nn.Parameter):
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


@pytest.mark.parametrize("stride,padding,dilation,groups,bias", [
    (1, 1, 1, 1, True), (2, 1, 1, 1, False), (1, 0, 1, 1, True), (2, 2, 2, 2, True), (1, 1, 1, 4, True),
])
def test_frozen_conv_gradcheck(stride, padding, dilation, groups, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6 if groups != 4 else 8, 4 // groups, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(w.shape[0], dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    args = (stride, padding, dilation, groups)
    assert torch.autograd.gradcheck(lambda x, b: FrozenWeightConv2d.apply(x, w, b, *args), (x, b))
    # and equal to stock conv2d's gradients
    y = FrozenWeightConv2d.apply(x, w, b, *args)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, [x] + ([b] if bias else []), gy)
    ref = torch.autograd.grad(nn.functional.conv2d(x, w, b, *args), [x] + ([b] if bias else []), gy)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_stock_conv_with_frozen_weight_saves_its_input_and_ours_saves_nothing():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    _, stock = _saved(lambda: conv(x))
    assert stock == x.numel() * 4  # the memory truth: stock PyTorch keeps the full input
    undo = Undo()
    model = nn.Sequential(conv)
    assert patch_frozen(model, ["0"], undo) == ["0"]
    _, ours = _saved(lambda: model(x))
    assert ours == 0
    undo.remove()
    assert "forward" not in conv.__dict__


def test_frozen_bn_is_eval_bn_and_saves_nothing():
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    bn.double().weight.requires_grad_(False)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    fwd = frozen_bn_forward(bn)
    y, saved = _saved(lambda: fwd(x))
    assert saved == 6 * 8  # only the per-channel scale (C,) float64, never the (N, C, H, W) input
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, [x, bn.bias], gy)
    bn.eval()
    y_ref = bn(x)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, [x, bn.bias], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-12, atol=1e-12)


def test_unsupported_convs_keep_the_stock_forward():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding="same"), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    model.requires_grad_(False)
    assert patch_frozen(model, ["0", "1"], Undo()) == []
