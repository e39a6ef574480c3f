"""Activations whose backward needs only a 1-bit mask, stored bit-packed (8 masks per byte).

Stock ``F.relu`` / ``F.relu6`` / ``F.hardswish`` save a full-precision tensor for backward (algorithms_A
§1.1). Their derivative is, or is approximated by, a 0/1 mask:

* ReLU: ``1[x > 0]`` (exact; PyTorch's ``threshold_backward`` uses the same strict inequality).
* ReLU6 / hardtanh(lo, hi), ``mode="exact"``: ``1[lo < x < hi]`` (exact, as ``hardtanh_backward``);
  ``mode="step"``: ``1[x > threshold]`` (ignores the upper clip; MobileTL's "signed function", §3.2).
* LeakyReLU(slope): ``1[x > 0]`` selects 1 or ``slope`` (exact, as ``leaky_relu_backward``).
* Hardsigmoid: ``1[-3 < x < 3] / 6`` (exact, as ``hardsigmoid_backward``; MobileNetV3's squeeze-excite gate).
* Hardswish: ``1[x > threshold]`` replaces ``h'(x)`` (MobileTL §3.2; approximate by design, only on request).

The forward is always the true activation (in place when the model asks for in place: the Function marks its
input dirty, as PyTorch's own in-place ops do). The packed mask is saved with ``ctx.save_for_backward`` so the
meter (and any enclosing saved-tensor hooks) see its real size, ``ceil(numel / 8)`` bytes.

They act on the ops (:mod:`edgetrain.ops`): :func:`mask_ops` handles every ``relu``/``relu6``/``hardtanh``/
``leaky_relu`` call (functional, method or module alike) whose input needs a gradient; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.compress.bitpack import pack_mask, unpack_mask
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, Undo, intercept

KINDS = ("relu", "relu6", "hardtanh", "leaky_relu", "hardsigmoid", "hardswish")
EXACT_OPS = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "hardsigmoid",
             "hardsigmoid_")
STEP_OPS = ("hardswish", "hardswish_")  # approximate: 1[x > threshold] (MobileTL)
RELU6_MODES = ("exact", "step")
#: PyTorch's ``hardsigmoid_backward`` multiplies by 1/6 rounded to float32, in float64 too (measured, torch 2.13)
_SIXTH = float(torch.tensor(1 / 6, dtype=torch.float32))
#: kept for callers that list maskable module types (the masks act on ops, whatever module calls them)
MASKABLE: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}


def _mask(x: Tensor, kind: str, lo: float, hi: float, threshold: float, mode: str) -> Tensor:
    if kind in ("relu", "leaky_relu"):
        return x > 0
    if kind in ("relu6", "hardtanh") and mode == "exact":
        return (x > lo) & (x < hi)
    if kind == "hardsigmoid":
        return (x > -3) & (x < 3)
    return x > threshold  # relu6 "step", hardswish (MobileTL's step derivative)


def _act(x: Tensor, kind: str, lo: float, hi: float, slope: float, inplace: bool) -> Tensor:
    if kind == "relu":
        return x.relu_() if inplace else F.relu(x)
    if kind in ("relu6", "hardtanh"):
        return F.hardtanh(x, lo, hi, inplace)
    if kind == "leaky_relu":
        return F.leaky_relu(x, slope, inplace)
    if kind == "hardsigmoid":
        return F.hardsigmoid(x, inplace)
    return F.hardswish(x, inplace)


class MaskedActivation(torch.autograd.Function):
    """``y = act(x)``; backward ``dx = dy * mask`` (``slope`` where the mask is 0 for leaky ReLU), with the mask
    stored as packed bits."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, lo: float, hi: float, slope: float, threshold: float,  # type: ignore[override]
                mode: str, inplace: bool) -> Tensor:
        with torch.no_grad():
            packed = pack_mask(_mask(x, kind, lo, hi, threshold, mode))  # (ceil(numel / 8),) uint8
            y = _act(x, kind, lo, hi, slope, inplace)  # same shape as x
        if inplace:
            ctx.mark_dirty(x)
        ctx.shape, ctx.slope = x.shape, slope if kind == "leaky_relu" else 0.0
        ctx.gain = _SIXTH if kind == "hardsigmoid" else 1.0
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        mask = unpack_mask(packed, ctx.shape)  # same shape as grad, bool
        if ctx.slope:
            return torch.where(mask, grad, grad * ctx.slope), None, None, None, None, None, None, None
        gx = grad * mask if ctx.gain == 1.0 else grad * ctx.gain * mask
        return gx, None, None, None, None, None, None, None


def masked_activation(x: Tensor, kind: str, threshold: float = 0.0, relu6_mode: str = "exact", lo: float = 0.0,
                      hi: float = 6.0, slope: float = 0.01, inplace: bool = False) -> Tensor:
    """Functional form of :class:`MaskedActivation` (``kind`` in ``relu``, ``relu6``, ``hardtanh``,
    ``leaky_relu``, ``hardswish``)."""
    if kind not in KINDS:
        raise ConfigError(f"masked_activation: kind must be one of {list(KINDS)}, got {kind!r}")
    if relu6_mode not in RELU6_MODES:
        raise ConfigError(f"masked_activation: relu6_mode must be one of {RELU6_MODES}, got {relu6_mode!r}")
    if not x.is_floating_point():
        raise ConfigError(f"masked_activation: needs a floating-point input, got {x.dtype}")
    if kind == "relu6":
        lo, hi = 0.0, 6.0
    return MaskedActivation.apply(x, kind, lo, hi, slope, threshold, relu6_mode, inplace)


def _parse(call: Call) -> tuple[str, float, float, float, bool] | None:
    """(kind, lo, hi, slope, inplace) of an activation call, or ``None`` when it is not one we mask."""
    name = call.name
    inplace = name.endswith("_")
    base = name.rstrip("_")
    if base == "relu":
        return "relu", 0.0, 0.0, 0.0, inplace or bool(call.arg(1, "inplace", False))
    if base == "relu6":
        return "relu6", 0.0, 6.0, 0.0, inplace or bool(call.arg(1, "inplace", False))
    if base == "hardtanh":
        lo, hi = float(call.arg(1, "min_val", -1.0)), float(call.arg(2, "max_val", 1.0))
        return ("relu6" if (lo, hi) == (0.0, 6.0) else "hardtanh"), lo, hi, 0.0, \
            inplace or bool(call.arg(3, "inplace", False))
    if base == "leaky_relu":
        return "leaky_relu", 0.0, 0.0, float(call.arg(1, "negative_slope", 0.01)), \
            inplace or bool(call.arg(2, "inplace", False))
    if base in ("hardswish", "hardsigmoid"):
        return base, 0.0, 0.0, 0.0, inplace or bool(call.arg(1, "inplace", False))
    return None


def mask_handler(scope: Callable[[str], bool] | None = None, threshold: float = 0.0, relu6_mode: str = "exact",
                 step_hardswish: bool = False) -> Callable[[Call], object]:
    """A handler masking the activation calls (inside modules ``scope`` accepts) whose input needs a gradient.

    ReLU, ReLU6/hardtanh (``relu6_mode="exact"``) and LeakyReLU are exact; ``relu6_mode="step"`` and
    ``step_hardswish`` use MobileTL's step derivative ``1[x > threshold]``.
    """

    def handle(call: Call):  # noqa: ANN202
        x = call.args[0] if call.args else None
        if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() and x.is_floating_point()):
            return NotImplemented
        if scope is not None and not scope(call.module):
            return NotImplemented
        parsed = _parse(call)
        if parsed is None or (parsed[0] == "hardswish" and not step_hardswish):
            return NotImplemented
        kind, lo, hi, slope, inplace = parsed
        mode = relu6_mode if kind in ("relu6", "hardtanh") else "exact"
        if inplace and x.is_leaf:
            return NotImplemented  # PyTorch refuses in-place on a leaf that requires grad: let it say so
        return MaskedActivation.apply(x, kind, lo, hi, slope, threshold, mode, inplace)

    return handle


def mask_ops(model: nn.Module, undo: Undo, scope: Callable[[str], bool] | None = None, **kw) -> None:
    """1-bit masks for the exact family (and, with ``step_hardswish=True``, Hardswish) inside ``model``."""
    ops = EXACT_OPS + (STEP_OPS if kw.get("step_hardswish") else ())
    intercept(model, ops, mask_handler(scope, **kw), undo)


class MaskedDropout(torch.autograd.Function):
    """Dropout whose backward keeps the keep-mask as packed bits (stock dropout keeps a byte or float mask).

    The mask is drawn as PyTorch's CPU dropout draws it (``bernoulli_(1 - p)`` on a tensor like ``x``), so
    under the same RNG state the output equals ``F.dropout``'s.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            noise = torch.empty_like(x).bernoulli_(1 - p)  # same shape as x, 0/1
            packed = pack_mask(noise.bool())
            y = x * noise.div_(1 - p)
        ctx.shape, ctx.scale = x.shape, 1 / (1 - p)
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        return grad * unpack_mask(packed, ctx.shape) * ctx.scale, None


def masked_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` that saves a 1-bit mask (identical output under the same RNG state)."""
    if not training or p == 0 or not torch.is_grad_enabled() or not x.requires_grad:
        return F.dropout(x, p, training)
    if p >= 1:
        return x * 0
    return MaskedDropout.apply(x, p)


def dropout_handler(scope: Callable[[str], bool] | None = None) -> Callable[[Call], object]:
    """A handler for ``dropout`` calls (``nn.Dropout`` or functional) that saves 1-bit masks."""

    def handle(call: Call):  # noqa: ANN202
        x, p, training = call.args[0], float(call.arg(1, "p", 0.5)), bool(call.arg(2, "training", True))
        if call.arg(3, "inplace", False) or not (training and p > 0 and torch.is_grad_enabled()
                                                  and isinstance(x, Tensor) and x.requires_grad):
            return NotImplemented
        if scope is not None and not scope(call.module):
            return NotImplemented
        return masked_dropout(x, p, training)

    return handle


def mask_dropout(model: nn.Module, undo: Undo, scope: Callable[[str], bool] | None = None) -> None:
    intercept(model, ("dropout",), dropout_handler(scope), undo)
