"""What edgetrain thinks a model is: its layers, activations, norms, blocks and classifier, from one traced forward.

Nothing here looks at module classes to decide what a module *does*. One forward of an example input (eval mode,
no grad, state untouched) under the model's :class:`~edgetrain.ops.Dispatcher` records every torch function call:
its op name, the innermost module running, the parameters it reads and which earlier results it consumes. From
that log:

* **layers**: modules whose own parameters feed a weight op (``conv1d/2d/3d``, ``linear``, ``embedding``,
  ``batch_norm``, ``layer_norm``, ``group_norm``, ...), with the op kind, e.g. a ``Conv2d`` subclass that pads in
  its own forward is a ``conv2d`` layer, and ``transformers``' ``Conv1D`` an ``addmm`` layer;
* **activations**: activation ops (``relu``, ``relu6``, ``hardtanh``, ``gelu``, ``silu``, ...) by the module that
  calls them, functional calls included;
* **classifier**: the owner of the weight of the last ``linear`` (or conv) op in call order;
* **blocks**: the model's repeated units. A module call is a *cut* when at its start and at its end at most one
  parameter-dependent tensor is alive (what a block boundary is: only the hidden state crosses it; residual
  branches inside a block do not). The block class is the module class, other than torch's containers
  (``Sequential``, ``ModuleList``, ``ModuleDict``), with the most instances (at least two) that are all cuts;
  blocks are then the units of the forward in call order at that level (containers and modules holding blocks
  are descended into; modules with no parameters are skipped; the classifier is the head, not a block). Without
  such a class, the units of the top-level containers;
* **opaque**: parameters read only by composite calls that edgetrain cannot see into
  (``F.multi_head_attention_forward``), so techniques that act on ``linear`` cannot reach them.

``model.block_names`` / ``model.classifier_name`` (the built-in zoo sets them) or a recipe's ``blocks`` globs and
``classifier`` override what is derived. ``edgetrain inspect`` prints the result.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from edgetrain.errors import ConfigError
from edgetrain.inputs import call_model

WEIGHT_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                        "linear", "bilinear", "embedding", "embedding_bag", "addmm", "matmul", "mm", "bmm"})
NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})
#: activation ops (in-place variants end in ``_``)
ACTIVATION_OPS = frozenset({"relu", "relu6", "hardtanh", "hardswish", "gelu", "silu", "sigmoid", "tanh",
                            "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardsigmoid", "prelu", "glu",
                            "logsigmoid", "softsign", "threshold", "rrelu"})
OPAQUE_OPS = frozenset({"multi_head_attention_forward"})
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def base_op(name: str) -> str:
    """``relu_`` -> ``relu`` (in-place variants), ``__mul__`` stays."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


@dataclasses.dataclass
class OpRecord:
    """One torch function call of the traced forward."""

    index: int
    name: str
    module: str
    params: tuple[str, ...]  # qualified names of the parameters it read
    inputs: tuple[int, ...]  # ids of the tensors it read (parameters excluded)
    outputs: tuple[int, ...]
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    attrs: dict = dataclasses.field(default_factory=dict)  # a conv's stride, padding, dilation, groups


@dataclasses.dataclass
class Layer:
    """A module whose own parameters feed weight/norm ops."""

    name: str
    kind: str  # op of its ``weight`` (else of its first parameter): conv2d, linear, batch_norm, ...
    params: tuple[str, ...]
    calls: int  # ops of this kind that read its weight (a module called twice counts twice)
    in_shape: tuple[int, ...] | None  # of the first call, batch included
    out_shape: tuple[int, ...] | None


@dataclasses.dataclass
class Structure:
    """The derived structure of a model (see the module docstring)."""

    model: str  # class name
    ops: list[OpRecord]
    call_order: list[str]  # modules in the order of their first call
    layers: dict[str, Layer]  # in call order
    activations: dict[str, list[str]]  # module -> activation ops it calls, in order
    blocks: list[str]
    block_source: str  # "derived (<class> x n)", "model.block_names", "recipe", "top-level units"
    classifier: str | None
    opaque: dict[str, list[str]]  # module -> parameters read only inside opaque composite calls
    unused: list[str]  # modules with parameters never called in the traced forward
    io: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = dataclasses.field(default_factory=dict)
    # module -> shapes of the first tensor its first call read and returned

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``edgetrain inspect --json``): the derived structure without the op log."""
        layers = [{"name": lay.name, "kind": lay.kind, "params": list(lay.params), "calls": lay.calls,
                   "out_shape": list(lay.out_shape) if lay.out_shape else None} for lay in self.layers.values()]
        return {"model": self.model, "blocks": list(self.blocks), "block_source": self.block_source,
                "classifier": self.classifier, "layers": layers, "activations": dict(self.activations),
                "opaque": dict(self.opaque), "unused": list(self.unused)}

    def layers_of(self, kinds: Sequence[str] | frozenset[str]) -> list[str]:
        return [n for n, lay in self.layers.items() if lay.kind in kinds]

    def within(self, name: str, roots: Sequence[str]) -> bool:
        return any(name == r or name.startswith(r + ".") or not r for r in roots)

    def followers(self, layer: str, kinds: frozenset[str] = NORM_OPS) -> str | None:
        """The layer whose ``kinds`` op first reads ``layer``'s output (a conv's BatchNorm), if any."""
        outs = {o for op in self.ops if op.name in WEIGHT_OPS and op.params and
                op.params[0].rpartition(".")[0] == layer for o in op.outputs}  # the layer owns the op's weight
        for op in self.ops:
            if op.name in kinds and op.params and outs & set(op.inputs):
                return op.params[0].rpartition(".")[0]
        return None


# ------------------------------------------------------------------------------------------------ tracing
class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.ops: list[OpRecord] = []
        self.calls: list[tuple[str, int, int]] = []  # (module, first op, end op) per module call
        self.keep: list[Any] = []  # keep traced tensors alive: their ids stay unique
        self.io: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {}  # first call's tensor shapes

    def enter(self, name: str, args: Any, kwargs: Any) -> None:
        if name not in self.io:
            self.io[name] = (_first_shape((args, kwargs)), None)

    def leave(self, name: str, out: Any) -> None:
        if name in self.io and self.io[name][1] is None:
            self.io[name] = (self.io[name][0], _first_shape(out) or ())

    def record(self, call) -> Any:  # noqa: ANN001
        out = call.proceed()
        name = call.name
        if name in ("__get__", "size", "dim", "numel", "__len__", "is_floating_point", "element_size"):
            return out
        flat_in, _ = tree_flatten((call.args, call.kwargs))
        flat_out, _ = tree_flatten(out)
        params = tuple(self.params[id(t)] for t in flat_in if isinstance(t, Tensor) and id(t) in self.params)
        ins = tuple(id(t) for t in flat_in if isinstance(t, Tensor) and id(t) not in self.params)
        outs = tuple(id(t) for t in flat_out if isinstance(t, Tensor))
        first_in = next((t for t in flat_in if isinstance(t, Tensor) and id(t) not in self.params), None)
        first_out = next((t for t in flat_out if isinstance(t, Tensor)), None)
        self.keep.append((flat_in, flat_out))
        attrs = {}
        if base_op(name) in ("conv1d", "conv2d", "conv3d"):
            attrs = {k: call.arg(i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1),
                                                          (6, "groups", 1))}
        self.ops.append(OpRecord(len(self.ops), name, call.module, params, ins, outs,
                                 tuple(first_in.shape) if first_in is not None else None,
                                 tuple(first_out.shape) if first_out is not None else None, attrs))
        return out


def _first_shape(tree: Any) -> tuple[int, ...] | None:
    flat, _ = tree_flatten(tree)
    return next((tuple(t.shape) for t in flat if isinstance(t, Tensor)), None)


def trace_ops(model: nn.Module, inputs: Any) -> _Tracer:
    """Run one eval-mode, no-grad forward of ``inputs`` and log every op and module call (state untouched)."""
    from edgetrain.ops import Undo, intercept

    tracer = _Tracer(model)
    undo = Undo()
    starts: dict[str, list[int]] = {}
    handles = []
    for name, m in model.named_modules():
        def pre(_m, args, kwargs, n=name):  # noqa: ANN001, ANN202
            starts.setdefault(n, []).append(len(tracer.ops))
            tracer.enter(n, args, kwargs)

        def post(_m, _args, _kwargs, out, n=name):  # noqa: ANN001, ANN202
            tracer.calls.append((n, starts[n].pop(), len(tracer.ops)))
            tracer.leave(n, out)

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    intercept(model, None, tracer.record, undo, count=False)
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, inputs)
    except Exception as e:
        raise ConfigError(f"{type(model).__name__}: the example input does not run through the model "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        undo.remove()
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(rng)
    return tracer


# ------------------------------------------------------------------------------------------------ analysis
def _live_counts(ops: list[OpRecord], dependent: set[int]) -> list[int]:
    """live[p]: parameter-dependent tensors produced before op ``p`` and read at or after it."""
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for op in ops:
        for t in op.inputs:
            if t in dependent:
                last[t] = op.index
        for t in op.outputs:
            born.setdefault(t, op.index)
    delta = [0] * (len(ops) + 2)
    for t, b in born.items():
        if t in dependent and t in last and last[t] > b:
            delta[b + 1] += 1  # alive from after its producer ...
            delta[last[t] + 1] -= 1  # ... through its last reader
    live, run = [], 0
    for p in range(len(ops) + 1):
        run += delta[p]
        live.append(run)
    return live


def _dependent(ops: list[OpRecord]) -> set[int]:
    dep: set[int] = set()
    for op in ops:
        if op.params or any(t in dep for t in op.inputs):
            dep.update(op.outputs)
    return dep


def _children_in_call_order(model: nn.Module, name: str, first_call: dict[str, int]) -> list[tuple[str, nn.Module]]:
    """Children that ran (or hold modules that ran: a ``ModuleList`` is never called itself), by first call."""
    mod = model.get_submodule(name) if name else model
    kids = [(f"{name}.{k}" if name else k, c) for k, c in mod.named_children()]

    def first(n: str) -> int | None:
        hits = [i for m, i in first_call.items() if m == n or m.startswith(n + ".")]
        return min(hits) if hits else None

    order = [(first(n), n, c) for n, c in kids]
    return [(n, c) for i, n, c in sorted((o for o in order if o[0] is not None), key=lambda o: o[0])]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def derive_blocks(model: nn.Module, tracer: _Tracer) -> tuple[list[str], str]:
    ops = tracer.ops
    live = _live_counts(ops, _dependent(ops))
    first_call: dict[str, int] = {}
    cut: dict[str, bool] = {}
    for name, s, e in sorted(tracer.calls, key=lambda c: c[1]):
        first_call.setdefault(name, s)
        cut[name] = cut.get(name, True) and live[s] <= 1 and live[e] <= 1 and e > s
    modules = dict(model.named_modules())
    by_class: dict[type, list[str]] = {}
    for name, ok in cut.items():
        m = modules[name]
        if name and type(m) not in CONTAINERS and list(m.children()) and _has_params(m):
            by_class.setdefault(type(m), []).append(name)
    candidates = []
    for cls, names in by_class.items():
        instances = [n for n, m in modules.items() if type(m) is cls and n in first_call and _has_params(m)]
        if len(instances) >= 2 and all(cut.get(n, False) for n in instances):
            coverage = sum(e - s for n, s, e in tracer.calls if n in instances)
            candidates.append((len(instances), coverage, cls, instances))
    chosen = max(candidates, key=lambda c: (c[0], c[1]))[3] if candidates else []
    holders = {n.rsplit(".", i)[0] for n in chosen for i in range(1, n.count(".") + 1)} | {""}

    def units(name: str) -> list[str]:
        out = []
        for child, m in _children_in_call_order(model, name, first_call):
            if child in chosen:
                out.append(child)
            elif type(m) in CONTAINERS or child in holders:
                out += units(child)
            elif _has_params(m):
                out.append(child)
        return out

    blocks = units("")
    source = f"derived: repeated {chosen and type(modules[chosen[0]]).__name__} x {len(chosen)}" if chosen \
        else "derived: top-level units (no repeated unit found)"
    return blocks, source


def _layers(ops: list[OpRecord]) -> dict[str, Layer]:
    layers: dict[str, Layer] = {}
    for op in ops:
        kind = base_op(op.name)
        if kind not in WEIGHT_OPS | NORM_OPS or not op.params:
            continue
        for p in op.params:
            owner, _, local = p.rpartition(".")
            lay = layers.get(owner)
            if lay is None:
                lay = layers[owner] = Layer(owner, kind, (), 0, op.in_shape, op.out_shape)
            if p not in lay.params:
                lay.params += (p,)
            if local == "weight":
                if lay.calls == 0:  # the kind is the op of the first call that reads the weight
                    lay.kind, lay.in_shape, lay.out_shape = kind, op.in_shape, op.out_shape
                lay.calls += 1
    for lay in layers.values():
        if lay.calls == 0:  # no parameter named weight: count the calls that read its first parameter
            lay.calls = sum(1 for op in ops if lay.params[0] in op.params and base_op(op.name) in WEIGHT_OPS | NORM_OPS)
    return layers


def _classifier(layers: dict[str, Layer], ops: list[OpRecord]) -> str | None:
    for op in reversed(ops):
        if base_op(op.name) in ("linear", "addmm", "matmul", "conv1d", "conv2d", "conv3d") and op.params:
            w = next((p for p in op.params if p.endswith(".weight") or "." not in p), op.params[0])
            return w.rpartition(".")[0]
    return None


def _select(names: list[str], patterns: Sequence[str], what: str) -> list[str]:
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    chosen = [n for n in chosen if not any(n.startswith(c + ".") for c in chosen)]  # outermost matches
    if not chosen:
        raise ConfigError(f"{what} {list(patterns)} match no module called in the forward; modules look like "
                          f"{', '.join(names[:6])}")
    return chosen


def analyze(model: nn.Module, inputs: Any, blocks: Sequence[str] | None = None,
            classifier: str | None = None) -> Structure:
    """The :class:`Structure` of ``model`` on ``inputs`` (a tensor, tuple or dict, as the model is called).

    ``blocks`` (globs) and ``classifier`` (a module name) override what is derived; so do ``model.block_names``
    and ``model.classifier_name``.
    """
    tracer = trace_ops(model, inputs)
    ops = tracer.ops
    call_order = []
    for name, s, _ in sorted(tracer.calls, key=lambda c: (c[1], c[0].count(".") + bool(c[0]))):  # parents first
        if name not in call_order:
            call_order.append(name)
    layers = _layers(ops)
    acts: dict[str, list[str]] = {}
    for op in ops:
        if base_op(op.name) in ACTIVATION_OPS:
            acts.setdefault(op.module, []).append(op.name)
    seen = {p for op in ops if base_op(op.name) not in OPAQUE_OPS for p in op.params}
    opaque: dict[str, list[str]] = {}
    for op in ops:
        if base_op(op.name) in OPAQUE_OPS:
            for p in op.params:
                if p not in seen:
                    opaque.setdefault(p.rpartition(".")[0], []).append(p)
    called = set(call_order)
    unused = [n for n, m in model.named_modules() if n and n not in called and any(True for _ in m.parameters(False))]
    block_names: list[str] = []
    if blocks:
        block_names, source = _select(call_order, blocks, "blocks"), "recipe"
    elif getattr(model, "block_names", None):
        block_names, source = list(model.block_names), "model.block_names"
    head = classifier or getattr(model, "classifier_name", None) or _classifier(layers, ops)
    if head is not None and head not in dict(model.named_modules()):
        raise ConfigError(f"classifier {head!r} is not a module of {type(model).__name__}")
    if not block_names:
        block_names, source = derive_blocks(model, tracer)
        if head is not None:  # the classifier is the head, not a block (as in the built-in zoo's block_names)
            kept = [b for b in block_names if not (b == head or head.startswith(b + ".") or b.startswith(head + "."))]
            block_names = kept or block_names
    return Structure(type(model).__name__, ops, call_order, layers, acts, block_names, source, head, opaque, unused,
                     tracer.io)


def format_structure(s: Structure) -> str:
    """The text ``edgetrain inspect`` prints."""
    lines = [f"{s.model}: {len(s.layers)} layers, {len(s.blocks)} blocks ({s.block_source}), "
             f"classifier {s.classifier or '(none found)'}", ""]
    lines.append(f"{'module':44s} {'role':10s} {'op':16s} {'calls':>5s} {'output shape':>20s}  activations")
    lines.append("-" * 120)
    block_of = {}
    for b in s.blocks:
        block_of[b] = b
    for name in s.call_order:
        if not name:
            continue
        role = "classifier" if name == s.classifier else ("block" if name in s.blocks else "")
        lay = s.layers.get(name)
        act = s.activations.get(name, [])
        if not (role or lay or act or name in s.opaque):
            continue
        op = lay.kind if lay else ("(opaque)" if name in s.opaque else "")
        shape = str(list(lay.out_shape)) if lay and lay.out_shape else ""
        acts = ", ".join(sorted(set(act)))
        depth = name.count(".")
        lines.append(f"{('  ' * min(depth, 6) + name):44.44s} {role:10s} {op:16s} {lay.calls if lay else '':>5} "
                     f"{shape:>20s}  {acts}".rstrip())
    if s.activations.get(""):
        lines.append(f"{'(root forward)':44s} {'':10s} {'':16s} {'':>5} {'':>20s}  "
                     f"{', '.join(sorted(set(s.activations[''])))}".rstrip())
    if s.opaque:
        lines.append("")
        lines.append("opaque (read inside composite calls edgetrain cannot see into; techniques acting on linear "
                     f"cannot reach them): {', '.join(p for ps in s.opaque.values() for p in ps)}")
    if s.unused:
        lines.append(f"never called in the traced forward: {', '.join(s.unused)}")
    return "\n".join(lines)
