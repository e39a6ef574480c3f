"""Frozen-layer ops that save nothing a frozen weight does not need.

Stock PyTorch saves a conv's full input for backward even when its weight is frozen (DESIGN.md, "Memory
truths"; measured in ``tests/techniques/test_frozen_ops.py``), and BatchNorm saves its input even in eval
mode. A frozen layer that still has to pass gradients to earlier trainable layers needs neither:

* conv (1-, 2- or 3-d, any padding the model passes): ``dL/dx = conv_transpose(dL/dy, W)`` needs only ``W``
  (a parameter, already resident), and a trainable bias needs only ``dL/dy``;
* BatchNorm with frozen statistics and scale is the affine map ``y = x * s + t`` with constant ``s``,
  which saves nothing (only ``t = beta - mean * s`` may carry a gradient, to ``beta``).

Both act on the ops (:mod:`edgetrain.ops`): every ``conv*d`` call in the model whose weight is frozen and whose
input needs a gradient, and every ``batch_norm`` call made inside a frozen module. Used by Freeze, BiasOnly,
SparseUpdate, GradientFilter and MobileTL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.ops import Call, Undo, intercept

CONV_OPS = ("conv1d", "conv2d", "conv3d")
#: attribute on a per-call float copy of a stored weight (Int8Frozen's dequantised weight): the parameter it stands
#: for, so that handlers that know layers by their weight (FrozenInference's folds) still recognise the call
WEIGHT_OF = "_edgetrain_weight_of"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


def conv_args(call: Call) -> tuple:
    """``(x, weight, bias, stride, padding, dilation, groups)`` of a ``conv*d`` call, as passed."""
    return (call.args[0], call.arg(1, "weight"), call.arg(2, "bias"), call.arg(3, "stride", 1),
            call.arg(4, "padding", 0), call.arg(5, "dilation", 1), call.arg(6, "groups", 1))


def explicit_padding(x: Tensor, weight: Tensor, padding, dilation) -> tuple[Tensor, tuple[int, ...]]:  # noqa: ANN001
    """Turn string padding (``"same"``/``"valid"``) into an explicitly padded input and integer padding, as
    PyTorch computes it (``"same"`` with an odd total puts the extra element last)."""
    nd = weight.dim() - 2
    if not isinstance(padding, str):
        return x, tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * nd
    if padding == "valid":
        return x, (0,) * nd
    dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * nd
    total = [d * (k - 1) for d, k in zip(dil, weight.shape[2:])]
    if all(t % 2 == 0 for t in total):
        return x, tuple(t // 2 for t in total)
    pad: list[int] = []
    for t in reversed(total):  # F.pad lists the last dimension first
        pad += [t // 2, t - t // 2]
    return F.pad(x, pad), (0,) * nd


class FrozenWeightConv(torch.autograd.Function):
    """conv1d/2d/3d whose weight gets no gradient: saves the weight (a parameter) and the input's shape only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):  # type: ignore[override]
        nd = weight.dim() - 2
        ctx.conv = (x.shape, stride, padding, dilation, groups, nd)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return _CONV[nd](x, weight, bias, stride, padding, dilation, groups)  # (N, C_out, *spatial')

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, nd = ctx.conv
        if ctx.needs_input_grad[1]:
            raise RuntimeError("FrozenWeightConv used on a conv whose weight requires grad")
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _CONV_INPUT[nd](shape, weight, grad, stride, padding, dilation, groups)
        dims = (0, *range(2, grad.dim()))
        gb = grad.sum(dims) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None, None, None


# backward-compatible name (2-d was the only case once)
FrozenWeightConv2d = FrozenWeightConv


def frozen_conv(call: Call):  # noqa: ANN201
    """Handler: a conv with a frozen weight whose input needs a gradient keeps only the weight."""
    x, w, b, stride, padding, dilation, groups = conv_args(call)
    if not (torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad and isinstance(w, Tensor)
            and not w.requires_grad and x.dim() == w.dim()):
        return NotImplemented
    x, padding = explicit_padding(x, w, padding, dilation)
    return FrozenWeightConv.apply(x, w, b, stride, padding, dilation, groups)


def affine_bn(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Eval-statistics BatchNorm ``x * s + t``: keeps nothing of activation size for backward."""
    scale = torch.rsqrt(var + eps)  # (C,)
    if weight is not None:
        scale = scale * weight.detach()  # the scale is frozen: no graph through it
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias  # (C,) a trainable beta gets dL/dbeta = sum(dL/dy)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (x * scale.view(view)).add_(shift.view(view))  # the shift added in place: one buffer, not two


def frozen_bn(frozen: Callable[[Call], bool]) -> Callable[[Call], object]:
    """Handler: a ``batch_norm`` call ``frozen(call)`` accepts, whose scale is frozen, runs with its running
    statistics in train mode too and saves nothing (the statistics are not updated)."""

    def handle(call: Call):  # noqa: ANN202
        x, mean, var = call.args[0], call.arg(1, "running_mean"), call.arg(2, "running_var")
        weight, bias, training = call.arg(3, "weight"), call.arg(4, "bias"), call.arg(5, "training", False)
        eps = call.arg(7, "eps", 1e-5)
        if mean is None or var is None or (weight is not None and weight.requires_grad) or not frozen(call):
            return NotImplemented
        grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if not (training or grad):
            return NotImplemented  # eval without a graph: stock batch_norm is the same affine map
        return affine_bn(x, mean, var, weight, bias, eps)

    return handle


def keep_batch_count(model: nn.Module, frozen: Callable[[str], bool], undo: Undo) -> set[str]:
    """``nn.BatchNorm`` modules add 1 to ``num_batches_tracked`` in their own forward before calling ``batch_norm``;
    for a frozen one (statistics not updated) the count is put back, so its state stays what it was. Returns the
    set the handler adds a module's name to when it froze one of its calls."""
    froze: set[str] = set()
    for name, m in model.named_modules():
        count = m._buffers.get("num_batches_tracked")
        if count is None or not frozen(name):
            continue
        before: list[Tensor] = []
        pre = m.register_forward_pre_hook(lambda *_, c=count, b=before: b.append(c.clone()))

        def post(*_, c=count, b=before, n=name) -> None:
            value = b.pop()
            if n in froze:
                froze.discard(n)
                c.copy_(value)

        hooks = (pre, m.register_forward_hook(post, always_call=True))
        undo.add(lambda hooks=hooks: [h.remove() for h in hooks])
    return froze


def frozen_bn_ops(model: nn.Module, frozen: Callable[[str], bool], undo: Undo) -> None:
    """The BatchNorm calls inside ``frozen`` modules (with a frozen scale) run on running statistics, save nothing
    and leave the module's state as it was."""
    froze = keep_batch_count(model, frozen, undo)

    def frozen_call(call: Call) -> bool:
        if frozen(call.module):
            froze.add(call.module)
            return True
        return False

    intercept(model, ("batch_norm",), frozen_bn(frozen_call), undo)


def freeze_ops(model: nn.Module, frozen: Callable[[str], bool], undo: Undo) -> None:
    """Give the frozen convs (everywhere) and the BatchNorm calls inside ``frozen`` modules their no-save ops."""
    intercept(model, CONV_OPS, frozen_conv, undo)
    frozen_bn_ops(model, frozen, undo)
