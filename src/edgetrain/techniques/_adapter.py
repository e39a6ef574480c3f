"""What the weight adapters (LoRA, KronA) share: an update beside a frozen ``linear``/``conv2d`` op, computed on the
op's input, and :func:`merge`, which folds it into the weight.

Each adapted layer gets its adapter's parameters registered on it (``lora_A``/``lora_B``, ``krona_A``/``krona_B``)
and an :class:`Adapter` record here. A handler placed first on the layer's op computes the frozen op through the
later handlers (the frozen no-save ops: the frozen weight's gradient is never formed and its input is not kept for
it) and adds ``scale * branch(input)``, the scale as a scalar (autograd keeps no tensor for it). What is saved for
backward is then only what the adapter's own gradient needs.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.structure import Structure
from edgetrain.techniques._frozen import conv_args, explicit_padding, freeze_ops
from edgetrain.techniques.freeze import head

KINDS = frozenset({"linear", "conv2d"})


@dataclasses.dataclass(frozen=True)
class Conv:
    """The geometry of the adapted conv call (string padding already applied to the input)."""

    stride: tuple[int, ...] | int
    padding: tuple[int, ...]
    dilation: tuple[int, ...] | int


@dataclasses.dataclass
class Adapter:
    """One adapted layer.

    Args:
        params: names of the parameters registered on the layer.
        scale: the fixed factor of the update.
        dropout: dropout on the branch's input (0: none).
        branch: ``branch(layer, x, conv)``: the unscaled update's output for the op's input ``x`` (``conv`` is
            ``None`` for a linear op).
        delta: ``delta(layer)``: the unscaled update in the weight's shape.
    """

    params: tuple[str, ...]
    scale: float
    dropout: float
    branch: Callable[[nn.Module, Tensor, Conv | None], Tensor]
    delta: Callable[[nn.Module], Tensor]


#: adapted layer -> its adapter (weak: a dropped model takes its records with it)
ADAPTERS: weakref.WeakKeyDictionary[nn.Module, Adapter] = weakref.WeakKeyDictionary()
#: modules carrying an update that cannot be folded into a weight -> why (KronA^B beside a non-linear block)
UNMERGEABLE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def merge(model: nn.Module) -> int:
    """Fold every weight adapter of ``model`` (LoRA, KronA) into its layer's weight, ``W + scale * delta``, and drop
    the adapter; returns how many. Remove the handle afterwards (``applied.remove()``): the merged weights stay, the
    adapters' ops go. Refuses in one line, changing nothing, when the model holds an update no weight can absorb."""
    blocked = [(n, UNMERGEABLE[m]) for n, m in model.named_modules() if m in UNMERGEABLE]
    if blocked:
        raise ConfigError(f"merge: {blocked[0][0] or 'the model'} {blocked[0][1]}; nothing was merged")
    n = 0
    for layer in model.modules():
        ad = ADAPTERS.get(layer)
        if ad is None or ad.params[0] not in layer._parameters:
            continue
        with torch.no_grad():
            layer.weight.add_((ad.scale * ad.delta(layer)).to(layer.weight.dtype))
        for k in ad.params:
            delattr(layer, k)
        del ADAPTERS[layer]
        n += 1
    return n


def _handler(adapted: list[nn.Module]):  # noqa: ANN202
    def handle(call: Call):  # noqa: ANN202
        w = call.arg(1, "weight")
        # the layer whose weight this is now (load_state_dict(assign=True) replaces the Parameter objects)
        layer = next((m for m in adapted if m._parameters.get("weight") is w), None)
        ad = ADAPTERS.get(layer) if layer is not None else None
        if ad is None or ad.params[0] not in layer._parameters:  # not a target, or merged
            return NotImplemented
        base = call.proceed()  # the frozen op (later handlers: the no-save frozen conv/linear)
        x = call.args[0]
        if ad.dropout:
            x = F.dropout(x, ad.dropout, layer.training)
        conv = None
        if call.name == "conv2d":
            _, _, _, stride, padding, dilation, _ = conv_args(call)
            x, padding = explicit_padding(x, w, padding, dilation)
            conv = Conv(stride, padding, dilation)
        return torch.add(base, ad.branch(layer, x, conv), alpha=ad.scale)

    return handle


def install(model: nn.Module, who: str, classifier: bool, explicit: bool, targets: list[str], structure: Structure,
            make: Callable[[str, nn.Module], tuple[dict[str, Tensor], Adapter]]) -> Undo:
    """Freeze ``model`` but its classifier (when ``classifier``), give every target layer the adapter ``make(name,
    layer)`` returns (its new parameters and record) and the op handler. Grouped convolutions are skipped, or
    refused when the targets were named (``explicit``)."""
    modules = dict(model.named_modules())
    roots = head(structure, f"{who}.classifier") if classifier else []
    names = [n for n in targets if not under(n, roots)]
    grouped = [n for n in names if structure.layers[n].kind == "conv2d" and getattr(modules[n], "groups", 1) != 1]
    if grouped and explicit:
        raise ConfigError(f"{who}: {grouped[0]} is a grouped convolution ({modules[grouped[0]].groups} groups); "
                          "adapters need a dense weight (name other targets)")
    names = [n for n in names if n not in grouped]
    bad = [n for n in names if getattr(modules[n], "weight", None) is None or modules[n].weight.dim() not in (2, 4)]
    if bad:
        raise ConfigError(f"{who}: {bad[0]} has no 2-d (linear) or 4-d (conv2d) weight to adapt")
    again = [n for n in names if modules[n] in ADAPTERS]
    if again:
        raise ConfigError(f"{who}: {again[0]} already has an adapter; remove the first technique (or merge it) "
                          "before adapting it again")
    if not names:
        raise ConfigError(f"{who}: no layer of {structure.model} to adapt (targets {targets[:3]}: grouped convs and "
                          "the classifier get no adapter); name dense linear/conv2d layers with targets")
    made = [(modules[n], *make(n, modules[n])) for n in names]  # all shapes checked before anything changes
    undo = Undo()
    keep = {id(p) for n, p in model.named_parameters() if under(n.rpartition(".")[0], roots)}
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    adapted: list[nn.Module] = []
    for layer, params, record in made:
        for k, v in params.items():
            layer.register_parameter(k, nn.Parameter(v))
        ADAPTERS[layer] = record
        adapted.append(layer)
        undo.changes += 1

        def drop(layer: nn.Module = layer, record: Adapter = record) -> None:
            for k in record.params:
                if k in layer._parameters:
                    delattr(layer, k)
            if ADAPTERS.get(layer) is record:
                del ADAPTERS[layer]

        undo.add(drop)
    freeze_ops(model, lambda name: not under(name, roots), undo)
    if adapted:
        intercept(model, tuple(KINDS), _handler(adapted), undo, first=True)
    return undo


def default_targets(model: nn.Module, structure: Structure) -> list[str]:
    """Every linear and conv2d layer but the classifier (grouped convs are dropped by :func:`install`)."""
    return [n for n in structure.layers_of(KINDS) if n != structure.classifier]
