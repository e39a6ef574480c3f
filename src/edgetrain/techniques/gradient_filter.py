"""GradientFilter: patch-averaged output gradients for cheap conv backward.

Yang, Li, Marculescu, *Efficient On-device Training via Gradient Filtering*, CVPR 2023,
arXiv:2301.00330; the math follows the official implementation (``classification/custom_op/conv_avg.py``)
as written up in ``specs/algorithms_A.md`` §2.2, re-implemented here.

The output gradient ``g_y`` of a filtered conv is replaced by its average over ``r x r`` patches
(``ḡ``, averaging only valid elements at the edges). With a patch-constant gradient the backward
collapses: the layer saves only the **patch-summed input** ``x̃`` (each ``r·s x r·s`` input block summed,
``(r·s)²`` times smaller than ``x``) and uses the **tap-summed kernel** ``θ̃`` (``C_out x C_in/g``), then

* input gradient: ``g̃_x[n, ci, P] = Σ_co θ̃[co, ci] ḡ[n, co, P]`` (within each group), broadcast over the
  ``r·s x r·s`` input block of patch ``P`` and cropped to the input;
* weight gradient: ``G[co, ci, :, :] = Σ_{n,P} ḡ[n, co, P] x̃[n, ci, P]``, one value per (co, ci) for every tap;
* bias gradient: exact, from the unfiltered ``g_y``.

The official code saves ``θ̃``; we keep a reference to the weight (a parameter, resident anyway) and sum its
taps in backward (``C_out·C_in/g·k²`` additions), so a filtered layer never saves more than a plain one: a
saved ``θ̃`` of a 512x512 3x3 conv is 1 MiB, more than its whole input at batch 1 on a 2x2 map.

Backward multiply-adds drop by about ``k² r²``. General grouped convs are handled per group (the official
code is only right for depthwise and dense convs). For strided convs the official formulation gives
gradients about ``s²`` too large (spec §2.6): ``stride_correction=True`` divides them by ``s_h s_w``
(default ``False``, as the paper). ``radius=1`` means no filtering: the exact conv backward.

Protocol (paper §4, official configs): the last ``n`` convs are filtered and trained, everything before
the first filtered conv is frozen, BatchNorms are frozen (eval statistics), the classifier trains.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import conv_args, explicit_padding, freeze_ops
from edgetrain.techniques.freeze import head

RADII = (1, 2, 4, 7)  # the paper's patch sizes R2, R4, R7 (official configs), and 1 = exact


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientFilter(Technique):
    """Filter (patch-average) the output gradients of the last convs and train only from there on.

    Args:
        radius: patch size r in {2, 4, 7} (1 = exact backward). Larger r: smaller saved input
            (``(r·s)²``-fold) and fewer backward MACs (about ``k² r²``-fold), coarser gradients.
        last_n_convs: filter and train the last ``n`` Conv2d layers in module order (ignored when
            ``targets`` names the convs). More convs: more trainable weights and saved inputs.
        stride_correction: divide the gradients of strided convs by ``s_h·s_w`` (spec §2.6).
        classifier: also train the final classifier.
    """

    name = "gradient_filter"
    radius: int = 4
    last_n_convs: int = 2
    stride_correction: bool = False
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = GradientFilter
        check(self.radius in RADII, cls, "radius", f"must be one of {RADII}, got {self.radius!r}")
        check(isinstance(self.last_n_convs, int) and self.last_n_convs >= 1, cls, "last_n_convs",
              f"must be an int >= 1, got {self.last_n_convs!r}")
        check(isinstance(self.stride_correction, bool), cls, "stride_correction", "must be true/false")
        check(isinstance(self.classifier, bool), cls, "classifier", "must be true/false")


# --------------------------------------------------------------------------------------------- geometry
def patch_geometry(h: int, w: int, ho: int, wo: int, r: int, stride: tuple[int, int]):
    """Patch counts (P_h, P_w), input block sizes (R_h, R_w) and the symmetric paddings of input and gradient."""
    ph, pw = math.ceil(ho / r), math.ceil(wo / r)
    rh, rw = r * stride[0], r * stride[1]
    pad_x = (math.ceil((ph * rh - h) / 2), math.ceil((pw * rw - w) / 2))
    pad_g = (math.ceil((ph * r - ho) / 2), math.ceil((pw * r - wo) / 2))
    return (ph, pw), (rh, rw), pad_x, pad_g


def _pad_to(t: Tensor, before: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Zero-pad (or crop) the last two dims so that ``before`` rows/cols come first and the total is ``size``."""
    h, w = t.shape[-2:]
    return F.pad(t, (before[1], size[1] - w - before[1], before[0], size[0] - h - before[0]))


def block_sum(t: Tensor, blocks: tuple[int, int], block: tuple[int, int], before: tuple[int, int]) -> Tensor:
    """Sum ``t`` (N, C, H, W) over a grid of ``blocks`` zero-padded blocks of size ``block`` -> (N, C, P_h, P_w)."""
    n, c = t.shape[:2]
    if all(2 * b <= k for b, k in zip(before, block)):  # one pooling kernel, no padded copy
        out = F.avg_pool2d(t, block, block, before, ceil_mode=True, divisor_override=1)
        if tuple(out.shape[-2:]) == tuple(blocks):
            return out
    t = _pad_to(t, before, (blocks[0] * block[0], blocks[1] * block[1]))
    return t.reshape(n, c, blocks[0], block[0], blocks[1], block[1]).sum(5).sum(3)


def patch_average(g: Tensor, blocks: tuple[int, int], r: int, before: tuple[int, int]) -> Tensor:
    """ḡ: mean of ``g`` (N, C, H_o, W_o) over each r x r patch, counting only valid (unpadded) elements."""
    if all(2 * b <= r for b in before):  # one pooling kernel; padded elements are not counted
        out = F.avg_pool2d(g, r, r, before, ceil_mode=True, count_include_pad=False)
        if tuple(out.shape[-2:]) == tuple(blocks):
            return out
    total = block_sum(g, blocks, (r, r), before)  # (N, C, P_h, P_w)
    count = block_sum(torch.ones((1, 1, *g.shape[-2:]), dtype=g.dtype), blocks, (r, r), before)  # (1, 1, P_h, P_w)
    return total / count


# --------------------------------------------------------------------------------------------- autograd
class FilteredConv2d(torch.autograd.Function):
    """conv2d whose backward uses the patch-averaged output gradient; saves x̃ (and the weight, a parameter)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, groups: int, r: int,
                stride_correction: bool):  # type: ignore[override]
        y = F.conv2d(x, weight, bias, stride, padding, 1, groups)  # (N, C_out, H_o, W_o)
        geo = patch_geometry(*x.shape[-2:], *y.shape[-2:], r, stride)
        (ph, pw), block, pad_x, _ = geo
        need_w, need_x = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        x_sum = block_sum(x, (ph, pw), block, pad_x) if need_w else None  # (N, C_in, P_h, P_w)
        # the weight itself (resident, not an activation): θ̃ is summed from it in backward
        ctx.save_for_backward(x_sum, weight.detach() if need_x else None)
        ctx.meta = (x.shape, weight.shape, y.shape[-2:], geo, groups, r, stride, stride_correction, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x_sum, weight = ctx.saved_tensors
        x_shape, w_shape, out_hw, geo, groups, r, stride, correct, has_bias = ctx.meta
        (ph, pw), block, pad_x, pad_g = geo
        n, cin, h, w = x_shape
        cout = w_shape[0]
        scale = 1.0 / (stride[0] * stride[1]) if correct else 1.0
        g_bar = patch_average(g, (ph, pw), r, pad_g).reshape(n, groups, cout // groups, ph * pw)  # (N, g, Co/g, P)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w_sum = weight.sum((-1, -2))  # θ̃: (C_out, C_in/g)
            wg = w_sum.reshape(groups, cout // groups, cin // groups)  # (g, Co/g, Ci/g)
            patch = torch.einsum("ngop,goi->ngip", g_bar, wg).reshape(n, cin, ph, pw) * scale  # (N, C_in, P_h, P_w)
            full = patch[:, :, :, None, :, None].expand(n, cin, ph, block[0], pw, block[1])  # a view, no copy
            full = full.reshape(n, cin, ph * block[0], pw * block[1])  # (N, C_in, P_h R_h, P_w R_w): one copy
            gx = full[:, :, pad_x[0]:pad_x[0] + h, pad_x[1]:pad_x[1] + w]  # crop to (N, C_in, H, W)
        if ctx.needs_input_grad[1]:
            xs = x_sum.reshape(n, groups, cin // groups, ph * pw)  # (N, g, Ci/g, P)
            gsum = torch.einsum("ngop,ngip->goi", g_bar, xs).reshape(cout, cin // groups) * scale  # (C_out, C_in/g)
            gw = gsum[:, :, None, None].expand(w_shape).contiguous()  # one value for every tap
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))  # exact
        return gx, gw, gb, None, None, None, None, None


def _pair(v) -> tuple[int, int]:  # noqa: ANN001
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


def filter_handler(weights: set[int], r: int, stride_correction: bool):  # noqa: ANN201
    """Handler: a ``conv2d`` call whose weight is a filtered conv's (exact when ``r == 1`` or no grad is needed)."""

    def handle(call: Call):  # noqa: ANN202
        x, w, b, stride, padding, dilation, groups = conv_args(call)
        if id(w) not in weights or r == 1 or not torch.is_grad_enabled():
            return NotImplemented
        x, padding = explicit_padding(x, w, padding, dilation)
        return FilteredConv2d.apply(x, w, b, _pair(stride), _pair(padding), groups, r, stride_correction)

    return handle


# --------------------------------------------------------------------------------------------- apply
def filtered_convs(structure: Structure, cfg: GradientFilter, targets: list[str]) -> list[str]:
    """The targets, or the last ``last_n_convs`` conv2d layers in call order; refuses dilated convs."""
    convs = targets
    if not convs:
        convs = structure.layers_of(("conv2d",))
        if cfg.last_n_convs > len(convs):
            raise ConfigError(f"GradientFilter.last_n_convs: {cfg.last_n_convs} > the model's {len(convs)} conv2d "
                              "layers")
        convs = convs[len(convs) - cfg.last_n_convs:]
    for op in structure.ops:
        owner = op.params[0].rpartition(".")[0] if op.params else None
        if owner in convs and op.attrs and _pair(op.attrs["dilation"]) != (1, 1):
            raise ConfigError(f"GradientFilter: {owner!r} is a dilated conv (dilation {op.attrs['dilation']}); "
                              "not supported")
    return convs


def _apply(model: nn.Module, cfg: GradientFilter, targets: list[str], structure: Structure) -> Undo:
    convs = filtered_convs(structure, cfg, targets)
    trainable = convs + (head(structure, "GradientFilter.classifier") if cfg.classifier else [])
    undo = Undo()
    set_requires_grad([p for n, p in model.named_parameters() if not under(n.rpartition(".")[0], trainable)],
                      False, undo)
    modules = dict(model.named_modules())
    intercept(model, ("conv2d",), filter_handler({id(modules[n].weight) for n in convs}, cfg.radius,
                                                 cfg.stride_correction), undo)
    freeze_ops(model, lambda name: not under(name, trainable), undo)
    return undo


# --------------------------------------------------------------------------------------------- estimate
def estimate_conv(x_shape: tuple[int, int, int, int], w_shape: tuple[int, int, int, int],
                  out_hw: tuple[int, int], stride: tuple[int, int], groups: int, radius: int,
                  bytes_per_elem: int = 4, input_grad: bool = True) -> dict[str, int]:
    """Saved bytes and backward MACs of one trainable conv, filtered and plain (spec §2.3). Pure arithmetic.

    ``input_grad=False`` for the first trainable conv (its input needs no gradient): the input-gradient
    contraction is then not computed.
    """
    n, cin, h, w = x_shape
    cout, cin_g, kh, kw = w_shape
    ho, wo = out_hw
    (ph, pw), _, _, _ = patch_geometry(h, w, ho, wo, radius, stride)
    plain_macs = 2 * n * cout * cin_g * kh * kw * ho * wo  # input-grad + weight-grad convolutions
    return {
        "plain_saved_bytes": n * cin * h * w * bytes_per_elem,
        "saved_bytes": n * cin * ph * pw * bytes_per_elem,  # x̃ only (θ̃ is summed from the weight in backward)
        "plain_backward_macs": plain_macs if input_grad else plain_macs // 2,
        "backward_macs": (2 if input_grad else 1) * n * cout * cin_g * ph * pw,  # (co, ci) contractions on patches
    }


def estimate(table, cfg: GradientFilter, targets: list[str], model: nn.Module, structure: Structure) -> None:  # noqa: ANN001
    """Cost model: the trace sees what a filtered conv saves (x̃); its backward multiply-adds are the patch
    contractions (everything below the first filtered conv is frozen, so that conv's input needs no gradient and
    its input-gradient products are not computed)."""
    if cfg.radius == 1:
        return  # exact path: stock conv2d, already in the trace
    for i, name in enumerate(filtered_convs(structure, cfg, targets)):
        lay, row = structure.layers[name], table.row(name)
        attrs = next(op.attrs for op in structure.ops if f"{name}.weight" in op.params)
        w_shape = tuple(model.get_submodule(name).weight.shape)
        est = estimate_conv((1, *lay.in_shape[1:]), w_shape, tuple(lay.out_shape[-2:]), _pair(attrs["stride"]),
                            attrs["groups"], cfg.radius, input_grad=i > 0)
        row.backward_macs = est["backward_macs"]  # per sample (the estimate was for batch 1)
        row.technique = "gradient_filter"


register(
    TechniqueInfo(
        config=GradientFilter,
        apply=_apply,
        summary="gradient filtering: patch-averaged conv output gradients; save patch-summed inputs only",
        paper="Yang, Li, Marculescu, Efficient On-device Training via Gradient Filtering, CVPR 2023, arXiv:2301.00330",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        layer_kinds=frozenset({"conv2d"}),
        default_targets=lambda model, structure: [],
        looks_for="conv2d layers",
        limits='refuses models without conv2d layers (transformers, Conv1d nets)',
        conflicts=frozenset({"freeze", "bias_only"}),
        exact=False,
        grad_tolerance=0.0,
        grad_cosine=0.95,  # r=2 on the last two convs (measured 0.99-1.0)
        examples=(GradientFilter(radius=2, last_n_convs=2), GradientFilter(radius=4, stride_correction=True)),
        estimate=estimate,
    )
)
