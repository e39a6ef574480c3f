"""Training-memory cost model: a per-layer table of weight, gradient, optimizer-state, saved-activation and
workspace bytes and MACs, predicted from two tiny traced forward passes (no backward, no optimizer step).

How it works:

1. The recipe is applied (so ``requires_grad`` flags and the techniques' op handlers are what training would see)
   and the model runs forward at the batch size asked for and at half of it (twice it below 4; samples of the
   example input, repeated if it has fewer), then the default loss, under the meter's saved-tensor hooks
   (:class:`edgetrain.measure.SavedTensorMeter`).
   So what is counted is what autograd really keeps for backward, for any op and any module: functional calls,
   every attention backend PyTorch picks for the inputs given (the math path with a mask or dropout keeps its
   probabilities, the fused one its log-sum-exp rows), integer and dict inputs, the techniques' own autograd
   Functions and codec payloads. Each storage counts once, attributed to the innermost module running, as the
   meter does. Model state (buffers, RNG) is restored afterwards.
2. Saved bytes are fitted as linear in the batch size (a per-sample part plus a fixed part) through the two
   traces; at the traced batch size they are what the trace saw (tests hold plain training and every technique
   to the meter on the built-in models and the foreign zoo); other batch sizes are extrapolated (thresholds such
   as a codec's ``min_bytes`` make that approximate).
3. A TorchFunctionMode recorder sees every conv/linear call with its arguments: forward multiply-accumulates,
   and backward ones (one product of the same size per gradient needed); techniques that change the backward
   product count (gradient filtering) correct it through their registered ``estimate``.

Gradient bytes are the trainable parameters; optimizer state is 0 (SGD without momentum), 1 (momentum) or
2 (Adam/AdamW) copies of them. ``workspace_bytes`` is the largest single op's inputs plus output during the
forward (a transient buffer, not kept), and ``peak_estimate`` adds it to the rest: a rough guide.

Techniques whose saved bytes depend on the data (COMET's entropy of residuals) say so (``traceable=False``)
and get no estimate: a trace on a stand-in input would not predict them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.autograd_rules import needs_grad, op_macs
from edgetrain.errors import ConfigError
from edgetrain.inputs import call_model, take, tensors
from edgetrain.measure import SavedTensorMeter, default_loss

OPT_COPIES = {"sgd": 0, "sgd_momentum": 1, "adamw": 2, "adam": 2}  # optimizer state copies of the trainable params


# ------------------------------------------------------------------------------------------------ table
@dataclasses.dataclass
class LayerCost:
    """One module's row: what the ops called inside it (and not inside a child) save; ``""`` is the root's own
    forward, ``"(loss)"`` the loss."""

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
    technique: str | None = None  # set by a technique estimate that corrected the row
    masked: bool = False  # everything it saves is uint8 (packed 1-bit masks, int8 activations)

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
    peak: PeakEstimate | None = None  # the step's peak (see :func:`predict_peak`); None when not asked for

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
        """The predicted peak of the step (:func:`predict_peak`), or a rough sum of state, saved bytes and the
        largest op's buffers when it was not predicted."""
        if self.peak is not None:
            return self.peak.bytes
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
            d["saved_bytes"] = r.saved(self.batch_size)
            rows.append(d)
        out = {"batch_size": self.batch_size, "optimizer": self.optimizer, "input_shape": list(self.input_shape),
               "totals": self.totals(), "layers": rows}
        if self.peak is not None:
            out["peak"] = dataclasses.asdict(self.peak)
        return out


# ------------------------------------------------------------------------------------------------ the peak
@dataclasses.dataclass
class PeakEstimate:
    """The predicted peak of one training step: ``bytes``, what holds it (``split``, the meter's categories),
    the ``phase`` it happens in, and the batch sizes it was measured at (``traced``)."""

    bytes: int
    split: dict[str, int]
    phase: str
    traced: tuple[int, ...]

    def ram(self, flash: bool = False) -> int:
        """The peak RAM: less the frozen weights when the device keeps them in flash."""
        return self.bytes - (self.split.get("weights_frozen", 0) if flash else 0)


def _optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name in ("adam", "adamw"):
        return torch.optim.AdamW(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9 if name == "sgd_momentum" else 0.0)


def predict_peak(model: nn.Module, example: Any, batch_size: int, optimizer: str = "sgd_momentum",
                 execution: Any = None) -> PeakEstimate:
    """The step's peak at ``batch_size``, from one real step of the model as it stands (techniques applied; its
    state is put back) at that batch size, with its ``execution`` (micro-batches, fused optimizer step, BatchNorm
    policy) and a stand-in loss target.

    Measured at the batch itself, not fitted from smaller batches: the CPU kernels' transient buffers (oneDNN
    reorders, im2col) change with the batch in steps, and a line through two smaller batches missed the peak by
    15-20% on small_cnn at batch 16 with a fused step (the peak moved to another op). The device runs the same
    program, so what the host's meter sees at the batch is the prediction; it differs from a measured step only by
    the stand-in target (8 bytes per sample at most).
    """
    from edgetrain.execution import FusedStep
    from edgetrain.measure import default_loss, measure
    from edgetrain.recipe import Execution

    ex = execution or Execution()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"estimate: {type(model).__name__} has no parameter that requires grad")
    opt = _optimizer(model, optimizer)
    opt = FusedStep(opt) if ex.fused_step else opt
    try:
        m = measure(model, take(example, batch_size), lambda out, y: default_loss(out, None, stand_in=True), opt,
                    warmup=1, repeats=0, micro=max(1, min(ex.micro_batches, batch_size)), bn=ex.bn)
    finally:
        if ex.fused_step:
            opt.remove()
    return PeakEstimate(m.peak_bytes, dict(m.peak_split), m.peak_phase, (batch_size,))


# ------------------------------------------------------------------------------------------------ tracing
class _Recorder:
    """Forward MACs, backward MACs and the largest op (inputs + output) per innermost module."""

    def __init__(self) -> None:
        self.macs: dict[str, int] = {}
        self.bmacs: dict[str, int] = {}
        self.work: dict[str, int] = {}

    def record(self, call) -> Any:  # noqa: ANN001
        out = call.proceed()
        if call.name.startswith("__") or call.name in ("size", "dim", "numel", "detach", "view", "reshape"):
            return out
        mod, args = call.module, call.args
        macs = op_macs(call.name, args, call.kwargs, out)
        if macs:
            self.macs[mod] = self.macs.get(mod, 0) + macs
            if torch.is_grad_enabled():  # backward: one product of the same size per gradient needed
                w = args[1] if len(args) > 1 else call.kwargs.get("weight")
                self.bmacs[mod] = self.bmacs.get(mod, 0) + macs * (int(needs_grad(args[0])) + int(needs_grad(w)))
        work = sum(t.numel() * t.element_size() for t in (*tensors(args), *tensors(out)))
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


def _trace(model: nn.Module, inputs: Any) -> tuple[SavedTensorMeter, _Recorder, dict[str, tuple]]:
    from edgetrain.ops import Undo, intercept

    shapes: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():
        def post(mod, inp, out, name=name):  # noqa: ANN001
            if name not in shapes:
                i = inp[0] if inp and isinstance(inp[0], Tensor) else None
                shapes[name] = (tuple(i.shape[1:]) if i is not None else None,
                                tuple(out.shape[1:]) if isinstance(out, Tensor) else None)
        handles.append(m.register_forward_hook(post))
    rec, undo = _Recorder(), Undo()
    intercept(model, None, rec.record, undo, count=False, first=True)
    meter = SavedTensorMeter(model)
    try:
        with _restored(model), meter:
            out = call_model(model, inputs)
            meter._enter_module("(loss)")
            default_loss(out, stand_in=True)
            meter._exit_module()
    finally:
        undo.remove()
        for h in handles:
            h.remove()
    return meter, rec, shapes


def _rows(meter: SavedTensorMeter) -> tuple[dict[str, int], dict[str, bool]]:
    uint8: dict[str, bool] = {}
    for where, _, dtype, _ in meter.records:
        uint8[where] = uint8.get(where, True) and dtype == "uint8"
    return dict(meter.by_module), uint8


def trace_table(model: nn.Module, example: Any, batch_size: int, optimizer: str = "sgd_momentum") -> CostTable:
    """The rows of ``model`` as it stands (techniques already applied), traced on ``example`` (model inputs) at
    the batch size itself and at half of it (twice it below batch 4: train-mode BatchNorm needs 2 samples)."""
    if optimizer not in OPT_COPIES:
        raise ConfigError(f"estimate: optimizer must be one of {sorted(OPT_COPIES)}, got {optimizer!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"estimate: batch_size must be >= 1, got {batch_size}")
    a, b = (batch_size, 2 * batch_size) if batch_size < 4 else (batch_size // 2, batch_size)
    meter_a, rec_a, shapes = _trace(model, take(example, a))
    meter_b, _, _ = _trace(model, take(example, b))
    first = tensors(example)[0]
    table = CostTable({}, batch_size, optimizer, tuple(first.shape[1:]))
    table.shapes = shapes
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        r = table.row(name)
        r.kind = type(m).__name__
        r.in_shape, r.out_shape = shapes.get(name, (None, None))
        r.weight_bytes = sum(p.numel() * p.element_size() for p in own)
        r.trainable_bytes = sum(p.numel() * p.element_size() for p in own if p.requires_grad)
    saved_a, uint8 = _rows(meter_a)
    saved_b, _ = _rows(meter_b)
    for name in set(saved_a) | set(saved_b) | set(rec_a.macs) | set(rec_a.work):
        r = table.row(name)
        if not r.kind:
            r.kind = "CrossEntropyLoss" if name == "(loss)" else type(model.get_submodule(name)).__name__
            r.in_shape, r.out_shape = shapes.get(name, (None, None))
        sa, sb = saved_a.get(name, 0), saved_b.get(name, 0)
        r.saved_per_sample = (sb - sa) / (b - a)
        r.saved_fixed = sa - a * r.saved_per_sample
        r.macs = rec_a.macs.get(name, 0) // a
        r.backward_macs = rec_a.bmacs.get(name, 0) // a
        r.workspace_per_sample = rec_a.work.get(name, 0) / a
        r.masked = uint8.get(name, False)
    return table


def estimate(model: nn.Module, recipe: Any = None, input_shape: tuple[int, ...] | None = None, batch_size: int = 32,
             optimizer: str = "sgd_momentum", example: Any = None, peak: bool = False) -> CostTable:
    """Predict the memory of one training step of ``model`` under ``recipe`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (left unchanged).
        recipe: a :class:`~edgetrain.Recipe`, a technique config or a list of them.
        input_shape: one sample's shape, e.g. ``(3, 64, 64)`` (a zero input of it is traced); or give ``example``.
        batch_size: the training batch size.
        optimizer: ``sgd`` (no momentum), ``sgd_momentum``, ``adam`` or ``adamw``.
        example: model inputs (a tensor, a tuple or a dict, e.g. token ids and an attention mask), any batch size;
            overrides ``input_shape``.
        peak: also predict the step's peak (:func:`predict_peak`: a real step at the batch size); ``table.peak``.
    """
    from edgetrain.apply import apply_, resolve_targets
    from edgetrain.recipe import as_recipe
    from edgetrain.registry import get

    if example is None:
        if input_shape is None:
            size = getattr(model, "default_input_size", None)
            input_shape = (getattr(model, "in_channels", 3), size, size) if isinstance(size, int) else size
        if input_shape is None:
            raise ConfigError(f"estimate: give input_shape (one sample, e.g. (3, 64, 64)) or example= for "
                              f"{type(model).__name__}")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32
        example = torch.zeros((2, *input_shape), dtype=dtype)
    recipe = as_recipe(recipe) if recipe is not None else None
    if recipe is None or not recipe.techniques:
        table = trace_table(model, example, batch_size, optimizer)
        if peak:
            table.peak = predict_peak(model, example, batch_size, optimizer, recipe.execution if recipe else None)
        return table
    untraceable = [c.name for c in recipe.techniques if not get(c.name).traceable]
    if untraceable:
        raise ConfigError(f"estimate: no cost model for {', '.join(untraceable)} (what it saves depends on the data; "
                          f"techniques with one: {', '.join(_with_estimate())})")
    with apply_(model, recipe, example) as handle:
        table = trace_table(model, example, batch_size, optimizer)
        for cfg in recipe.techniques:
            fix = get(cfg.name).estimate
            if fix is not None:
                fix(table, cfg, resolve_targets(model, cfg, recipe, handle.structure), model, handle.structure)
        if peak:
            table.peak = predict_peak(model, example, batch_size, optimizer, recipe.execution)
    return table


def _with_estimate() -> list[str]:
    from edgetrain.registry import list_techniques

    return [i.name for i in list_techniques() if i.traceable]


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
