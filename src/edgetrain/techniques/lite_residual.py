"""LiteResidual: TinyTL's lite residual modules beside frozen blocks, with bias-only updates of the backbone.

Cai, Gan, Zhu, Han, *TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning*, NeurIPS 2020,
arXiv:2007.11622 (spec: anchors_frameworks §2). Beside each target block a small branch learns a residual feature
map at reduced resolution: ``h = block(x) + up(lite(x))`` with ``lite = avgpool(r) -> conv kxk (the block's stride,
g groups) -> BN -> ReLU -> conv 1x1 -> BN`` and ``up`` bilinear back to the block's output size. The backbone's
weights stay frozen (its convs and BatchNorms save nothing for their weights; with ``bias=True`` its biases train,
TinyTL's "lite_residual+bias"), so what the step keeps is the branches' own maps at 1/r^2 of the block's resolution.
A residual block's ``x + main(x)`` plus the branch is TinyTL's ``x + (main(x) + lite(x))``: the same sum.

Details from the authors' code (mit-han-lab/tinyml, ``tinytl/model/modules.py``, read, not copied): pooling
``AvgPool2d(r, r)`` with r = 2; the middle width ``in * expand`` (expand 1.0) rounded to a multiple of 8; ``g = 2``
groups (here the largest divisor of both widths not above ``groups``); kernel 5 reduced by 2 while it exceeds the
pooled resolution, and a global pool with a 1x1 kernel where the pooled map would be 1x1; convs without bias; the
last BN's weight initialised to zero, so the branch starts at zero and the model computes what it did.

Acts on the block's call (hooks, :mod:`edgetrain.techniques._branch`: the block's own forward runs unchanged; the
branch reads the block's input before it runs). A block qualifies when it maps a
4-d (N, C, H, W) tensor to a 4-d one whose size is the input's divided by an integer stride; others are skipped by
default (the model's blocks, ``edgetrain inspect`` lists them) and refused when named.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.ops import Undo
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._branch import install as _branch_hooks
from edgetrain.techniques._frozen import freeze_ops
from edgetrain.techniques.freeze import head

WHO = "LiteResidual"
ATTR = "lite_residual"  # the prefix of the branch's tensors on its block


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiteResidual(Technique):
    """TinyTL's lite residual branch beside each target block; the backbone frozen but (``bias``) its biases.

    Args:
        downsample: the branch's pooling ratio r (TinyTL: 2).
        expand: the middle width as a multiple of the block's input channels (TinyTL: 1.0).
        kernel_size: the largest kernel of the branch's first conv (TinyTL: 5; odd).
        groups: the groups of the branch's first conv (TinyTL: 2; reduced to a divisor of both widths).
        bias: train the backbone's biases too (TinyTL's "lite_residual+bias").
        classifier: train the classifier whole.
        targets: blocks (globs); default the model's blocks.
    """

    name = "lite_residual"
    downsample: int = 2
    expand: float = 1.0
    kernel_size: int = 5
    groups: int = 2
    bias: bool = True
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()

        def posint(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        check(posint(self.downsample), LiteResidual, "downsample", f"must be an int >= 1, got {self.downsample!r}")
        check(isinstance(self.expand, (int, float)) and not isinstance(self.expand, bool) and self.expand > 0,
              LiteResidual, "expand", f"must be > 0, got {self.expand!r}")
        check(posint(self.kernel_size) and self.kernel_size % 2 == 1, LiteResidual, "kernel_size",
              f"must be an odd int >= 1, got {self.kernel_size!r}")
        check(posint(self.groups), LiteResidual, "groups", f"must be an int >= 1, got {self.groups!r}")
        for f in ("bias", "classifier"):
            check(isinstance(getattr(self, f), bool), LiteResidual, f, f"must be true/false, got {getattr(self, f)!r}")


def _divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least one), not below 90% of ``v`` (the
    MobileNet width rule the authors' ``make_divisible`` follows)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def branch(cfg: LiteResidual, c_in: int, c_out: int, size: int, stride: int) -> nn.Sequential:
    """The lite residual module for a block reading ``c_in`` channels at ``size`` (its smaller side)."""
    mid = _divisible(c_in * cfg.expand)
    pooled = size // cfg.downsample
    if pooled <= 1:  # the authors' global-pool case
        pool, k = nn.AdaptiveAvgPool2d(1), 1
    else:
        pool, k = nn.AvgPool2d(cfg.downsample, cfg.downsample), cfg.kernel_size
        while pooled < k:
            k -= 2
    g = math.gcd(math.gcd(c_in, mid), cfg.groups)
    lite = nn.Sequential()
    lite.add_module("pooling", pool)
    lite.add_module("conv1", nn.Conv2d(c_in, mid, k, stride if pooled > 1 else 1, k // 2, groups=g, bias=False))
    lite.add_module("bn1", nn.BatchNorm2d(mid))
    lite.add_module("act", nn.ReLU())
    lite.add_module("conv2", nn.Conv2d(mid, c_out, 1, bias=False))
    lite.add_module("final_bn", nn.BatchNorm2d(c_out))
    nn.init.zeros_(lite.final_bn.weight)  # the branch starts at zero
    return lite


def _geometry(shape_in: tuple[int, ...] | None, shape_out: tuple[int, ...] | None) -> tuple[int, int, int, int] | str:
    """``(c_in, c_out, size, stride)`` of a block, or why it cannot carry a branch."""
    if not shape_in or not shape_out:
        return "is not called in the traced forward"
    if len(shape_in) != 4 or len(shape_out) != 4:
        return f"maps a {len(shape_in)}-d input to a {len(shape_out)}-d output (the branch needs (N, C, H, W) maps)"
    (n, c_in, h, w), (n2, c_out, h2, w2) = shape_in, shape_out
    stride = h // h2 if h2 else 0
    if n != n2 or not stride or h2 * stride != h or w2 * stride != w:
        return f"maps {list(shape_in)} to {list(shape_out)}, not an integer stride of its input"
    return c_in, c_out, min(h, w), stride


#: block -> its branch: the module (not a child: a Sequential block would run it as a step) and where each of its
#: tensors lives on the block (``lite_residual_<path>``, registered as the block's own parameters and buffers)
BRANCHES: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Sequential, list[tuple[nn.Module, str, str, str]]]] = \
    weakref.WeakKeyDictionary()


def _attach(block: nn.Module, lite: nn.Sequential) -> list[str]:
    """Register the branch's tensors on ``block``; returns their names there."""
    slots = []
    for path, sub in lite.named_modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(sub, kind).items():
                if t is None:
                    continue
                flat = f"{ATTR}_{path.replace('.', '_')}_{key}" if path else f"{ATTR}_{key}"
                (block.register_parameter if kind == "_parameters" else block.register_buffer)(flat, t)
                slots.append((sub, kind, key, flat))
    BRANCHES[block] = (lite, slots)
    return [s[3] for s in slots]


def _run(block: nn.Module, x: Tensor) -> Tensor:
    lite, slots = BRANCHES[block]
    for sub, kind, key, flat in slots:  # the block's tensors, whatever replaced them (load_state_dict, .to())
        getattr(sub, kind)[key] = getattr(block, kind)[flat]
    lite.train(block.training)
    return lite(x)


def _branch(module: nn.Module, x: Tensor) -> Tensor | None:
    if module in BRANCHES:
        return _run(module, x)
    if f"{ATTR}_conv1_weight" in module._parameters:  # hooks and tensors copied (deepcopy), the branch not
        raise RuntimeError(f"{WHO}: this block's branch belongs to the model it was applied to (a deepcopy of an "
                           "applied model keeps the parameters, not the branch); apply the technique to the copy")
    return None


def _combine(y: Tensor, r: Tensor) -> Tensor:
    """The block's output plus the branch's map resized to it (bilinear, as the authors' upsample)."""
    return y + (r if r.shape[2:] == y.shape[2:] else F.interpolate(r, size=y.shape[2:], mode="bilinear",
                                                                   align_corners=False))


def _apply(model: nn.Module, cfg: LiteResidual, targets: list[str], structure: Structure) -> Undo:
    from edgetrain.techniques.bias_only import BIASED

    named = cfg.targets is not None
    roots = head(structure, f"{WHO}.classifier") if cfg.classifier else []
    modules = dict(model.named_modules())
    plan = []
    for name in targets:
        if under(name, roots) or any(under(name, [p]) for p, _ in plan):
            continue
        geo = _geometry(*structure.io.get(name, (None, None)))
        if isinstance(geo, str):
            if named:
                raise ConfigError(f"{WHO}: {name or 'the model'} {geo}")
            continue
        plan.append((name, geo))
    if not plan:
        raise ConfigError(f"{WHO}: no block of {structure.model} maps (N, C, H, W) maps at an integer stride "
                          f"(blocks: {structure.blocks[:4]}); name blocks with targets")
    params = dict(model.named_parameters())
    keep = {id(p) for n, p in params.items() if under(n.rpartition(".")[0], roots)}
    if cfg.bias:
        keep |= {id(params[p]) for lay in structure.layers.values() if lay.kind in BIASED for p in lay.params
                 if p.rpartition(".")[2] == "bias" and p in params}
    undo = Undo()
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    for name, (c_in, c_out, size, stride) in plan:
        block = modules[name]
        p = next(iter(block.parameters()), None)
        lite = branch(cfg, c_in, c_out, size, stride)
        if p is not None:
            lite.to(dtype=p.dtype, device=p.device)
        clash = [k for k, _ in block.named_parameters(recurse=False) if k.startswith(ATTR)]
        if clash:
            raise ConfigError(f"{WHO}: {name} already has a parameter named {clash[0]!r}")
        flat = _attach(block, lite)
        handle = _branch_hooks(block, _branch, _combine, undo)
        undo.changes += 1

        def drop(block: nn.Module = block, handle=handle, flat=flat) -> None:  # noqa: ANN001
            for h in handle:
                h.remove()
            for k in flat:
                block._parameters.pop(k, None)
                block._buffers.pop(k, None)
            BRANCHES.pop(block, None)

        undo.add(drop)
    # frozen no-save ops for the backbone (the branches are no modules of the model: they run stock)
    freeze_ops(model, lambda n: not under(n, roots), undo)
    return undo


register(
    TechniqueInfo(
        config=LiteResidual,
        apply=_apply,
        summary="TinyTL: a lite residual branch (pooled 2x, group conv, 1x1) beside each frozen block; biases train",
        paper="Cai et al., TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning, NeurIPS 2020, "
              "arXiv:2007.11622",
        reduces=frozenset({"activations", "grads", "optimizer"}),
        layer_kinds=None,
        default_targets=lambda model, structure: list(structure.blocks),
        looks_for="blocks mapping (N, C, H, W) maps at an integer stride",
        limits="blocks of other shapes (sequences, vectors) are skipped (refused when named)",
        conflicts=frozenset({"freeze", "bias_only", "sparse_update", "mobiletl", "int8_frozen", "lora", "krona",
                             "krona_block"}),
        # the branches are new modules the generic reference cannot name: tests/techniques/test_lite_residual.py
        # checks every gradient against the authors' form written as a plain module, in float64
        exact=False,
        grad_tolerance=0.0,
        # exact in float64 (relative 1e-12 on the zoo's EfficientNet); in float32 the branches' BatchNorms on 1x1
        # maps of a batch of 4 amplify rounding (relative 6e-4, cosine 0.9999998 there)
        grad_cosine=0.99999,
        examples=(LiteResidual(), LiteResidual(bias=False, classifier=False, kernel_size=3, downsample=1)),
    )
)
