"""Analytic training-memory cost model: a per-layer table of weight, gradient, optimizer-state, saved-activation
and workspace bytes and MACs, from traced forward passes (no backward, no optimizer step).

How it works:

1. The recipe is applied (so ``requires_grad`` flags and patched forwards are what training would see) and
   the model runs forward at two tiny batch sizes under a :class:`~torch.overrides.TorchFunctionMode` that
   records every torch function call: its inputs and outputs, whether grad mode is on, and the innermost
   module running. Model state (buffers, RNG) is restored afterwards.
2. A table of **rules** (``SAVES`` below) says what stock PyTorch 2.x autograd keeps for backward for each op,
   given which inputs require grad: ``conv2d`` keeps its input when anything needs a gradient (one
   ``convolution_backward`` formula needs both), ``linear`` keeps its input only for the weight gradient,
   ``relu`` keeps its output, ``hardtanh``/``hardswish``/``gelu``/``silu`` their input (an in-place
   activation keeps a clone), ``batch_norm`` its input plus two per-channel statistics, ``dropout`` its
   mask in the input's dtype, average pooling its input (adaptive pooling only a shape), ``max_pool2d`` also
   int64 indices. Storages are counted
   once, like the meter does. Ops inside a custom autograd Function run with grad mode off and so keep
   nothing by rule; each technique's registered ``estimate(table, cfg, targets)`` adds what its Functions keep.
3. Saved bytes are linear in the batch size (per-sample part plus a fixed part, from the two traces), so
   the table is exact in shape arithmetic for any batch size.

Gradient bytes are the trainable parameters; optimizer state is 0 (SGD without momentum), 1 (momentum) or
2 (Adam/AdamW) copies of them. ``workspace_bytes`` is the largest single op's inputs plus output during the
forward (a transient buffer, not kept), and ``peak_estimate`` adds it to the rest: a rough guide, which
the tests do not hold to 10% (the saved, gradient and optimizer bytes they do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from edgetrain.autograd_rules import needs_grad, op_macs, op_saves
from edgetrain.errors import ConfigError
from edgetrain.measure import storage_key

OPT_COPIES = {"sgd": 0, "sgd_momentum": 1, "adamw": 2, "adam": 2}  # optimizer state copies of the trainable params


# ------------------------------------------------------------------------------------------------ table
@dataclasses.dataclass
class LayerCost:
    """One module's row (leaf modules; ops outside any leaf go to their innermost parent, ``""`` is the root)."""

    name: str
    kind: str
    in_shape: tuple[int, ...] | None = None  # per sample (batch dim dropped)
    out_shape: tuple[int, ...] | None = None
    weight_bytes: int = 0  # parameters held by this module
    trainable_bytes: int = 0  # of which require grad (= gradient bytes)
    macs: int = 0  # forward, per sample
    backward_macs: int = 0  # input- and weight-gradient products of convs and linears, per sample
    saved_per_sample: float = 0.0
    saved_fixed: float = 0.0
    workspace_per_sample: float = 0.0
    technique: str | None = None  # set by a technique estimate that rewrote the row
    items: list[tuple[int, tuple[int, ...] | None, bool]] = dataclasses.field(default_factory=list, repr=False)
    masked: bool = False  # a technique already counted this activation's 1-bit mask (techniques share masks)

    def add_mask(self, technique: str, elements: int) -> None:
        """Count packed 1-bit masks of ``elements`` per sample once, whichever technique installs them."""
        if not self.masked:
            self.saved_per_sample += elements / 8
            self.masked, self.technique = True, technique

    def saved(self, batch_size: int) -> int:
        return int(round(self.saved_per_sample * batch_size + self.saved_fixed))


@dataclasses.dataclass
class CostTable:
    """The cost model's answer for one (model, recipe, input shape, batch size, optimizer)."""

    layers: dict[str, LayerCost]
    batch_size: int
    optimizer: str
    input_shape: tuple[int, ...]
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)  # module -> (in, out) per-sample shapes

    def row(self, name: str) -> LayerCost:
        if name not in self.layers:
            self.layers[name] = LayerCost(name=name, kind="")
        return self.layers[name]

    @property
    def saved_bytes(self) -> int:
        return sum(r.saved(self.batch_size) for r in self.layers.values())

    @property
    def param_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.layers.values())

    @property
    def grad_bytes(self) -> int:
        return sum(r.trainable_bytes for r in self.layers.values())

    @property
    def optimizer_bytes(self) -> int:
        return OPT_COPIES[self.optimizer] * self.grad_bytes

    @property
    def train_bytes(self) -> int:
        """Trainable weights + gradients + optimizer state + saved activations: what a budget limits."""
        return 2 * self.grad_bytes + self.optimizer_bytes + self.saved_bytes

    @property
    def workspace_bytes(self) -> int:
        return int(max((r.workspace_per_sample for r in self.layers.values()), default=0) * self.batch_size)

    @property
    def peak_estimate(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.saved_bytes + self.workspace_bytes

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers.values()) * self.batch_size

    @property
    def backward_macs(self) -> int:
        return sum(r.backward_macs for r in self.layers.values()) * self.batch_size

    def totals(self) -> dict[str, int]:
        return {"saved_bytes": self.saved_bytes, "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
                "optimizer_bytes": self.optimizer_bytes, "train_bytes": self.train_bytes,
                "workspace_bytes": self.workspace_bytes, "peak_estimate": self.peak_estimate,
                "forward_macs": self.macs, "backward_macs": self.backward_macs}

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.layers.values():
            d = dataclasses.asdict(r)
            d.pop("items")
            d["saved_bytes"] = r.saved(self.batch_size)
            rows.append(d)
        return {"batch_size": self.batch_size, "optimizer": self.optimizer, "input_shape": list(self.input_shape),
                "totals": self.totals(), "layers": rows}


# ------------------------------------------------------------------------------------------------ tracing
class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.saved: dict[str, dict[int, int]] = {}  # module -> storage key -> bytes (first module that keeps it)
        self.fresh: dict[str, int] = {}  # module -> bytes of new storages
        self.items: dict[str, list[tuple[int, tuple[int, ...] | None, bool]]] = {}  # module -> (bytes, shape, float)
        self.macs: dict[str, int] = {}
        self.bmacs: dict[str, int] = {}
        self.work: dict[str, int] = {}
        self.alive: list[Any] = []  # keep traced tensors alive so that storage addresses are not reused
        self.seen: set[int] = set()
        self.outputs = 0
        self.grad_inputs: dict[str, list[int]] = {}  # module -> per-sample output elements of calls needing grad
        self.exclude: set[int] = set()  # parameter and buffer storages (not activations; the meter skips them too)

    def keep(self, mod: str, t: Tensor, op: str = "") -> None:
        """Count the storage of ``t`` as saved by ``mod`` unless it is counted already or a parameter/buffer."""
        if storage_key(t) in self.seen or storage_key(t) in self.exclude:
            return
        self.seen.add(storage_key(t))
        self.saved.setdefault(mod, {})[storage_key(t)] = t.untyped_storage().nbytes()
        shape = tuple(t.shape)
        if op == "linear" and t.dim() > 2:  # F.linear keeps the 2-D view (rows, in_features)
            shape = (t.numel() // t.shape[-1], t.shape[-1])
        self.items.setdefault(mod, []).append((t.numel() * t.element_size(), shape, t.is_floating_point()))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name.startswith("__") or name in ("size", "dim", "numel", "detach", "view", "reshape", "flatten"):
            return out
        mod = self.stack[-1]
        self.alive.append((args, out))
        for t, nbytes in op_saves(name, args, kwargs, out):
            if t is not None:
                self.keep(mod, t, name)
            else:
                self.fresh[mod] = self.fresh.get(mod, 0) + nbytes
                self.items.setdefault(mod, []).append((nbytes, None, False))
        macs = op_macs(name, args, kwargs, out)
        self.macs[mod] = self.macs.get(mod, 0) + macs
        if macs and torch.is_grad_enabled():  # backward: one product of the same size per gradient needed
            w = args[1] if len(args) > 1 else None
            self.bmacs[mod] = self.bmacs.get(mod, 0) + macs * (int(needs_grad(args[0])) + int(needs_grad(w)))
        tensors = [a for a in args if isinstance(a, Tensor)] + ([out] if isinstance(out, Tensor) else [])
        work = sum(t.numel() * t.element_size() for t in tensors)
        self.work[mod] = max(self.work.get(mod, 0), work)
        return out


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(state[k])
        torch.set_rng_state(rng)


def _trace(model: nn.Module, x: Tensor) -> tuple[_Recorder, dict[str, tuple]]:
    stack = [""]
    shapes: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():
        leaf = bool(name) and not list(m.children())

        def pre(mod, inp, name=name, leaf=leaf):  # noqa: ANN001
            if leaf:
                stack.append(name)

        def post(mod, inp, out, name=name, leaf=leaf):  # noqa: ANN001
            if leaf:
                stack.pop()
            i = inp[0] if inp and isinstance(inp[0], Tensor) else None
            shapes[name] = (tuple(i.shape[1:]) if i is not None else None,
                            tuple(out.shape[1:]) if isinstance(out, Tensor) else None)
            if i is not None and i.requires_grad and torch.is_grad_enabled() and mod.training:
                rec.grad_inputs.setdefault(name, []).append(out.numel() // len(out) if isinstance(out, Tensor) else 0)
            # a technique's custom Function that keeps the module's input (forward tagged ``saves_input``)
            if (i is not None and getattr(mod.__dict__.get("forward"), "saves_input", False) and torch.is_grad_enabled()
                    and (i.requires_grad or any(p.requires_grad for p in mod.parameters(recurse=False)))):
                rec.alive.append(i)
                rec.keep(name, i)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    rec = _Recorder(stack)
    rec.exclude = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    try:
        with _restored(model), rec:
            out = model(x)
            rec.outputs = out.numel() if isinstance(out, Tensor) else 0
    finally:
        for h in handles:
            h.remove()
    return rec, shapes


def _at_batch(x: tuple, y: tuple, a: int, b: int, batch: int) -> tuple[int, tuple[int, ...] | None, bool]:
    """A saved tensor seen at batch ``a`` and ``b``, extrapolated to ``batch`` (its leading dim scales or not)."""
    (na, sa, fl), (nb, sb, _) = x, y
    per = (nb - na) / (b - a)
    nbytes = int(round(na + per * (batch - a)))
    shape = sa
    if sa is not None and sb is not None and sa != sb and len(sa) and sa[1:] == sb[1:] and sa[0] * b == sb[0] * a:
        shape = (sa[0] // a * batch, *sa[1:])  # the leading dim is the batch (or batch x tokens)
    return nbytes, shape, fl


def trace_table(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, optimizer: str = "sgd_momentum",
                batches: tuple[int, int] = (2, 4)) -> CostTable:
    """The stock-PyTorch rows of ``model`` as it stands (techniques already applied), without technique estimates."""
    if optimizer not in OPT_COPIES:
        raise ConfigError(f"estimate: optimizer must be one of {sorted(OPT_COPIES)}, got {optimizer!r}")
    if batch_size < 1:
        raise ConfigError(f"estimate: batch_size must be >= 1, got {batch_size}")
    # inputs are fp32 (float64 for a float64 model); fp16 parameters (e.g. bnn_edge latent weights) do not change it
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32
    a, b = batches
    rec_a, shapes = _trace(model, torch.zeros((a, *input_shape), dtype=dtype))
    rec_b, _ = _trace(model, torch.zeros((b, *input_shape), dtype=dtype))
    table = CostTable({}, batch_size, optimizer, tuple(input_shape))
    table.shapes = shapes
    modules = dict(model.named_modules())
    for name, m in modules.items():
        own = list(m.parameters(recurse=False))
        if list(m.children()) and not own:
            continue
        r = table.row(name)
        r.kind = type(m).__name__
        r.in_shape, r.out_shape = shapes.get(name, (None, None))
        r.weight_bytes = sum(p.numel() * p.element_size() for p in own)
        r.trainable_bytes = sum(p.numel() * p.element_size() for p in own if p.requires_grad)
    for name in set(rec_a.saved) | set(rec_a.fresh) | set(rec_b.saved) | set(rec_b.fresh) | set(rec_a.macs):
        r = table.row(name)
        sa = sum(rec_a.saved.get(name, {}).values()) + rec_a.fresh.get(name, 0)
        sb = sum(rec_b.saved.get(name, {}).values()) + rec_b.fresh.get(name, 0)
        r.saved_per_sample = (sb - sa) / (b - a)
        r.saved_fixed = sa - a * r.saved_per_sample
        r.macs = rec_a.macs.get(name, 0) // a
        r.backward_macs = rec_a.bmacs.get(name, 0) // a
        r.workspace_per_sample = rec_a.work.get(name, 0) / a
        ia, ib = rec_a.items.get(name, []), rec_b.items.get(name, [])
        if len(ia) == len(ib):  # what each saved tensor is at the table's batch size (for codec estimates)
            r.items = [_at_batch(x, y, a, b, batch_size) for x, y in zip(ia, ib)]
    # 1-bit masks (edgetrain.compress.masks) run inside custom Functions: count them where they are saved
    for name, m in modules.items():
        if getattr(m.__dict__.get("forward"), "saves_mask", False) and name in rec_a.grad_inputs:
            table.row(name).add_mask("mask", sum(rec_a.grad_inputs[name]))  # one mask per call (reused modules)
    # the loss: cross-entropy keeps its log-softmax (outputs x 4 bytes) and the int64 targets
    loss = table.row("(loss)")
    loss.kind = "CrossEntropyLoss"
    loss.saved_per_sample = rec_a.outputs / a * 4 + 8
    loss.saved_fixed = 4
    return table


def estimate(model: nn.Module, recipe: Any = None, input_shape: tuple[int, ...] | None = None, batch_size: int = 32,
             optimizer: str = "sgd_momentum") -> CostTable:
    """Predict the memory of one training step of ``model`` under ``recipe`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (left unchanged).
        recipe: a :class:`~edgetrain.Recipe`, a technique config or a list of them.
        input_shape: one sample's shape, e.g. ``(3, 64, 64)``; default from the model's ``default_input_size``.
        batch_size: the training batch size.
        optimizer: ``sgd`` (no momentum), ``sgd_momentum``, ``adam`` or ``adamw``.
    """
    from edgetrain.apply import apply_, resolve_targets
    from edgetrain.recipe import as_recipe
    from edgetrain.registry import get

    if input_shape is None:
        input_shape = getattr(model, "default_input_size", None)
        if input_shape is None:
            raise ConfigError(f"estimate: give input_shape for {type(model).__name__} (one sample, e.g. (3, 64, 64))")
    recipe = as_recipe(recipe) if recipe is not None else None
    if recipe is None or not recipe.techniques:
        return trace_table(model, tuple(input_shape), batch_size, optimizer)
    missing = [c.name for c in recipe.techniques if get(c.name).estimate is None]
    if missing:
        raise ConfigError(f"estimate: no cost model for {', '.join(missing)} yet (techniques with one: "
                          f"{', '.join(n for n in _with_estimate())})")
    with apply_(model, recipe):
        table = trace_table(model, tuple(input_shape), batch_size, optimizer)
        for cfg in recipe.techniques:
            get(cfg.name).estimate(table, cfg, resolve_targets(model, cfg, recipe), model)
    return table


def _with_estimate() -> list[str]:
    from edgetrain.registry import list_techniques

    return [i.name for i in list_techniques() if i.estimate is not None]


def format_table(table: CostTable, top: int | None = None) -> str:
    """A plain-text per-layer table (KiB) with totals."""
    rows = [r for r in table.layers.values() if r.weight_bytes or r.saved(table.batch_size) or r.macs]
    head = f"{'layer':34s} {'kind':18s} {'weights':>9s} {'grad':>9s} {'saved':>10s} {'MMACs':>8s} {'bwd MMACs':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows[:top] if top else rows:
        lines.append(f"{r.name or '(root)':34.34s} {r.kind:18.18s} {r.weight_bytes / 1024:9.1f} "
                     f"{r.trainable_bytes / 1024:9.1f} {r.saved(table.batch_size) / 1024:10.1f} "
                     f"{r.macs * table.batch_size / 1e6:8.2f} {r.backward_macs * table.batch_size / 1e6:9.2f}")
    t = table.totals()
    lines.append("-" * len(head))
    lines.append(f"batch {table.batch_size}, optimizer {table.optimizer} (KiB): weights {t['param_bytes'] / 1024:.1f}, "
                 f"grads {t['grad_bytes'] / 1024:.1f}, optimizer {t['optimizer_bytes'] / 1024:.1f}, saved "
                 f"{t['saved_bytes'] / 1024:.1f}, workspace {t['workspace_bytes'] / 1024:.1f}; trainable state + "
                 f"activations {t['train_bytes'] / 1024:.1f}; peak estimate {t['peak_estimate'] / 1024:.1f}")
    return "\n".join(lines)
