"""SparseUpdate: the Tiny Training Engine's sparse layer/tensor update.

Lin, Zhu, Chen, Wang, Gan, Han, *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472
(§2.2; scheme parameters as in the official ``core/utils/partial_backward.py``, see specs/algorithms_A.md §6.3).

* **Bias update of the last k convs** (``bias_last_k``). A conv's bias is its own ``bias`` or, for a conv
  followed by a BatchNorm (MobileNetV2 is not BN-fused), that BatchNorm's shift ``beta``, which is the fused
  conv's bias: with frozen statistics ``BN(conv(x)) = s * conv(x) + (beta - mu * s)``. Backpropagation stops
  below the k-th last conv: nothing there requires grad, so nothing is saved or computed.
* **Weight update of a fraction of input channels** (``weights``: conv name -> ratio in (0, 1]): the
  channels with the largest weight L2 norm (TTE's default ``magnitude+``), chosen once at ``apply``. The
  trainable slice is its own parameter ``weight_part`` (the full ``weight`` stays frozen), so gradients and
  optimizer state exist only for the slice, and the layer saves only the selected input channels (custom
  Function :class:`PartialWeightConv2d`). Depthwise convs select channels; other grouped convs need ratio 1.
* **Activations** in the updated region keep a 1-bit mask (ReLU, ReLU6 exact) instead of fp32 tensors; convs
  whose weight is frozen keep nothing but the weight (TTE: "bias-only layers store at most a 1-bit mask").
* The classifier is always updated (``classifier=True``).

On ``remove()`` the trained slices are written back into ``weight``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, classifier, patch_forward, set_requires_grad, under
from edgetrain.compress.masks import mask_activations_from
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import patch_frozen


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseUpdate(Technique):
    """Update the biases of the last ``bias_last_k`` convs, a fraction of input channels of chosen convs'
    weights, and the classifier; nothing below is trained or stored.

    Args:
        bias_last_k: number of convs (module order, counted from the output) whose biases train. 0 trains the
            classifier (and the ``weights`` layers) only.
        weights: ``{conv name: ratio}``: update the weights of these convs for ``ceil(ratio * C_in)`` input
            channels (largest L2 norm first). Each must lie within the last ``bias_last_k`` convs.
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
        check(isinstance(self.weights, dict), cls, "weights", f"must be a mapping conv name -> ratio, got {self.weights!r}")
        for k, r in self.weights.items():
            check(isinstance(k, str) and isinstance(r, (int, float)) and 0 < r <= 1, cls, "weights",
                  f"{k!r}: ratio must be in (0, 1], got {r!r}")
        check(isinstance(self.classifier, bool), cls, "classifier", "must be true/false")
        check(self.bias_last_k > 0 or self.weights or self.classifier, cls, "bias_last_k",
              "nothing would train (bias_last_k=0, no weights, classifier=false)")

    def __hash__(self) -> int:
        return hash((self.bias_last_k, tuple(sorted(self.weights.items())), self.classifier, self.targets))


def n_keep(conv: nn.Conv2d, ratio: float) -> int:
    """Input channels updated at ``ratio`` (at least one)."""
    return max(1, math.ceil(ratio * conv.in_channels - 1e-9))


# --------------------------------------------------------------------------------------------- autograd
class PartialWeightConv2d(torch.autograd.Function):
    """conv2d with weight ``W`` = frozen ``weight`` whose input channels ``keep`` are replaced by ``part``.

    Saves the selected input channels ``x[:, keep]`` (for the gradient of ``part``) and nothing else of
    activation size; the input gradient uses the full weight, rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, part: Tensor, keep: Tensor, bias: Tensor | None, stride, padding,
                dilation, groups: int):  # type: ignore[override]
        w = _compose(weight, part, keep, groups)
        ctx.save_for_backward(x[:, keep] if ctx.needs_input_grad[2] else None, weight, part, keep)
        ctx.meta = (tuple(x.shape), stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x_keep, weight, part, keep = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, has_bias = ctx.meta
        gx = gpart = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x_shape, _compose(weight, part, keep, groups), g, stride, padding,
                                            dilation, groups)
        if ctx.needs_input_grad[2]:
            if groups == 1:
                gpart = torch.nn.grad.conv2d_weight(x_keep, part.shape, g, stride, padding, dilation, 1)
            else:  # depthwise: the kept channels are whole groups
                gpart = torch.nn.grad.conv2d_weight(x_keep, part.shape, g[:, keep], stride, padding, dilation,
                                                    len(keep))
        if has_bias and ctx.needs_input_grad[4]:
            gb = g.sum((0, 2, 3))
        return gx, None, gpart, None, gb, None, None, None, None


def _compose(weight: Tensor, part: Tensor, keep: Tensor, groups: int) -> Tensor:
    dim = 1 if groups == 1 else 0
    return weight.detach().index_copy(dim, keep, part.detach())


def _partial_forward(conv: nn.Conv2d):
    def forward(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return F.conv2d(x, _compose(conv.weight, conv.weight_part, conv.weight_keep, conv.groups), conv.bias,
                            conv.stride, conv.padding, conv.dilation, conv.groups)
        return PartialWeightConv2d.apply(x, conv.weight, conv.weight_part, conv.weight_keep, conv.bias, conv.stride,
                                         conv.padding, conv.dilation, conv.groups)

    return forward


# --------------------------------------------------------------------------------------------- apply
def region(model: nn.Module, cfg: SparseUpdate) -> list[str]:
    """The last ``bias_last_k`` convs (module order)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if cfg.bias_last_k > len(convs):
        raise ConfigError(f"SparseUpdate.bias_last_k: {cfg.bias_last_k} > the model's {len(convs)} convs")
    return convs[len(convs) - cfg.bias_last_k:]


def bias_of(model: nn.Module, conv_name: str) -> tuple[str, nn.Parameter] | None:
    """The conv's own bias, or the shift of the BatchNorm right after it in module order."""
    names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    conv = modules[conv_name]
    if conv.bias is not None:
        return conv_name, conv.bias
    nxt = names[names.index(conv_name) + 1] if names.index(conv_name) + 1 < len(names) else None
    m = modules.get(nxt)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
        return nxt, m.bias
    return None


def _select(conv: nn.Conv2d, ratio: float) -> Tensor:
    w = conv.weight.detach()
    if conv.groups == 1:
        norms = w.pow(2).sum((0, 2, 3))  # per input channel
    elif conv.groups == conv.in_channels == conv.out_channels:
        norms = w.pow(2).sum((1, 2, 3))  # depthwise: per channel
    else:
        if ratio < 1:
            raise ConfigError(f"SparseUpdate: grouped conv ({conv.groups} groups) supports only ratio 1")
        norms = w.pow(2).sum((0, 2, 3))
    k = n_keep(conv, ratio)
    return torch.sort(torch.topk(norms, k).indices).values


def _apply(model: nn.Module, cfg: SparseUpdate, targets: list[str]) -> Undo:
    modules = dict(model.named_modules())
    reg = region(model, cfg)
    for name in cfg.weights:
        if name not in modules or not isinstance(modules[name], nn.Conv2d):
            raise ConfigError(f"SparseUpdate.weights: {name!r} is not a Conv2d of the model")
        if name not in reg:
            raise ConfigError(f"SparseUpdate.weights: {name!r} lies below the last bias_last_k={cfg.bias_last_k} "
                              "convs (TTE updates weights only inside the bias region)")
    undo = Undo()
    head = [classifier(model)] if cfg.classifier else []
    biases = {id(b[1]) for n in reg if (b := bias_of(model, n)) is not None}
    full = {id(modules[n].weight) for n, r in cfg.weights.items() if r >= 1}
    keep = biases | full | {id(p) for n, p in model.named_parameters() if under(n.rpartition(".")[0], head)}
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    partial = [n for n, r in cfg.weights.items() if r < 1]
    for name in partial:
        conv = modules[name]
        sel = _select(conv, cfg.weights[name])
        dim = 1 if conv.groups == 1 else 0
        conv.register_buffer("weight_keep", sel)
        conv.register_parameter("weight_part", nn.Parameter(conv.weight.detach().index_select(dim, sel).clone()))
        patch_forward(conv, _partial_forward(conv), undo)

        def restore(conv=conv, dim=dim) -> None:
            with torch.no_grad():
                conv.weight.index_copy_(dim, conv.weight_keep, conv.weight_part)
            del conv.weight_part, conv.weight_keep

        undo.add(restore)
    frozen = [n for n in modules if n and not under(n, head) and n not in partial]
    patch_frozen(model, frozen, undo)
    mask_activations_from(model, reg, undo, skip=head)  # 1-bit masks where gradients pass through
    return undo


# --------------------------------------------------------------------------------------------- estimate
def estimate(table, cfg: SparseUpdate, targets: list[str], model: nn.Module) -> None:  # noqa: ANN001
    """Cost model: a partial conv keeps ``n_keep`` of its input channels."""
    modules = dict(model.named_modules())
    for name, ratio in cfg.weights.items():
        if ratio < 1:
            in_shape = table.shapes[name][0]
            row = table.row(name)
            row.saved_per_sample += n_keep(modules[name], ratio) * math.prod(in_shape[1:]) * 4
            row.technique = "sparse_update"
    # its 1-bit ReLU masks are counted by the cost model's trace (edgetrain.compress.masks)

register(
    TechniqueInfo(
        config=SparseUpdate,
        apply=_apply,
        summary="TTE sparse update: biases of the last k convs, top-norm input channels of chosen weights, classifier",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        layer_types=(nn.Module,),
        default_targets=lambda model: [],
        conflicts=frozenset({"freeze", "bias_only", "gradient_filter", "mobiletl"}),
        # exact, but the trained slices are new parameters (weight_part) the generic reference cannot name:
        # tests/techniques/test_sparse_update.py checks every gradient against plain PyTorch in float64
        exact=False,
        grad_tolerance=0.0,
        examples=(SparseUpdate(bias_last_k=2), SparseUpdate(bias_last_k=3, weights={"features.2.0": 0.5, "features.1.0": 0.5}),
                  SparseUpdate(bias_last_k=0, classifier=True)),
        estimate=estimate,
    )
)
