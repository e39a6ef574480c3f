"""KronA^B and KronA^B_res: a Kronecker adapter beside a whole block, with an optional learnable residual.

Edalati et al., *KronA: Parameter Efficient Tuning with Kronecker Adapter*, arXiv:2212.10650 (spec algorithms_B
§5.2): KronA^B sits in parallel with a block (the paper: a T5 FFN sub-block), ``h = block(x) + s * (A kron B) x``;
KronA^B_res adds a learnable scalar residual, ``+ lambda * x`` (the paper's best variant). Because the block is
non-linear the update cannot be folded into any weight: :func:`edgetrain.techniques.krona.merge` refuses a model
holding one, and the deployed model keeps the branch (its latency is an extra ``a*b``-sized product per token).

Acts on the block's call (hooks, :mod:`edgetrain.techniques._branch`: the block's own forward runs unchanged): ``x``
is the first tensor the block is called with, read before the block runs; the update is added to the first tensor it
returns (a tuple's first element, as ``transformers`` layers return). Features are the last dimension, or the
channels of a 4-d (N, C, H, W) input or of a 3-d one whose block starts with a conv1d; the
block's output must keep the input's other dimensions (a block that changes the spatial size or sequence length is
skipped by default and refused when named). Default targets: the model's blocks (``edgetrain inspect`` lists them).
Init: ``A`` zero (the model computes what it did), ``B`` Kaiming-uniform; ``lambda`` starts at 0 [MEM in the spec:
its init is not stated; 0 keeps the model unchanged at the start]. Everything else is frozen (the block's own
weights through the frozen no-save ops), except the classifier when ``classifier=True``.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import Tensor, nn

from edgetrain.apply import set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.ops import Undo
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._adapter import UNMERGEABLE
from edgetrain.techniques._branch import install as _branch_hooks
from edgetrain.techniques._frozen import freeze_ops
from edgetrain.techniques.freeze import head
from edgetrain.techniques.krona import kron_apply, shapes
from edgetrain.techniques.patch_execute import _example_model

WHO = "KronABlock"
#: adapted block -> (scale, features dimension): what a reference needs to recompute the branch
BLOCKS: weakref.WeakKeyDictionary[nn.Module, tuple[float, int]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, kw_only=True)
class KronABlock(Technique):
    """A Kronecker adapter beside each target block (KronA^B), with a learnable residual (KronA^B_res).

    Args:
        residual: add ``lambda * x`` with a learnable scalar ``lambda`` per block (KronA^B_res; needs the block's
            output features to equal its input's).
        factors: ``(a1, a2)``, ``A``'s shape for every block; default per block, each dimension near its square root.
        scale: the update's fixed factor ``s``.
        classifier: train the classifier whole.
        targets: blocks (globs over module names); default the model's blocks.
    """

    name = "krona_block"
    residual: bool = False
    factors: tuple[int, int] | None = None
    scale: float = 1.0
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factors, list):
            object.__setattr__(self, "factors", tuple(self.factors))
        check(isinstance(self.residual, bool), KronABlock, "residual", f"must be true/false, got {self.residual!r}")
        check(self.factors is None or (isinstance(self.factors, tuple) and len(self.factors) == 2 and
                                       all(isinstance(f, int) and not isinstance(f, bool) and f >= 1
                                           for f in self.factors)), KronABlock, "factors",
              f"must be two ints >= 1 (A's shape), got {self.factors!r}")
        check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0,
              KronABlock, "scale", f"must be > 0, got {self.scale!r}")
        check(isinstance(self.classifier, bool), KronABlock, "classifier",
              f"must be true/false, got {self.classifier!r}")


def _features(shape_in: tuple[int, ...], shape_out: tuple[int, ...], channels_first: bool = False
              ) -> tuple[int, int, int] | str:
    """``(dim, in, out)`` for a block mapping ``shape_in`` to ``shape_out``, or why it cannot carry the branch.
    Features: the channels of (N, C, H, W), and of (N, C, T) when ``channels_first`` (the block's first weight op is
    a conv1d); else the last dimension (a sequence's (N, L, D), a vector's (N, D))."""
    if len(shape_in) != len(shape_out) or len(shape_in) < 2:
        return f"maps a {len(shape_in)}-d input to a {len(shape_out)}-d output"
    dim = 1 if len(shape_in) == 4 or (len(shape_in) == 3 and channels_first) else len(shape_in) - 1
    rest_in, rest_out = [s for i, s in enumerate(shape_in) if i != dim], [s for i, s in enumerate(shape_out) if i != dim]
    if rest_in != rest_out:
        return f"changes the shape around its features ({list(shape_in)} -> {list(shape_out)})"
    return dim, shape_in[dim], shape_out[dim]


def _branch(cfg: KronABlock, dim: int):  # noqa: ANN202
    def branch(module: nn.Module, x: Tensor) -> Tensor | None:
        if "krona_A" not in module._parameters:
            return None
        k = kron_apply(module.krona_A, module.krona_B, x, dim=dim)
        # the scale as add's alpha: a Python-number factor of mul would be kept as a tensor outside the hooks
        return torch.add(module.krona_lambda * x, k, alpha=cfg.scale) if cfg.residual else k

    return branch


def _apply(model: nn.Module, cfg: KronABlock, targets: list[str], structure: Structure) -> Undo:
    named = cfg.targets is not None
    modules = dict(model.named_modules())
    roots = head(structure, f"{WHO}.classifier") if cfg.classifier else []
    plan = []
    for name in targets:
        if under(name, roots) or any(under(name, [p]) for p, _ in plan):  # inside the classifier or a chosen block
            continue
        shape_in, shape_out = structure.io.get(name, (None, None))
        first = next((op.name for op in structure.ops if op.params and under(op.module, [name])), None)
        why = "is not called in the traced forward" if not shape_in or not shape_out else _features(
            shape_in, shape_out, first == "conv1d")
        if isinstance(why, str):
            if named:
                raise ConfigError(f"{WHO}: {name or 'the model'} {why}; the branch needs the block's input and output "
                                  "to differ only in their features")
            continue
        dim, d_in, d_out = why
        if cfg.residual and d_in != d_out:
            if named:
                raise ConfigError(f"{WHO}: {name} maps {d_in} to {d_out} features; residual=true needs them equal")
            continue
        plan.append((name, (dim, *shapes(d_out, d_in, cfg.factors, f"{WHO}: {name}"))))
    if not plan:
        raise ConfigError(f"{WHO}: no block of {structure.model} keeps its input's shape but for the features "
                          f"(blocks: {structure.blocks[:4]}); name blocks with targets")
    undo = Undo()
    keep = {id(p) for n, p in model.named_parameters() if under(n.rpartition(".")[0], roots)}
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    for name, (dim, a1, a2, b1, b2) in plan:
        block = modules[name]
        p = next(iter(block.parameters()), None)
        kw = {"dtype": p.dtype if p is not None else torch.get_default_dtype(), "device": p.device if p is not None
              else None}
        b = torch.empty(b1, b2, **kw)
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        block.register_parameter("krona_A", nn.Parameter(torch.zeros(a1, a2, **kw)))
        block.register_parameter("krona_B", nn.Parameter(b))
        if cfg.residual:
            block.register_parameter("krona_lambda", nn.Parameter(torch.zeros((), **kw)))
        BLOCKS[block] = (cfg.scale, dim)
        UNMERGEABLE[block] = "carries a KronA^B branch beside a non-linear block (no weight can absorb it)"
        combine = (lambda y, r: y + r) if cfg.residual else (lambda y, r: torch.add(y, r, alpha=cfg.scale))
        handle = _branch_hooks(block, _branch(cfg, dim), combine, undo)
        undo.changes += 1

        def drop(block: nn.Module = block, handle=handle) -> None:  # noqa: ANN001
            for h in handle:
                h.remove()
            for k in ("krona_A", "krona_B", "krona_lambda"):
                if k in block._parameters:
                    delattr(block, k)
            UNMERGEABLE.pop(block, None)
            BLOCKS.pop(block, None)

        undo.add(drop)
    freeze_ops(model, lambda n: not under(n, roots), undo)
    return undo


register(
    TechniqueInfo(
        config=KronABlock,
        apply=_apply,
        summary="KronA^B(_res): a Kronecker adapter beside each block (+ learnable residual); not mergeable",
        paper="Edalati et al., KronA: Parameter Efficient Tuning with Kronecker Adapter, ENLSP-III @ NeurIPS 2023, "
              "arXiv:2212.10650",
        reduces=frozenset({"grads", "optimizer"}),
        layer_kinds=None,
        default_targets=lambda model, structure: list(structure.blocks),
        looks_for="blocks whose output keeps the input's shape but for the features",
        limits="blocks that change the spatial size or sequence length are skipped (refused when named); the branch "
               "stays in the deployed model (merge refuses)",
        conflicts=frozenset({"freeze", "bias_only", "sparse_update", "mobiletl", "int8_frozen", "lora", "krona"}),
        # exact, but the adapters are new parameters the generic reference cannot name:
        # tests/techniques/test_krona.py checks the gradients against plain PyTorch in float64
        exact=False,
        grad_tolerance=0.0,
        examples=(KronABlock(), KronABlock(residual=True, scale=0.5, classifier=False)),
        example_model=_example_model,  # blocks that keep their shape (the residual variant needs one)
    )
)
