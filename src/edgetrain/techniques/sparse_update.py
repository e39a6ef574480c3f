"""SparseUpdate: the Tiny Training Engine's sparse layer/tensor update.

Lin, Zhu, Chen, Wang, Gan, Han, *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472
(§2.2; scheme parameters as in the official ``core/utils/partial_backward.py``, see specs/algorithms_A.md §6.3).

The layers are the model's conv (1-, 2-, 3-d) and linear layers other than the classifier, in call order, as
:mod:`edgetrain.structure` finds them (any module whose weight feeds ``conv*d`` or ``linear``; ``edgetrain
inspect`` lists them):

* **Bias update of the last k layers** (``bias_last_k``). A layer's bias is its own ``bias`` or, for a conv whose
  output feeds a BatchNorm (MobileNetV2 is not BN-fused), that BatchNorm's shift ``beta``, which is the fused
  conv's bias: with frozen statistics ``BN(conv(x)) = s * conv(x) + (beta - mu * s)``. Backpropagation stops
  below the k-th last layer: nothing there requires grad, so nothing is saved or computed.
* **Weight update of a fraction of input channels** (``weights``: layer name -> ratio in (0, 1]): the input
  channels (conv) or input features (linear) with the largest weight L2 norm (TTE's default ``magnitude+``),
  chosen once at ``apply``. The trainable slice is its own parameter ``weight_part`` (the full ``weight`` stays
  frozen), so gradients and optimizer state exist only for the slice, and the layer saves only the selected
  input channels (custom Function :class:`PartialWeight`, reached through the layer's own ``conv``/``linear``
  call, whatever padding its forward computes). Depthwise convs select channels; other grouped convs need
  ratio 1.
* **Activations** where gradients flow keep a 1-bit mask (ReLU family, exact) instead of fp32 tensors; frozen
  convs keep nothing but the weight (TTE: "bias-only layers store at most a 1-bit mask").
* The classifier is always updated (``classifier=True``).

On ``remove()`` the trained slices are written back into ``weight``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.compress.masks import mask_ops
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import CONV_OPS, conv_args, explicit_padding, freeze_ops
from edgetrain.techniques.freeze import head

#: layer kinds sparse update trains
KINDS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseUpdate(Technique):
    """Update the biases of the last ``bias_last_k`` conv/linear layers, a fraction of input channels of chosen
    layers' weights, and the classifier; nothing below is trained or stored.

    Args:
        bias_last_k: number of conv/linear layers (call order, counted from the output, the classifier not
            counted) whose biases train. 0 trains the classifier (and the ``weights`` layers) only.
        weights: ``{layer name: ratio}``: update the weights of these layers for ``ceil(ratio * C_in)`` input
            channels or features (largest L2 norm first). Each must lie within the last ``bias_last_k`` layers.
        classifier: update the classifier (TTE always does).
    """

    name = "sparse_update"
    bias_last_k: int = 0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = SparseUpdate
        check(isinstance(self.bias_last_k, int) and self.bias_last_k >= 0, cls, "bias_last_k",
              f"must be an int >= 0, got {self.bias_last_k!r}")
        check(isinstance(self.weights, dict), cls, "weights",
              f"must be a mapping layer name -> ratio, got {self.weights!r}")
        for k, r in self.weights.items():
            check(isinstance(k, str) and isinstance(r, (int, float)) and 0 < r <= 1, cls, "weights",
                  f"{k!r}: ratio must be in (0, 1], got {r!r}")
        check(isinstance(self.classifier, bool), cls, "classifier", "must be true/false")
        check(self.bias_last_k > 0 or self.weights or self.classifier, cls, "bias_last_k",
              "nothing would train (bias_last_k=0, no weights, classifier=false)")

    def __hash__(self) -> int:
        return hash((self.bias_last_k, tuple(sorted(self.weights.items())), self.classifier, self.targets))


def n_keep(layer: nn.Module, ratio: float) -> int:
    """Input channels (features) updated at ``ratio`` (at least one)."""
    cin = layer.weight.shape[1] * (layer.weight.shape[0] if _depthwise(layer.weight, _groups(layer)) else 1)
    return max(1, math.ceil(ratio * cin - 1e-9))


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def _depthwise(weight: Tensor, groups: int) -> bool:
    return groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups


# --------------------------------------------------------------------------------------------- autograd
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class PartialWeight(torch.autograd.Function):
    """conv (``conv`` = (stride, padding, dilation, groups)) or linear (``conv=None``) with weight ``W`` = frozen
    ``weight`` whose input channels ``keep`` are replaced by ``part``.

    Saves the selected input channels (``x[:, keep]``, or ``x[..., keep]`` for linear) for the gradient of
    ``part`` and nothing else of activation size; the input gradient uses the full weight, rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, part: Tensor, keep: Tensor, bias: Tensor | None,  # type: ignore[override]
                conv: tuple | None):
        groups = conv[3] if conv else 1
        w = _compose(weight, part, keep, groups)
        x_keep = None
        if ctx.needs_input_grad[2]:
            x_keep = x[:, keep] if conv else x[..., keep]
        ctx.save_for_backward(x_keep, weight, part, keep)
        ctx.meta = (tuple(x.shape), conv, bias is not None)
        if conv is None:
            return F.linear(x, w, bias)
        return _CONV[weight.dim() - 2](x, w, bias, *conv)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x_keep, weight, part, keep = ctx.saved_tensors
        x_shape, conv, has_bias = ctx.meta
        gx = gpart = gb = None
        groups = conv[3] if conv else 1
        if ctx.needs_input_grad[0]:
            w = _compose(weight, part, keep, groups)
            gx = g @ w if conv is None else _CONV_INPUT[weight.dim() - 2](x_shape, w, g, *conv)
        if ctx.needs_input_grad[2]:
            if conv is None:
                gpart = g.reshape(-1, g.shape[-1]).t() @ x_keep.reshape(-1, x_keep.shape[-1])  # (out, keep)
            elif groups == 1:
                gpart = _CONV_WEIGHT[weight.dim() - 2](x_keep, part.shape, g, *conv[:3], 1)
            else:  # depthwise: the kept channels are whole groups
                gpart = _CONV_WEIGHT[weight.dim() - 2](x_keep, part.shape, g[:, keep], *conv[:3], len(keep))
        if has_bias and ctx.needs_input_grad[4]:
            gb = g.sum(tuple(range(g.dim() - 1))) if conv is None else g.sum((0, *range(2, g.dim())))
        return gx, None, gpart, None, gb, None


def _compose(weight: Tensor, part: Tensor, keep: Tensor, groups: int) -> Tensor:
    dim = 0 if _depthwise(weight, groups) else 1
    return weight.detach().index_copy(dim, keep, part.detach())


def partial_handler(slices: dict[int, nn.Module]):  # noqa: ANN201
    """Handler: a ``conv*d``/``linear`` call whose weight is a partially updated layer's full weight."""

    def handle(call: Call):  # noqa: ANN202
        w = call.arg(1, "weight")
        layer = slices.get(id(w))
        if layer is None:
            return NotImplemented
        part, keep = layer.weight_part, layer.weight_keep
        if call.name == "linear":
            x, b, conv = call.args[0], call.arg(2, "bias"), None
        else:
            x, w, b, stride, padding, dilation, groups = conv_args(call)
            x, padding = explicit_padding(x, w, padding, dilation)
            conv = (stride, padding, dilation, groups)
        if not torch.is_grad_enabled():
            w_full = _compose(w, part, keep, conv[3] if conv else 1)
            return F.linear(x, w_full, b) if conv is None else _CONV[w.dim() - 2](x, w_full, b, *conv)
        return PartialWeight.apply(x, w, part, keep, b, conv)

    return handle


# --------------------------------------------------------------------------------------------- apply
def layers(structure: Structure) -> list[str]:
    """The conv/linear layers sparse update counts, in call order (the classifier excluded)."""
    return [n for n in structure.layers_of(KINDS) if n != structure.classifier]


def region(structure: Structure, cfg: SparseUpdate) -> list[str]:
    """The last ``bias_last_k`` layers."""
    names = layers(structure)
    if cfg.bias_last_k > len(names):
        raise ConfigError(f"SparseUpdate.bias_last_k: {cfg.bias_last_k} > the model's {len(names)} conv/linear "
                          "layers")
    return names[len(names) - cfg.bias_last_k:]


def bias_of(structure: Structure, name: str) -> str | None:
    """The layer's own bias, or the shift of the BatchNorm its output feeds (qualified parameter name)."""
    own = f"{name}.bias"
    if own in structure.layers[name].params:
        return own
    bn = structure.followers(name, frozenset({"batch_norm"}))
    if bn is not None and f"{bn}.bias" in structure.layers.get(bn, structure.layers[name]).params:
        return f"{bn}.bias"
    return None


def _select(layer: nn.Module, ratio: float) -> tuple[Tensor, int]:
    """The kept input channels (sorted) and the weight dim they index."""
    w, groups = layer.weight.detach(), _groups(layer)
    if _depthwise(w, groups):
        norms, dim = w.pow(2).flatten(1).sum(1), 0  # depthwise: per channel
    else:
        if groups > 1 and ratio < 1:
            raise ConfigError(f"SparseUpdate: grouped conv ({groups} groups) supports only ratio 1")
        norms, dim = w.pow(2).transpose(0, 1).flatten(1).sum(1), 1  # per input channel / feature
    k = n_keep(layer, ratio)
    return torch.sort(torch.topk(norms, k).indices).values, dim


def _apply(model: nn.Module, cfg: SparseUpdate, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    reg = region(structure, cfg)
    names = layers(structure)
    for name in cfg.weights:
        if name not in names:
            raise ConfigError(f"SparseUpdate.weights: {name!r} is not a conv/linear layer of {structure.model} "
                              f"(layers look like {', '.join(names[-3:])})")
        if name not in reg:
            raise ConfigError(f"SparseUpdate.weights: {name!r} lies below the last bias_last_k={cfg.bias_last_k} "
                              "layers (TTE updates weights only inside the bias region)")
    undo = Undo()
    roots = head(structure, "SparseUpdate.classifier") if cfg.classifier else []
    params = dict(model.named_parameters())
    keep = {id(params[b]) for n in reg if (b := bias_of(structure, n)) is not None}
    keep |= {id(params[f"{n}.weight"]) for n, r in cfg.weights.items() if r >= 1}
    keep |= {id(p) for n, p in params.items() if under(n.rpartition(".")[0], roots)}
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    slices: dict[int, nn.Module] = {}
    for name, ratio in cfg.weights.items():
        if ratio >= 1:
            continue
        layer = modules[name]
        sel, dim = _select(layer, ratio)
        layer.register_buffer("weight_keep", sel)
        layer.register_parameter("weight_part", nn.Parameter(layer.weight.detach().index_select(dim, sel).clone()))
        slices[id(layer.weight)] = layer
        undo.changes += 1

        def restore(layer=layer, dim=dim) -> None:
            with torch.no_grad():
                layer.weight.index_copy_(dim, layer.weight_keep, layer.weight_part)
            del layer.weight_part, layer.weight_keep

        undo.add(restore)
    if slices:
        intercept(model, (*CONV_OPS, "linear"), partial_handler(slices), undo)
    freeze_ops(model, lambda name: not under(name, roots), undo)
    mask_ops(model, undo)  # 1-bit masks where gradients pass through
    return undo


register(
    TechniqueInfo(
        config=SparseUpdate,
        apply=_apply,
        summary="TTE sparse update: biases of the last k conv/linear layers, top-norm input channels of chosen "
                "weights, classifier",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        default_targets=lambda model, structure: [],
        looks_for="conv/linear layers",
        limits="addmm layers (transformers' Conv1D) and weights read inside nn.MultiheadAttention are "
               "not reached",
        conflicts=frozenset({"freeze", "bias_only", "gradient_filter", "mobiletl"}),
        # exact, but the trained slices are new parameters (weight_part) the generic reference cannot name:
        # tests/techniques/test_sparse_update.py checks every gradient against plain PyTorch in float64
        exact=False,
        grad_tolerance=0.0,
        examples=(SparseUpdate(bias_last_k=2),
                  SparseUpdate(bias_last_k=3, weights={"features.2.0": 0.5, "features.1.0": 0.5}),
                  SparseUpdate(bias_last_k=0, classifier=True)),
    )
)
