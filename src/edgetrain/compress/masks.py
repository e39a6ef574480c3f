"""Activations whose backward needs only a 1-bit mask, stored bit-packed (8 masks per byte).

Stock ``F.relu`` / ``F.relu6`` / ``F.hardswish`` save a full-precision tensor for backward (algorithms_A
§1.1). Their derivative is, or is approximated by, a 0/1 mask:

* ReLU: ``1[x > 0]`` (exact; PyTorch's ``threshold_backward`` uses the same strict inequality).
* ReLU6, ``mode="exact"``: ``1[0 < x < 6]`` (exact, as ``hardtanh_backward``); ``mode="step"``:
  ``1[x > threshold]`` (ignores the upper clip; MobileTL's "signed function", §3.2).
* Hardswish: ``1[x > threshold]`` replaces ``h'(x)`` (MobileTL §3.2; approximate by design).

The forward is always the true activation. The packed mask is saved with ``ctx.save_for_backward`` so
the meter (and any enclosing saved-tensor hooks) see its real size, ``ceil(numel / 8)`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.compress.bitpack import pack_mask, unpack_mask
from edgetrain.errors import ConfigError

#: Activation module types that can be replaced by a masked forward, and whether the mask is exact.
MASKABLE: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
RELU6_MODES = ("exact", "step")


def _mask(x: Tensor, kind: str, threshold: float, relu6_mode: str) -> Tensor:
    if kind == "relu":
        return x > 0
    if kind == "relu6" and relu6_mode == "exact":
        return (x > 0) & (x < 6)
    return x > threshold  # relu6 "step", hardswish (MobileTL's step derivative)


def _act(x: Tensor, kind: str) -> Tensor:
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    return F.hardswish(x)


class MaskedActivation(torch.autograd.Function):
    """``y = act(x)``; backward ``dx = dy * mask`` with the mask stored as packed bits."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, threshold: float, relu6_mode: str) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            y = _act(x, kind)  # same shape as x
            packed = pack_mask(_mask(x, kind, threshold, relu6_mode))  # (ceil(numel / 8),) uint8
        ctx.shape = x.shape
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        mask = unpack_mask(packed, ctx.shape)  # same shape as grad, bool
        return grad * mask, None, None, None


def masked_activation(x: Tensor, kind: str, threshold: float = 0.0, relu6_mode: str = "exact") -> Tensor:
    """Functional form of :class:`MaskedActivation` (``kind`` in ``relu``, ``relu6``, ``hardswish``)."""
    if kind not in MASKABLE.values():
        raise ConfigError(f"masked_activation: kind must be one of {sorted(MASKABLE.values())}, got {kind!r}")
    if relu6_mode not in RELU6_MODES:
        raise ConfigError(f"masked_activation: relu6_mode must be one of {RELU6_MODES}, got {relu6_mode!r}")
    if not x.is_floating_point():
        raise ConfigError(f"masked_activation: needs a floating-point input, got {x.dtype}")
    return MaskedActivation.apply(x, kind, threshold, relu6_mode)


def masked_forward(module: nn.Module, threshold: float = 0.0, relu6_mode: str = "exact") -> Callable[[Tensor], Tensor]:
    """A forward for a ReLU / ReLU6 / Hardswish module that saves a 1-bit mask (``inplace`` is ignored)."""
    kind = MASKABLE.get(type(module))
    if kind is None:
        raise ConfigError(f"{type(module).__name__}: no 1-bit-mask backward; supported: "
                          f"{', '.join(t.__name__ for t in MASKABLE)}")

    def forward(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return _act(x, kind)
        return masked_activation(x, kind, threshold, relu6_mode)

    forward.saves_mask = True  # the cost model counts 1 bit per output element when the input requires grad
    return forward


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


def dropout_forward(module: nn.Dropout) -> Callable[[Tensor], Tensor]:
    """A forward for ``nn.Dropout`` that saves a 1-bit mask (identical output under the same RNG state)."""

    def forward(x: Tensor) -> Tensor:
        if not module.training or module.p == 0 or not torch.is_grad_enabled() or not x.requires_grad:
            return nn.functional.dropout(x, module.p, module.training)
        if module.p >= 1:
            return x * 0
        return MaskedDropout.apply(x, module.p)

    forward.saves_mask = module.p > 0  # the cost model counts 1 bit per element when training
    return forward


def mask_is_exact(module: nn.Module, relu6_mode: str = "exact") -> bool:
    """Whether :func:`masked_forward` reproduces the module's true gradient."""
    kind = MASKABLE.get(type(module))
    return kind == "relu" or (kind == "relu6" and relu6_mode == "exact")


EXACT_MASKABLE = (nn.ReLU, nn.ReLU6)  # activations whose 1-bit mask gives the exact gradient


def mask_activations_from(model: nn.Module, first: list[str], undo, skip: list[str] = ()) -> list[str]:  # noqa: ANN001
    """Give every ReLU/ReLU6 from the earliest module of ``first`` on (module order) a 1-bit-mask forward, except
    those under ``skip`` or already changed by another technique; returns the patched names."""
    from edgetrain.apply import patch_forward, under

    modules = dict(model.named_modules())
    names = list(modules)
    start = min((names.index(n) for n in first), default=len(names))
    patched = []
    for name in names[start:]:
        m = modules[name]
        if isinstance(m, EXACT_MASKABLE) and "forward" not in m.__dict__ and not under(name, skip):
            patch_forward(m, masked_forward(m), undo)
            patched.append(name)
    return patched
