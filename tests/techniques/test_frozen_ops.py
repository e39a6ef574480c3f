"""The no-save frozen forwards against plain PyTorch, and the memory truths they rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.ops import Undo
from edgetrain.techniques._frozen import FrozenWeightConv, affine_bn, freeze_ops

FrozenWeightConv2d = FrozenWeightConv


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
    freeze_ops(model, lambda name: True, undo)
    y, ours = _saved(lambda: model(x))
    assert ours == 0 and undo.hits == 1
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
    undo.remove()
    assert not conv._forward_pre_hooks and not model._forward_hooks


class SameConv(nn.Conv2d):
    """TF-"SAME" padding in its own forward (as timm's Conv2dSame): pads, then calls conv2d with padding 0."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("conv", [
    lambda: SameConv(3, 4, 3, stride=2),
    lambda: nn.Conv2d(3, 4, 4, padding="same"),  # even kernel: asymmetric "same" padding
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv1d(3, 4, 5, padding="same", dilation=2),
    lambda: nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1),
])
def test_frozen_conv_op_equals_the_module_whatever_its_padding(conv):
    """The frozen op acts on the conv call the module makes, so subclass forwards and padding modes are kept."""
    torch.manual_seed(0)
    c = conv().double().requires_grad_(False)
    nd = c.weight.dim() - 2
    x = torch.randn(2, 3, *([9] * nd), dtype=torch.float64, requires_grad=True)
    ref = c(x)
    gy = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, x, gy)[0]
    model = nn.Sequential(c)
    undo = Undo()
    freeze_ops(model, lambda name: True, undo)
    y, saved = _saved(lambda: model(x))
    # reflection padding keeps its own (unpadded) input for backward: stock PyTorch's pad, not the conv's
    pad_saves = x.numel() * 8 if getattr(c, "padding_mode", "zeros") == "reflect" else 0
    assert y.shape == ref.shape and undo.hits == 1 and saved == pad_saves
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], gref, rtol=1e-12, atol=1e-12)
    undo.remove()


def test_frozen_bn_is_eval_bn_and_saves_nothing():
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    bn.double().weight.requires_grad_(False)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    y, saved = _saved(lambda: affine_bn(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    assert saved == 6 * 8  # only the per-channel scale (C,) float64, never the (N, C, H, W) input
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, [x, bn.bias], gy)
    bn.eval()
    y_ref = bn(x)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, [x, bn.bias], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-12, atol=1e-12)
