"""PatchExecute: run the frozen, high-resolution first blocks of a network patch by patch.

Lin, Chen, Lin, Gan, Han, *MCUNetV2: Memory-Efficient Patch-based Inference for Tiny Deep Learning*, NeurIPS 2021,
arXiv:2110.15352 (patch-based inference), applied to training. The first blocks of a CNN hold the largest
feature maps. Where no gradient flows through them (they are frozen and below the first trainable layer, as in a
Freeze or SparseUpdate recipe), they run as plain inference, and inference can be tiled: the output is split into
``patches x patches`` spatial tiles, each tile's input region is cut from the input with its receptive-field halo,
the blocks run on that region alone, and the interior outputs are written into the full output. The forward then
holds one tile's intermediate maps at a time instead of the whole image's (plus the full input and output).

Exact, not approximate: the halo of each side is the receptive field of the kept outputs, computed from the ops the
blocks call (every ``conv2d``'s kernel, stride, padding and dilation, composed through pointwise ops and residual
adds), so no kept output reads a value the tile computed from its own zero border; tile origins are multiples of the
total stride, so every intermediate map of a tile is a window of the whole image's on the same stride grid; tiles
at the image borders keep the real zero padding. The redundant halo compute is what MCUNetV2's receptive-field
redistribution reduces; it is not done here (the blocks are run as the model defines them).

Where it refuses (one line each): blocks that are not consecutive children of one ``nn.Sequential`` with a stock
forward; any op in them other than ``conv2d`` with integer padding, ``batch_norm`` on running statistics, pointwise
activations and elementwise arithmetic (pooling, attention, reductions, reshapes, string or ``F.pad`` padding,
dropout); parameters in them, or in anything before them, that require grad when it is applied (apply it after the
technique that freezes them); a BatchNorm in them that would normalise with batch statistics (a train-mode BatchNorm
sees the whole batch and image; a frozen one under Freeze uses its running statistics) or an op that draws random
numbers in train mode (drop-path): both at apply (a probe compares the tiled blocks with the untiled ones on a random
input, in the current modes) and at the first forward that meets them. Float rounding: float64 dense convs (MKL's
GEMM) round differently with the number of output positions, so tiles differ from the whole image by about an ulp
(measured at most 3.4e-16 of the largest output; tests/techniques/test_patch_execute.py).

Stored for backward: nothing (no graph is built in the tiled blocks); transient: one tile's maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgetrain.apply import Undo, patch_forward, under
from edgetrain.errors import ConfigError
from edgetrain.ops import intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import ACTIVATION_OPS, OpRecord, Structure, base_op
from edgetrain.technique import Technique, check
from edgetrain.techniques._prefix import RANDOM_OPS, Region, check_frozen, probe, span


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchExecute(Technique):
    """Run the first ``blocks`` blocks of the model in ``patches x patches`` spatial tiles (MCUNetV2).

    The blocks must already be frozen (put it after Freeze / SparseUpdate in the recipe) and only convolve,
    normalise with running statistics and apply pointwise ops; see the module docstring for where it refuses.

    Args:
        blocks: how many of the model's first blocks (``edgetrain inspect``) run in patches. More blocks -> the
            high-resolution maps stay in tiles longer, but a wider halo (more recomputed border).
        patches: tiles per side (``patches**2`` tiles). More patches -> a smaller forward peak, more halo recompute.
        targets: modules to run in patches instead of the first ``blocks`` blocks (consecutive children of one
            ``nn.Sequential``). Recipe-level targets do not apply to it.
    """

    name = "patch_execute"
    blocks: int = 4
    patches: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.blocks, int) and not isinstance(self.blocks, bool) and self.blocks >= 1, PatchExecute,
              "blocks", f"must be an int >= 1, got {self.blocks!r}")
        check(isinstance(self.patches, int) and not isinstance(self.patches, bool) and self.patches >= 2,
              PatchExecute, "patches", f"must be an int >= 2 (tiles per side), got {self.patches!r}")


# ------------------------------------------------------------------------------------------------ the ops allowed
#: pointwise ops of one image tensor (activations and arithmetic); rrelu and dropout draw random numbers, glu halves
#: the channels
POINTWISE = (ACTIVATION_OPS - {"rrelu", "glu"}) | {
    "add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "neg", "abs",
    "clamp", "clamp_min", "clamp_max", "clip", "maximum", "minimum", "exp", "sqrt", "rsqrt", "square", "pow",
    "__pow__", "reciprocal", "addcmul", "contiguous", "clone"}
_WHY = (("pool", "pools"), ("norm", "normalises over the image"), ("attention", "attends over the image"),
        ("softmax", "normalises over the image"), ("dropout", "draws random numbers"), ("mean", "reduces"),
        ("sum", "reduces"), ("max", "reduces"), ("interpolate", "resamples"), ("upsample", "resamples"),
        ("pad", "pads in its own forward"), ("linear", "mixes positions"), ("matmul", "mixes positions"))
SUPPORTED = ("patches run only 2-d convolutions with integer padding, BatchNorm on running statistics, pointwise "
             "activations and elementwise ops")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One spatial axis of a tensor in the blocks, relative to their input: output ``o`` reads input positions
    ``[o*stride + lo, o*stride + hi]``; ``convs`` the ``(k_eff, stride, padding)`` chain that gives its size."""

    stride: int = 1
    lo: int = 0
    hi: int = 0
    convs: tuple[tuple[int, int, int], ...] = ()

    def conv(self, k: int, s: int, p: int, d: int) -> Axis:
        # output o reads positions o*s - p + j*d (j < k) of this tensor (arXiv:1603.07285 gives the size rule)
        return Axis(self.stride * s, self.lo - p * self.stride, self.hi + (d * (k - 1) - p) * self.stride,
                    (*self.convs, (d * (k - 1) + 1, s, p)))

    def size(self, n: int) -> int:
        for k, s, p in self.convs:
            n = (n + 2 * p - k) // s + 1
        return n

    def spans(self, n: int, patches: int) -> list[tuple[int, int, int, int]]:
        """``(o0, o1, a, b)``: output rows ``[o0, o1)`` of each tile and the input rows ``[a, b)`` they need; ``a``
        is a multiple of the total stride, so the tile's maps lie on the whole image's stride grid."""
        n_out = self.size(n)
        k = max(1, min(patches, n_out))
        cuts = [n_out * i // k for i in range(k + 1)]
        return [(o0, o1, max(0, o0 * self.stride + self.lo) // self.stride * self.stride,
                 min(n, (o1 - 1) * self.stride + self.hi + 1)) for o0, o1 in zip(cuts, cuts[1:])]


def _pair(v) -> tuple[int, int] | None:  # noqa: ANN001
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return v if len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v) else None


def _why(name: str) -> str:
    return next((why for key, why in _WHY if key in name), "which patches do not support")


class _Geometry:
    """The receptive field of the blocks' output, from the op log (raises a one-line ConfigError otherwise)."""

    def __init__(self, model: nn.Module, ops: list[OpRecord]) -> None:
        self.params = dict(model.named_parameters())
        self.shapes = {o: op.out_shape for op in ops for o in op.outputs[:1] if op.out_shape is not None}
        first = next((op for op in ops if op.inputs), ops[0])
        if not first.inputs or first.in_shape is None or len(first.in_shape) != 4:
            raise ConfigError(f"PatchExecute: {first.module} reads a {len(first.in_shape or ())}-d input; patches "
                              "tile (N, C, H, W) images")
        self.input_shape = first.in_shape
        self.shapes[first.inputs[0]] = first.in_shape
        self.geo: dict[int, tuple[Axis, Axis]] = {first.inputs[0]: (Axis(), Axis())}
        self.out: tuple[Axis, Axis] = self.geo[first.inputs[0]]
        for op in ops:
            self._op(op)

    def _refuse(self, op: OpRecord, what: str) -> None:
        raise ConfigError(f"PatchExecute: {op.module or '(root)'} calls {op.name} ({what}); {SUPPORTED}")

    def _op(self, op: OpRecord) -> None:
        name = base_op(op.name)
        data = [t for t in op.inputs if t in self.geo]
        if not data:  # computes on constants (a frozen BatchNorm's scale): the same in every tile
            if any(k in name for k in ("rand", "bernoulli", "normal", "dropout")):
                self._refuse(op, "draws random numbers")
            return
        if name == "conv2d":
            geo = self._conv(op, data)
        elif name == "batch_norm":
            if op.inputs[0] not in self.geo or len(data) != 1:
                self._refuse(op, "normalises a tensor that is not the image")
            geo = self.geo[op.inputs[0]]
        elif name in POINTWISE:
            geo = self._pointwise(op, data)
        else:
            self._refuse(op, _why(name))
        for t in op.outputs:
            self.geo[t] = geo
        self.out = geo

    def _conv(self, op: OpRecord, data: list[int]) -> tuple[Axis, Axis]:
        a = op.attrs
        stride, pad, dil = _pair(a.get("stride", 1)), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
        if isinstance(a.get("padding"), str):
            self._refuse(op, f"string padding {a['padding']!r}")
        if stride is None or pad is None or dil is None or data != [op.inputs[0]]:
            self._refuse(op, "non-integer stride, padding or dilation, or a computed weight")
        if op.params:
            shape = tuple(self.params[op.params[0]].shape)  # (C_out, C_in / groups, kh, kw)
        else:  # a weight computed in the forward (weight standardisation): its producer's shape
            shape = self.shapes.get(op.inputs[1]) if len(op.inputs) > 1 else None
        if shape is None or len(shape) != 4:
            self._refuse(op, "a kernel of unknown shape")
        gh, gw = self.geo[op.inputs[0]]
        return gh.conv(shape[2], stride[0], pad[0], dil[0]), gw.conv(shape[3], stride[1], pad[1], dil[1])

    def _pointwise(self, op: OpRecord, data: list[int]) -> tuple[Axis, Axis]:
        geos = [self.geo[t] for t in data]
        out = op.out_shape[-2:] if op.out_shape is not None and len(op.out_shape) == 4 else None
        if out is None or any(self.shapes.get(t, (None,))[-2:] != out for t in data):
            self._refuse(op, "changes the image's shape")
        if len({(g[0].stride, g[1].stride) for g in geos}) != 1:
            self._refuse(op, "combines maps on different stride grids")
        # what else it reads must be the same at every position: (C, 1, 1)-like or one element (prelu's weight is
        # per channel by definition)
        others = [tuple(self.params[p].shape) for p in op.params if base_op(op.name) != "prelu"]
        others += [self.shapes.get(t) for t in op.inputs if t not in self.geo]
        for shape in others:
            if shape is None or not (len(shape) >= 2 and shape[-2:] == (1, 1) or all(s == 1 for s in shape)):
                self._refuse(op, f"reads a tensor of shape {list(shape) if shape else '(unknown)'} from outside the "
                                 "blocks, which may vary over the image")

        def union(axes: list[Axis]) -> Axis:
            return Axis(axes[0].stride, min(x.lo for x in axes), max(x.hi for x in axes), axes[0].convs)

        return union([g[0] for g in geos]), union([g[1] for g in geos])


# ------------------------------------------------------------------------------------------------ execution
def run_patches(run: Callable[[Tensor], Tensor], x: Tensor, geo: tuple[Axis, Axis], patches: int) -> Tensor:
    """``run(x)`` computed tile by tile: each tile's interior written into one output tensor."""
    gh, gw = geo
    height, width = x.shape[-2:]
    out = None
    for o0, o1, a, b in gh.spans(height, patches):
        for q0, q1, c, d in gw.spans(width, patches):
            # a copy, not a view: an in-place op in the blocks must not reach the overlapping halo of the next tile
            y = run(x[..., a:b, c:d].clone())  # (N, C', h', w'): the whole output's window from row a/S, column c/S
            r, s = o0 - a // gh.stride, q0 - c // gw.stride
            piece = y[..., r:r + o1 - o0, s:s + q1 - q0]
            if tuple(piece.shape[-2:]) != (o1 - o0, q1 - q0):
                raise ConfigError(f"PatchExecute: a tile of rows {a}:{b}, columns {c}:{d} gave a {list(y.shape)} "
                                  f"output, short of its interior ({o1 - o0}x{q1 - q0})")
            if out is None:
                out = y.new_empty((*y.shape[:-2], gh.size(height), gw.size(width)))  # (N, C', H', W')
            out[..., o0:o1, q0:q1] = piece
            del y, piece
    return out


class _Patched(Region):
    """The wrapped Sequential: children before the blocks, the blocks in patches, the rest, in order."""

    who = "PatchExecute"
    what = "patches"

    def __init__(self, parent: nn.Sequential, first: int, last: int, geo: tuple[Axis, Axis], patches: int,
                 undo: Undo) -> None:
        super().__init__(parent, first, last, undo)
        self.geo, self.patches = geo, patches

    def pieces(self, x: Tensor) -> Tensor:
        return run_patches(self.run, x, self.geo, self.patches)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ConfigError(f"PatchExecute: the blocks got {type(x).__name__} "
                              f"{list(x.shape) if isinstance(x, Tensor) else ''}; patches tile (N, C, H, W) images")
        super().check_input(x)


# ------------------------------------------------------------------------------------------------ apply
def _blocks(cfg: PatchExecute, targets: list[str], structure: Structure) -> list[str]:
    if cfg.targets is not None:
        return [n for n in targets if not any(n.startswith(o + ".") for o in targets)]
    if cfg.blocks > len(structure.blocks):
        raise ConfigError(f"PatchExecute.blocks: {cfg.blocks} > the model's {len(structure.blocks)} blocks "
                          f"({structure.block_source})")
    return list(structure.blocks[:cfg.blocks])


def _apply(model: nn.Module, cfg: PatchExecute, targets: list[str], structure: Structure) -> Undo:
    names = _blocks(cfg, targets, structure)
    where, parent, first, last = span(model, names, "PatchExecute")
    tiled = [f"{where}.{k}" if where else k for k in list(parent._modules)[first:last + 1]]  # blocks + what is between
    ops = [op for op in structure.ops if under(op.module, tiled)]
    if not ops:
        raise ConfigError(f"PatchExecute: blocks {names} call no op in the traced forward")
    geometry = _Geometry(model, ops)
    check_frozen(model, structure, ops[0].index, names, "PatchExecute")
    undo = Undo()
    patched = _Patched(parent, first, last, geometry.out, cfg.patches, undo)
    try:
        patch_forward(parent, patched.forward, undo)
        intercept(model, ("batch_norm", *RANDOM_OPS), patched.guard, undo, count=False)
        dtype = next((p.dtype for p in patched.params if p.is_floating_point()), torch.get_default_dtype())
        x = torch.randn(geometry.input_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)  # as traced
        err = probe(patched, x)
        tol = 1e-12 if dtype == torch.float64 else 1e-5  # float rounding of the conv algorithm on another size
        if not err <= tol:
            raise ConfigError(f"PatchExecute: the tiled blocks differ from the whole image (relative difference "
                              f"{err:.3g}); not applied")
    except BaseException:
        undo.remove()
        raise
    return undo


def _example_model(dtype: torch.dtype) -> nn.Module:
    from edgetrain.testing.patch_net import patch_net

    return patch_net(dtype)


register(
    TechniqueInfo(
        config=PatchExecute,
        apply=_apply,
        summary="run the frozen first blocks in patches x patches spatial tiles with their receptive-field halo "
                "(exact): the forward holds one tile's maps",
        paper="Lin et al., MCUNetV2: Memory-Efficient Patch-based Inference for Tiny Deep Learning, NeurIPS 2021, "
              "arXiv:2110.15352",
        reduces=frozenset({"activations"}),
        default_targets=lambda model, structure: [],
        looks_for="frozen convolutional first blocks in one nn.Sequential",
        limits="first blocks only, frozen (after Freeze/SparseUpdate), children of one nn.Sequential; conv2d, "
               "BatchNorm on running statistics, pointwise and elementwise ops only",
        examples=(PatchExecute(blocks=3, patches=2), PatchExecute(blocks=2, patches=3)),
        example_model=_example_model,
    )
)
