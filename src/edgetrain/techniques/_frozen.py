"""Frozen-layer forwards that save nothing a frozen weight does not need.

Stock PyTorch saves a conv's full input for backward even when its weight is frozen (DESIGN.md, "Memory
truths"; measured in ``tests/techniques/test_frozen_ops.py``), and BatchNorm saves its input even in eval
mode. A frozen layer that still has to pass gradients to earlier trainable layers needs neither:

* conv: ``dL/dx = conv_transpose(dL/dy, W)`` needs only ``W`` (a parameter, already resident), and a
  trainable bias needs only ``dL/dy``;
* BatchNorm with frozen statistics and scale is the affine map ``y = x * s + t`` with constant ``s``,
  which saves nothing (only ``t = beta - mean * s`` may carry a gradient, to ``beta``).

Used by :mod:`~edgetrain.techniques.freeze` and :mod:`~edgetrain.techniques.bias_only`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, patch_forward


class FrozenWeightConv2d(torch.autograd.Function):
    """conv2d whose weight gets no gradient: saves the weight (a parameter) and the input's shape only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (N, C_out, H', W')

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        if ctx.needs_input_grad[1]:
            raise RuntimeError("FrozenWeightConv2d used on a conv whose weight requires grad")
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None, None, None


def frozen_conv_forward(conv: nn.Conv2d) -> Callable[[Tensor], Tensor] | None:
    """A forward for ``conv`` that uses :class:`FrozenWeightConv2d`, or ``None`` if the conv is unsupported
    (string padding or a non-zero padding mode keep the stock forward)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None

    def forward(x: Tensor) -> Tensor:
        return FrozenWeightConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    return forward


def frozen_bn_forward(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor], Tensor] | None:
    """An eval-statistics BatchNorm forward ``x * s + t`` (saves nothing), or ``None`` without running stats."""
    if bn.running_mean is None or bn.running_var is None:
        return None

    def forward(x: Tensor) -> Tensor:
        scale = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()  # the scale is frozen: no graph through it
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias  # (C,) a trainable beta gets dL/dbeta = sum(dL/dy)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)

    return forward


def patch_frozen(model: nn.Module, names: list[str], undo: Undo) -> list[str]:
    """Give the frozen Conv2d / BatchNorm modules among ``names`` their no-save forwards; returns the patched names.

    A conv is patched only if its weight is frozen; a BatchNorm only if its weight is frozen (its running
    statistics are then frozen too: the layer behaves as in eval mode, in train mode as well).
    """
    modules = dict(model.named_modules())
    patched = []
    for name in names:
        m = modules[name]
        fwd = None
        if isinstance(m, nn.Conv2d) and not m.weight.requires_grad:
            fwd = frozen_conv_forward(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.weight is None or not m.weight.requires_grad):
            fwd = frozen_bn_forward(m)
        if fwd is not None:
            patch_forward(m, fwd, undo)
            patched.append(name)
    return patched
