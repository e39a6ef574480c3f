"""FrozenInference: the frozen part of a network runs as inference.

The Tiny Training Engine compiles the frozen layers below the first trained one as an inference graph (Lin et al.,
*On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472, §3: "operator fusion" and in-place
updates in the training graph); DESIGN.md, "What a step's peak is made of": the transient buffers of unfused conv,
BatchNorm and activation outputs dominate a frozen forward. Where no gradient flows (the input does not require
grad and the layers are frozen), this technique:

* folds each frozen BatchNorm into the frozen conv whose output it normalises (``structure.followers``): the conv
  call computes ``conv(x, W)·s + (b - mu)·s + beta`` with ``s = gamma / sqrt(var + eps)`` from the running
  statistics at the time of the call, the scale and shift in place on the conv's own output (folding them into
  the weight instead would make a weight-sized transient per call: on ``small_cnn`` that raised the peak by
  144 KiB), and the BatchNorm call then passes its input through (its module's ``num_batches_tracked`` is left as
  it was);
* runs the activation that follows in place on that output (``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``,
  ``hardswish``, ``hardsigmoid``, ``silu``, ``elu``): the tensor is the folded conv's own fresh output, so no one
  else holds it.

One buffer per conv-BN-activation instead of three. What the frozen part computes is unchanged up to float rounding
(the fold reorders the arithmetic); gradients of the trained layers are unchanged (nothing here is in the graph).
Apply it after the technique that freezes (``Freeze``, ``BiasOnly``, ``SparseUpdate``, ...): on a model that
trains everything it finds nothing and says so.
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
from edgetrain.techniques._frozen import CONV_OPS, _CONV, WEIGHT_OF, conv_args, explicit_padding, keep_batch_count
from edgetrain.techniques.int8_frozen import _dequant

#: activations with an in-place form (the name of the op, and how to call it in place)
IN_PLACE = {"relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "leaky_relu": F.leaky_relu,
            "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "elu": F.elu}
_FOLDED = "_edgetrain_folded"  # attribute on a folded conv's output: the BatchNorm it already applied


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenInference(Technique):
    """Fold frozen BatchNorms into their convs and run activations in place where no gradient flows.

    Args:
        targets: conv layers to fold (default: every conv whose output feeds a BatchNorm).
    """

    name = "frozen_inference"


def _frozen(m: nn.Module) -> bool:
    return all(not p.requires_grad for p in m.parameters(recurse=False))


def fold_handler(folds: dict[int, tuple[nn.Module, nn.Module]]):  # noqa: ANN201
    """Handler: a frozen conv (by its weight, however it is called) followed by a frozen BatchNorm, outside the
    graph, computed folded. The weight may be stored int8 (:class:`.Int8Frozen`, applied before or after this
    technique): it is dequantised for this call, as Int8Frozen would."""

    def handle(call: Call):  # noqa: ANN202
        x, w, b, stride, padding, dilation, groups = conv_args(call)
        conv, bn = folds.get(id(getattr(w, WEIGHT_OF, w)), (None, None))
        if bn is None or w.requires_grad or (torch.is_grad_enabled() and x.requires_grad):
            return NotImplemented
        if w.dtype == torch.int8:  # Int8Frozen's stored weight, reached before its own handler
            w = _dequant(w, conv.weight_scale, x.dtype)
        with torch.no_grad():
            s = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            if bn.weight is not None:
                s = s * bn.weight
            shift = -bn.running_mean * s + (bn.bias if bn.bias is not None else 0)
            if b is not None:
                shift = shift + b * s
            x, padding = explicit_padding(x, w, padding, dilation)
            y = _CONV[w.dim() - 2](x, w, None, stride, padding, dilation, groups)
            view = (1, -1, *([1] * (y.dim() - 2)))  # per output channel
            y.mul_(s.view(view)).add_(shift.view(view))  # on the conv's fresh output: no weight-sized copy
        setattr(y, _FOLDED, bn)
        return y

    return handle


def bn_pass(call: Call):  # noqa: ANN201
    """Handler: the BatchNorm a folded conv already applied passes its input through."""
    x, bn = call.args[0], getattr(call.args[0], _FOLDED, None)
    if bn is None or call.arg(1, "running_mean") is not bn.running_mean:
        return NotImplemented  # not the BatchNorm the conv folded
    return x


def in_place(call: Call):  # noqa: ANN201
    """Handler: an activation on a folded conv's output (nobody else holds it, no graph) runs in place."""
    x = call.args[0] if call.args else None
    if not isinstance(x, Tensor) or getattr(x, _FOLDED, None) is None or x.requires_grad:
        return NotImplemented
    extra = {k: v for k, v in call.kwargs.items() if k != "inplace"}
    args = [a for a in call.args[1:] if not isinstance(a, bool)]  # drop a positional inplace flag
    return IN_PLACE[call.name](x, *args, inplace=True, **extra)


def _apply(model: nn.Module, cfg: FrozenInference, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    convs = targets or structure.layers_of(("conv1d", "conv2d", "conv3d"))
    folds: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(conv weight) -> (the conv, its BatchNorm)
    for name in convs:
        bn_name = structure.followers(name, frozenset({"batch_norm"}))
        bn = modules.get(bn_name) if bn_name else None
        if bn is None or getattr(bn, "running_var", None) is None or not _frozen(modules[name]) or not _frozen(bn):
            continue
        folds[id(modules[name].weight)] = (modules[name], bn)
    undo = Undo()
    if not folds:
        return undo  # apply_ refuses in one line: nothing frozen to fold (apply it after a freezing technique)
    names = {n for n, m in modules.items() if any(m is bn for _, bn in folds.values())}
    froze = keep_batch_count(model, lambda n: n in names, undo)

    def passed(call: Call):  # noqa: ANN202
        out = bn_pass(call)
        if out is not NotImplemented:
            froze.add(call.module)
        return out

    intercept(model, CONV_OPS, fold_handler(folds), undo, first=True)
    intercept(model, ("batch_norm",), passed, undo, first=True)
    intercept(model, tuple(IN_PLACE), in_place, undo, first=True)
    return undo


register(
    TechniqueInfo(
        config=FrozenInference,
        apply=_apply,
        summary="frozen conv-BN-activation as inference: BN folded into the conv, activation in place (no graph)",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472 (operator fusion)",
        reduces=frozenset({"compute"}),  # transient buffers of the forward: the peak, not saved activations
        layer_kinds=frozenset({"conv1d", "conv2d", "conv3d"}),
        looks_for="frozen convs whose output feeds a frozen BatchNorm (apply it after a freezing technique)",
        limits="acts only where no gradient flows; needs BatchNorms with running statistics",
        examples=(FrozenInference(),),
        example_model=lambda dtype: _frozen_prefix_model(dtype),
    )
)


def _frozen_prefix_model(dtype: torch.dtype) -> nn.Module:
    """The conformance suite's model: the tiny CNN with its first two blocks frozen."""
    from edgetrain.testing import tiny_model

    model = tiny_model(dtype=dtype)
    model.features[:2].requires_grad_(False)
    return model
