"""Int8Frozen: frozen weights stored as int8, dequantised per layer when used.

A microcontroller keeps the frozen weights of an on-device-trained network in flash as int8 and reads them per layer
(Lin et al., *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472: 256 KB SRAM + 1 MB flash; the
frozen layers are int8). Here every conv/linear layer whose weight is frozen when the technique is applied gets its
weight replaced by per-output-channel symmetric int8 (``q = round(W / s)``, ``s = max|W[co]| / 127``, the same
quantiser as :mod:`.int8`) held in the weight parameter itself (dtype int8, ``requires_grad=False``) and the
scale in a buffer ``weight_scale``. Each call of the layer's own ``conv``/``linear`` dequantises ``q·s`` for that
call only (a transient the size of one layer's weight), outside the graph, or, where a gradient passes through the
frozen layer, inside a Function that keeps only ``q`` and ``s`` (resident anyway) for the input gradient.

The meter counts the frozen weights at 1 byte per element (``frozen_by_dtype``); on a device profile with flash
they are flash, not RAM. What the model computes changes by the int8 rounding of its frozen weights (stated bound on
the eval output: 25% relative; measured 13.6% on pretrained MobileNetV2's logits, under 5% on the zoo). ``remove()`` dequantises back to float32: the rounding
(at most ``s/2`` per element, ``max|W[co]|/254``) stays, by design: keeping the float copy would cost the memory the
technique saves.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.ops import Call, Undo, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique
from edgetrain.techniques._frozen import _CONV, _CONV_INPUT, CONV_OPS, WEIGHT_OF, conv_args, explicit_padding

QMAX = 127  # symmetric int8 in [-127, 127], as :mod:`.int8`
KINDS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Frozen(Technique):
    """Store frozen conv/linear weights as int8 (dequantised per layer when used).

    Args:
        targets: layers to store as int8 (default: every conv/linear layer whose weight is frozen when applied).
    """

    name = "int8_frozen"


def _dequant(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return q.to(dtype) * scale.view(-1, *([1] * (q.dim() - 1))).to(dtype)


class Int8FrozenWeight(torch.autograd.Function):
    """conv (``conv`` = (stride, padding, dilation, groups)) or linear (``conv=None``) with an int8 frozen weight:
    keeps ``q`` and ``s`` (a parameter and a buffer, resident) for the input gradient, not the dequantised weight."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, conv: tuple | None):  # type: ignore[override]
        w = _dequant(q, scale, x.dtype)
        ctx.save_for_backward(q, scale)
        ctx.meta = (tuple(x.shape), x.dtype, conv, bias is not None)
        if conv is None:
            return F.linear(x, w, bias)
        return _CONV[q.dim() - 2](x, w, bias, *conv)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, scale = ctx.saved_tensors
        shape, dtype, conv, has_bias = ctx.meta
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = _dequant(q, scale, dtype)
            gx = g @ w if conv is None else _CONV_INPUT[q.dim() - 2](shape, w, g, *conv)
        if has_bias and ctx.needs_input_grad[3]:
            gb = g.sum(tuple(range(g.dim() - 1))) if conv is None else g.sum((0, *range(2, g.dim())))
        return gx, None, None, gb, None


def int8_handler(layers: dict[int, nn.Module]):  # noqa: ANN201
    """Handler: a ``conv*d``/``linear`` call whose weight is an int8 frozen weight."""

    def handle(call: Call):  # noqa: ANN202
        q = call.arg(1, "weight")
        layer = layers.get(id(q))
        if layer is None:
            return NotImplemented
        x, scale = call.args[0], layer.weight_scale
        if call.name == "linear":
            b, conv = call.arg(2, "bias"), None
        else:
            x, _, b, stride, padding, dilation, groups = conv_args(call)
            x, padding = explicit_padding(x, q, padding, dilation)
            conv = (stride, padding, dilation, groups)
        if torch.is_grad_enabled() and x.requires_grad:
            return Int8FrozenWeight.apply(x, q, scale, b, conv)
        w = _dequant(q, scale, x.dtype)  # this call's transient: the next handlers and the stock op see a float weight
        setattr(w, WEIGHT_OF, q)  # ... that the next handlers can still tell apart (FrozenInference's folds)
        if conv is None:
            return call.proceed(x, w, b)
        return call.proceed(x, w, b, *conv)

    return handle


def _apply(model: nn.Module, cfg: Int8Frozen, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    undo = Undo()
    layers: dict[int, nn.Module] = {}
    for name in targets:
        layer = modules[name]
        w = getattr(layer, "weight", None)
        if not isinstance(w, nn.Parameter) or w.requires_grad or not w.is_floating_point() or \
                hasattr(layer, "weight_scale") or w.dim() < 2:
            continue  # trained, already quantised, or not a conv/linear weight
        scale = (w.detach().abs().flatten(1).amax(dim=1) / QMAX).clamp(min=1e-12).to(torch.float32)  # (C_out,)
        dtype = w.dtype
        with torch.no_grad():
            q = torch.clamp(torch.round(w / scale.view(-1, *([1] * (w.dim() - 1))).to(dtype)), -QMAX, QMAX)
            w.data = q.to(torch.int8)  # the parameter now holds int8: 1 byte per weight
        layer.register_buffer("weight_scale", scale)
        layers[id(w)] = layer
        undo.changes += 1

        def restore(layer=layer, w=w, dtype=dtype) -> None:
            w.data = _dequant(w.data, layer.weight_scale, dtype)
            del layer.weight_scale

        undo.add(restore)
    if layers:
        intercept(model, (*CONV_OPS, "linear"), int8_handler(layers), undo, first=True)
    return undo


def _frozen_prefix_model(dtype: torch.dtype) -> nn.Module:
    from edgetrain.testing import tiny_model

    model = tiny_model(dtype=dtype)
    model.features[:2].requires_grad_(False)
    return model


register(
    TechniqueInfo(
        config=Int8Frozen,
        apply=_apply,
        summary="frozen conv/linear weights stored as int8 (per-channel scale), dequantised per layer when used",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472 (int8 frozen "
              "weights in flash)",
        reduces=frozenset({"weights"}),
        layer_kinds=KINDS,
        looks_for="frozen conv/linear weights (apply it after a freezing technique)",
        limits="float weights only; trained layers keep their float weights (use int8 for those)",
        exact=False,  # the frozen layers compute with int8-rounded weights
        grad_tolerance=0.0,
        grad_cosine=0.99,
        # measured: 0.136 relative on pretrained MobileNetV2's logits (Freeze(last_k_blocks=2), a fresh 10-way head),
        # below 0.05 on the foreign zoo; the accuracy cost is measured in docs/memory.md
        forward_bound=lambda cfg: 0.25,
        remove_tolerance=1 / 254,  # |W - q·s| <= s/2 = max|W[co]|/254 per element
        examples=(Int8Frozen(),),
        example_model=_frozen_prefix_model,
    )
)
