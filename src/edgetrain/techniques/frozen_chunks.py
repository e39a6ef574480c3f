"""FrozenChunks: run the frozen first part of a network on the batch in chunks; the trained part sees the whole batch.

Where no gradient flows through the first blocks (frozen, with nothing before them that trains: a Freeze or
SparseUpdate recipe), they run as plain inference, and inference of a network without batch statistics computes each
sample on its own. So the batch can go through them in ``chunks`` groups of samples, each chunk's output written
into one output tensor: the forward then holds one chunk's intermediate maps, not the whole batch's, while the
trained blocks, their BatchNorm statistics, the loss and the gradient are the full batch's. It is the part of
micro-batching (:func:`edgetrain.execution.run_step`) that changes nothing: micro-batches also shrink the trained
part's saved activations, but normalise each micro-batch by its own statistics (the T1 accuracy cost is in
docs/memory.md). The frozen first blocks of a CNN hold its largest maps, so that is where the step's peak is (TTE,
Lin et al., *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472, §2: the peak of a training step
on a small device is the forward of the high-resolution layers; MCUNetV2, arXiv:2110.15352, cuts the same peak with
spatial patches instead, :mod:`.patch_execute`).

What it chunks: from the model down, the leading children of each module that hold no trainable parameter and call
only ops before the first op that trains; in a stock ``nn.Sequential`` they run in chunks together (its forward
wrapped), elsewhere each one that has children runs in chunks on its own (its own forward wrapped, called once per
call; a ``ModuleList`` stands for its children), then the same inside the first
child that trains. A module called with other tensors too (a mask beside hidden states) or with keyword arguments
runs whole: which of their dimensions is the batch is not known.

Exact, up to float rounding of the kernels on another batch size: the chunks run the blocks as the model defines them
(probed at apply on a random input against the whole batch; measured bit-exact on MobileNetV2 in float32 here,
tests/techniques/test_frozen_chunks.py). Where it refuses (one line each): nothing frozen before the first op that
trains; ``targets`` that are not consecutive children of one stock ``nn.Sequential``; a BatchNorm in the chunks that
would normalise with batch statistics or an op that draws random numbers in train mode (both change with the
chunking: at apply by the probe and at the first forward that meets them); any op that mixes samples (the probe sees
the difference). Where it finds the frozen prefix itself, a part of it that refuses so is left whole (what it
computes is unchanged: it is just not chunked) and the rest runs in chunks; if every part refuses, it refuses with
the first reason; named ``targets`` refuse at once.

Stored for backward: nothing (no graph is built in the chunks); transient: one chunk's maps and the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.apply import Undo, patch_forward, under
from edgetrain.errors import ConfigError
from edgetrain.ops import intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._prefix import RANDOM_OPS, Region, check_frozen, probe, span
from edgetrain.techniques.patch_execute import _example_model  # the same frozen-stem model

WHO = "FrozenChunks"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenChunks(Technique):
    """Run the frozen first blocks on the batch in ``chunks`` chunks (the rest of the step sees the whole batch).

    Put it after the technique that freezes them (Freeze, SparseUpdate); it composes with FrozenInference and
    Int8Frozen, and with micro-batches (each micro-batch is chunked).

    Args:
        chunks: pieces of the batch (at most the batch size are used). More chunks -> a smaller forward peak, smaller
            kernel calls.
        targets: modules to run in chunks (consecutive children of one ``nn.Sequential``) instead of the frozen
            prefix it finds (the module docstring says how).
    """

    name = "frozen_chunks"
    chunks: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.chunks, int) and not isinstance(self.chunks, bool) and self.chunks >= 2, FrozenChunks,
              "chunks", f"must be an int >= 2, got {self.chunks!r}")


class _Chunked(Region):
    """One chunked unit: consecutive children of a stock Sequential (its forward wrapped: the children before them,
    them in chunks, the rest), or one module (its own forward, ``fn``, run in chunks)."""

    who = WHO
    what = "chunks"

    def __init__(self, parent: nn.Module, first: int, last: int, chunks: int, undo: Undo,
                 fn: Callable[..., Any] | None = None) -> None:
        if fn is None:
            super().__init__(parent, first, last, undo)
        else:
            self.before, self.inner, self.after, self.undo, self.active = [], [parent], [], undo, False
            self.params = list(parent.parameters())
        self.fn, self.chunks, self.bypass = fn, chunks, False

    def run(self, x: Tensor, *args: Any) -> Tensor:
        # a module's own forward, inside its call (its hooks, and the op dispatcher's scope, entered once)
        return super().run(x) if self.fn is None else self.fn(x, *args)

    def pieces(self, x: Tensor, *args: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ConfigError(f"{WHO}: the blocks got {type(x).__name__}; chunks split a batched tensor")
        n = x.shape[0]
        if n == 0:
            return self.run(x, *args)
        out, a = None, 0
        for b in [round(i * n / min(self.chunks, n)) for i in range(1, min(self.chunks, n) + 1)]:
            y = self.run(x[a:b], *args)
            if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != b - a:
                raise ConfigError(f"{WHO}: the blocks returned {type(y).__name__} "
                                  f"{list(y.shape) if isinstance(y, Tensor) else ''} for a chunk of {b - a}; "
                                  "chunks need one tensor with the batch first")
            if out is None:
                out = y.new_empty((n, *y.shape[1:]))  # (N, ...): the whole batch's output
            out[a:b] = y
            a = b
            del y
        return out

    def wrapped(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # a call with other tensors (a mask beside hidden states) or keyword arguments runs whole: which of their
        # dimensions is the batch is not known
        if self.bypass or kwargs or any(isinstance(a, Tensor) for a in args):
            return self.fn(x, *args, **kwargs)
        return super().wrapped(x, *args)

    def probe_split(self, x: Tensor) -> Tensor:
        if self.fn is None:
            return super().probe_split(x)
        hits = self.undo.hits
        try:
            return self.inner[0](x)  # through the module's call: its scope entered once, then the chunks
        finally:
            self.undo.hits = hits

    def probe_whole(self, x: Tensor) -> Tensor:
        if self.fn is None:
            return super().probe_whole(x)
        self.bypass = True
        try:
            return self.inner[0](x)
        finally:
            self.bypass = False


@dataclasses.dataclass(frozen=True)
class Unit:
    """What runs in chunks: ``names`` (consecutive children of the stock Sequential ``parent``, or one module)."""

    parent: str | None  # the Sequential holding them, or None: one module with its own forward
    names: tuple[str, ...]


def _frozen_names(model: nn.Module, structure: Structure) -> tuple[Callable[[str], bool], dict[str, list[int]]]:
    """``frozen(name)`` (no trainable parameter, only ops before the first that trains) and the op indices each
    module (with its children) calls."""
    params = dict(model.named_parameters())
    trains = [op.index for op in structure.ops if any(params[p].requires_grad for p in op.params if p in params)]
    if not trains:
        raise ConfigError(f"{WHO}: nothing in the model trains; chunks run the frozen part before the trained one")
    first = min(trains)
    calls: dict[str, list[int]] = {}
    for op in structure.ops:
        parts = op.module.split(".") if op.module else []
        for i in range(len(parts) + 1):
            calls.setdefault(".".join(parts[:i]), []).append(op.index)

    def frozen(name: str) -> bool:
        ops = calls.get(name)
        return bool(ops) and max(ops) < first and not any(
            p.requires_grad for p in model.get_submodule(name).parameters())

    return frozen, calls


def _callable(model: nn.Module, names: list[str]) -> list[str]:
    """The modules among ``names`` worth chunking on their own: those with children; a ModuleList/ModuleDict (never
    called itself) stands for its children."""
    out = []
    for k in names:
        m = model.get_submodule(k)
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            out += _callable(model, [f"{k}.{c}" for c in m._modules])
        elif m._modules:
            out.append(k)
    return out


def prefix(model: nn.Module, structure: Structure) -> list[Unit]:
    """The frozen prefix, from the model down: in each module, its leading children that hold no trainable parameter
    and call only ops before the first op that trains; in a stock Sequential they run in chunks together, elsewhere
    each one that has children of its own does; then the same inside the first child that is not frozen."""
    frozen, calls = _frozen_names(model, structure)
    units: list[Unit] = []
    where = ""
    while True:
        parent = model.get_submodule(where)
        stock = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        kids = [f"{where}.{k}" if where else k for k in parent._modules]
        kids = [k for k in kids if k in calls or (stock and not any(  # a Sequential calls an nn.Identity too
            p.requires_grad for p in model.get_submodule(k).parameters()))]  # children the forward calls, in order
        run = []
        for k in kids:
            if not (frozen(k) or (stock and k not in calls)):
                break
            run.append(k)
        stop = len(run)  # the first child not in the run
        while run and run[-1] not in calls:  # no op-less child at the end of a run
            run.pop()
        if run and stock:
            if len(run) > 1 or model.get_submodule(run[0])._modules:  # one leaf (a dropout before a head): no gain
                units.append(Unit(where, tuple(run)))
        else:
            units += [Unit(None, (k,)) for k in _callable(model, run)]
        if stop == len(kids):
            break
        where = kids[stop]  # the first child that trains: its own frozen first part
    if not units:
        raise ConfigError(f"{WHO}: no frozen modules before the first op that trains; apply it after the technique "
                          "that freezes them")
    return units


def _entry_shape(structure: Structure, inner: list[str]) -> tuple[int, ...]:
    """The shape of the first tensor the unit's ops read that none of its earlier ops produced (its input; an
    in-place first op reads and writes the same tensor)."""
    made: set[int] = set()
    for op in structure.ops:
        if not under(op.module, inner):
            continue
        if op.inputs and op.inputs[0] not in made and op.in_shape:
            return op.in_shape
        made.update(op.outputs)
    raise ConfigError(f"{WHO}: could not find the batched input of {inner} in the traced forward")


def _install(model: nn.Module, unit: Unit, chunks: int, undo: Undo, own: Undo) -> _Chunked:
    """Wrap the unit's forward (removed by ``own``); its calls count in ``undo.hits``."""
    if unit.parent is None:
        module = model.get_submodule(unit.names[0])
        chunked = _Chunked(module, 0, 0, chunks, undo, fn=module.forward)
        patch_forward(module, chunked.wrapped, own)
        return chunked
    _, parent, first, last = span(model, list(unit.names), WHO)
    chunked = _Chunked(parent, first, last, chunks, undo)
    patch_forward(parent, chunked.forward, own)
    return chunked


def _check(chunked: _Chunked, shape: tuple[int, ...], unit: Unit, chunks: int) -> None:
    """Chunks == whole on a random batch of the traced shape, in the current modes (a one-line ConfigError)."""
    dtype = next((p.dtype for p in chunked.params if p.is_floating_point()), torch.get_default_dtype())
    x = torch.randn((2 * chunks + 1, *shape[1:]), generator=torch.Generator().manual_seed(0), dtype=dtype)  # uneven
    err = probe(chunked, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float rounding of the kernels on another batch size
    if not err <= tol:
        raise ConfigError(f"{WHO}: {', '.join(unit.names)} in chunks differ from the whole batch (relative "
                          f"difference {err:.3g}: an op mixes samples); not applied")


def _apply(model: nn.Module, cfg: FrozenChunks, targets: list[str], structure: Structure) -> Undo:
    named = cfg.targets is not None
    if named:
        names = [n for n in targets if not any(n.startswith(o + ".") for o in targets)]
        units = [Unit(span(model, names, WHO)[0], tuple(names))]
        ops = [op for op in structure.ops if under(op.module, names)]
        check_frozen(model, structure, ops[0].index if ops else 0, names, WHO)
    else:
        units = prefix(model, structure)
    undo = Undo()
    kept: list[_Chunked] = []
    refused: list[str] = []
    try:
        intercept(model, ("batch_norm", *RANDOM_OPS), lambda call: next(
            (r for r in (c.guard(call) for c in kept) if r is not NotImplemented), NotImplemented), undo, count=False)
        for unit in units:
            own = Undo()
            undo.add(own.remove)  # removing twice is a no-op
            chunked = None
            try:
                shape = _entry_shape(structure, list(unit.names))
                chunked = _install(model, unit, cfg.chunks, undo, own)
                kept.append(chunked)
                _check(chunked, shape, unit, cfg.chunks)
            except ConfigError as e:  # this unit runs whole (what it computes is unchanged); named targets refuse
                if chunked in kept:
                    kept.remove(chunked)
                own.remove()
                if named:
                    raise
                refused.append(str(e))
        if not kept:
            more = f" ({len(refused) - 1} more frozen modules refused)" if len(refused) > 1 else ""
            raise ConfigError(refused[0] + more)
    except BaseException:
        undo.remove()
        raise
    return undo


register(
    TechniqueInfo(
        config=FrozenChunks,
        apply=_apply,
        summary="run the frozen first blocks on the batch in chunks (exact; the trained part sees the whole batch): "
                "the forward holds one chunk's maps",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472 (the forward peak "
              "of the frozen high-resolution layers); chunked inference, no paper",
        reduces=frozenset({"compute"}),  # transient buffers of the forward: the peak, not saved activations
        default_targets=lambda model, structure: [],
        looks_for="frozen modules before the first op that trains (apply it after a freezing technique)",
        limits="the frozen first part only (after Freeze/SparseUpdate); no batch statistics, random ops, buffer "
               "updates or ops that mix samples in it; a module called with other tensors runs whole",
        conflicts=frozenset({"patch_execute"}),
        examples=(FrozenChunks(chunks=2), FrozenChunks(chunks=3)),
        example_model=_example_model,
    )
)
