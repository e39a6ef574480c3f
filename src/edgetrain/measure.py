"""The meter: what one real training step stores, measured.

:func:`measure` runs real training steps and reports the fields of the measurement contract
(DESIGN.md):

* ``saved_bytes`` — what the step keeps for backward: tensors saved through
  :func:`torch.autograd.graph.saved_tensors_hooks` (each storage once, at its full size; techniques that keep
  tensors through their own hooks report them with :func:`account_saved`, so packed payloads count at their real
  size), plus what the forward allocated and still holds at its end outside ``save_for_backward`` (``ctx``
  attributes, RNG states; ``hidden_bytes``, seen by the step census of :mod:`edgetrain.census`). Storages of the
  model's parameters and buffers are not counted (they are resident anyway and reported in ``param_bytes``).
* ``peak_bytes`` — the peak of live tensor bytes over a full step (forward, loss, backward, optimizer step): the
  bytes live when it starts (weights, buffers, optimizer state, the batch, technique state; gradients are freed
  first, as ``zero_grad(set_to_none=True)`` does) plus the highest running sum of the CPU allocator's allocation
  and free events of the step, recorded by the torch profiler with their addresses. Not a sum of shapes.
  ``peak_split`` says what holds the peak (weights trainable and frozen, buffers, gradients, optimizer state,
  saved activations, hidden saves, the batch, technique state, transient buffers) and ``peak_phase`` /
  ``peak_where`` when it happens (the phase and the module, or the autograd node in the backward).
* ``param_bytes``, ``grad_bytes``, ``optimizer_bytes`` — unique storages after the step.
* ``step_seconds`` — median wall time of ``repeats`` steps after ``warmup`` steps, with no hooks or
  profiler active.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.census import mark_gradient, phase, record
from edgetrain.errors import ConfigError
from edgetrain.execution import FusedStep, bn_policy, run_step, slices
from edgetrain.inputs import call_model, logits, own_storage, split_batch, tensors

_ACTIVE: contextvars.ContextVar[tuple[SavedTensorMeter, ...]] = contextvars.ContextVar("edgetrain_meters", default=())


def storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def unique_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each counted once, at full storage size)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorMeter:
    """Context manager counting the bytes saved for backward while it is active.

    Args:
        model: if given, saved bytes are attributed to the innermost module of ``model`` running at the time
            (``by_module``), and its parameters and buffers are excluded from the count.
        exclude: further tensors whose storages are not counted.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[Tensor] = (), ranges: bool = False) -> None:
        self.model = model
        self.ranges = ranges  # mark each module's forward for the step census (edgetrain.census)
        resident = list(exclude) + (list(model.parameters()) + list(model.buffers()) if model is not None else [])
        self._exclude = {storage_key(t) for t in resident}
        self._seen: set[int] = set()
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self.total_bytes = 0
        self.by_module: dict[str, int] = {}
        self.records: list[tuple[str, tuple[int, ...], str, int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._token: contextvars.Token | None = None
        self._ranges: list[Any] = []

    def account(self, t: Tensor) -> None:
        """Count ``t``'s storage once (unless excluded)."""
        if not isinstance(t, Tensor) or t.device.type == "meta" or isinstance(t, nn.Parameter):
            return
        key = storage_key(t)
        if key in self._exclude or key in self._seen:
            return
        self._seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        where = self._stack[-1] if self._stack else ""
        self.total_bytes += nbytes
        self.by_module[where] = self.by_module.get(where, 0) + nbytes
        self.records.append((where, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes))

    def _enter_module(self, name: str) -> None:
        self._stack.append(name)
        if self.ranges:
            self._ranges.append(torch.profiler.record_function(f"edgetrain::module:{name}").__enter__())

    def _exit_module(self) -> None:
        self._stack.pop()
        if self.ranges and self._ranges:
            self._ranges.pop().__exit__(None, None, None)

    @property
    def keys(self) -> set[int]:
        """Storage keys (data pointers) of everything counted."""
        return set(self._seen)

    def _pack(self, t: Tensor) -> Tensor:
        self.account(t)
        # a detached alias, not ``t``: a saved *output* returned as is would hold its own graph alive (a reference
        # cycle through autograd that gc cannot break: the graph of a forward without backward leaked)
        return t.detach()

    def __enter__(self) -> SavedTensorMeter:
        if self.model is not None:
            for name, m in self.model.named_modules():
                self._handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._enter_module(n)))
                self._handles.append(m.register_forward_hook(lambda *_: self._exit_module(), always_call=True))
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        if self._token is not None:
            _ACTIVE.reset(self._token)
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _unpack(t: Tensor) -> Tensor:
    return t


def account_saved(*tensors: Tensor) -> None:
    """Report tensors kept alive for backward outside the meter's hooks (e.g. by a technique's own
    saved-tensor hooks or by checkpointing). A no-op when no meter is active."""
    for meter in _ACTIVE.get():
        for t in tensors:
            meter.account(t)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 briefly: the profiler's native library logs every start and stop there."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. some notebook front ends): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PeakMeter:
    """Context manager: peak live tensor bytes from the profiler's allocator events.

    Args:
        live: tensors live when the context is entered (their unique storages form the baseline).
    """

    def __init__(self, live: Iterable[Tensor | None] = ()) -> None:
        self.baseline_bytes = unique_bytes(live)
        self.peak_bytes = self.baseline_bytes
        self.peak_delta = 0
        self.events = 0
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> PeakMeter:
        with _quiet_native_stderr():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        with _quiet_native_stderr():
            self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        running = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
        self.events = len(events)
        self.peak_delta = peak
        self.peak_bytes = self.baseline_bytes + peak


#: what holds the peak, in the order the split is reported
CATEGORIES = ("weights_trainable", "weights_frozen", "buffers", "gradients", "optimizer", "saved", "hidden", "batch",
              "state", "transient")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured training step (fields of the measurement contract first).

    ``peak_split`` (bytes by :data:`CATEGORIES`, summing to ``peak_bytes``): weights that train and that are frozen,
    buffers, gradients, optimizer state, saved activations alive at the peak (``saved``: through saved-tensor
    hooks; ``hidden``: kept outside them), the batch, technique state (codec buffers, lookup tables declared with
    :func:`edgetrain.ops.register_state`) and transient buffers (forward intermediates, backward gradient buffers,
    decoded activations, optimizer temporaries). ``peak_phase`` is ``forward``, ``loss``, ``backward`` or
    ``optimizer``; ``peak_where`` the module (forward) or autograd node (backward) and op allocating at the peak;
    ``phase_peaks`` the peak of each phase. ``frozen_by_dtype`` splits the frozen weights by dtype (what a device
    with flash keeps there: :meth:`ram_peak`).
    """

    saved_bytes: int
    peak_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    step_seconds: float
    trainable_param_bytes: int
    saved_by_module: dict[str, int]
    threads: int
    hidden_bytes: int = 0
    peak_split: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_phase: str = ""
    peak_where: str = ""
    phase_peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    frozen_by_dtype: dict[str, int] = dataclasses.field(default_factory=dict)

    def ram_peak(self, flash: bool = False) -> int:
        """The peak RAM: ``peak_bytes``, less the frozen weights when the device keeps them in flash."""
        return self.peak_bytes - (self.peak_split.get("weights_frozen", 0) if flash else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_loss(out: Any, target: Any = None, stand_in: bool = False) -> Tensor:
    """The default training loss: the model's own ``loss`` when its output carries one (a ``transformers`` model
    given labels), else cross-entropy of its logits (``out``, ``out.logits`` or its first tensor; token-level
    logits are flattened) against ``target``. ``stand_in=True`` uses zero targets when there are none (the cost
    model's trace, which only needs what the loss saves)."""
    own = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(own, Tensor):
        return own
    lg = logits(out)
    if target is None:
        if not stand_in:
            raise ConfigError("measure: a batch without targets needs a loss_fn(output, None) (or a model output "
                              "with its own .loss)")
        target = torch.zeros(lg.shape[:-1], dtype=torch.long)
    if lg.dim() > 2:
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1))
    return F.cross_entropy(lg, target)


@contextlib.contextmanager
def _restoring(model: nn.Module, optimizer: torch.optim.Optimizer, enabled: bool) -> Iterator[None]:
    """Put the model's state, gradients, the optimizer's state and the RNG back as they were."""
    if not enabled:
        yield
        return
    state = copy.deepcopy(model.state_dict())
    grads = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)


def measure(model: nn.Module, batch: Any,
            loss_fn: Callable[[Any, Any], Tensor] | None = None,
            optimizer: torch.optim.Optimizer | None = None, *, recipe: Any = None, warmup: int = 1,
            repeats: int = 5, restore: bool = True, micro: int = 1, bn: str = "micro") -> Measurement:
    """Run real training steps of ``model`` on ``batch`` and measure them.

    Args:
        model: the model, in the mode it should train in (this function does not call ``train()``).
        batch: ``(inputs, target)`` or ``inputs``; inputs are a tensor (``model(x)``), a tuple (``model(*x)``) or a
            dict (``model(**x)``). Tensors that are views into a larger storage (a batch sliced from a dataset)
            are copied first, so the counts see the batch, not the dataset.
        loss_fn: ``loss_fn(output, target)``; default: the model's ``training_loss`` (a training mode's loss,
            :mod:`edgetrain.distill`), else the output's own ``loss``, else cross-entropy of its logits.
        optimizer: default SGD (lr 0.01, momentum 0.9) over the parameters that require grad.
        recipe: applied with :func:`edgetrain.apply_` before measuring and removed afterwards; its ``execution``
            (micro-batches, the fused optimizer step) is how the measured steps run.
        warmup: untimed steps first (they also create the optimizer state the step then holds).
        repeats: timed steps; ``step_seconds`` is their median (0: no timing, ``nan``).
        restore: put model, gradients, optimizer state and RNG back as they were afterwards.
        micro, bn: micro-batches per step and their BatchNorm policy (:func:`edgetrain.execution.run_step`);
            ``saved_bytes`` is then the largest micro-batch's. Pass a :class:`edgetrain.execution.FusedStep` as
            ``optimizer`` to update in the backward.
    """
    if recipe is not None:
        from edgetrain.apply import apply_
        from edgetrain.recipe import as_recipe

        recipe = as_recipe(recipe)
        ex = recipe.execution
        with apply_(model, recipe, split_batch(batch)[0]):
            if optimizer is None:
                optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            fused = FusedStep(optimizer) if ex.fused_step and not isinstance(optimizer, FusedStep) else None
            try:
                return measure(model, batch, loss_fn, fused or optimizer, warmup=warmup, repeats=repeats,
                               restore=restore, micro=ex.micro_batches if micro == 1 else micro,
                               bn=ex.bn if bn == "micro" else bn)
            finally:
                if fused is not None:
                    fused.remove()
    if warmup < 0 or repeats < 0:
        raise ConfigError(f"measure: need warmup >= 0 and repeats >= 0, got {warmup} and {repeats}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"measure: {type(model).__name__} has no parameter that requires grad: nothing to train")
    if optimizer is None:
        optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    loss_fn = loss_fn or getattr(model, "training_loss", None) or default_loss  # a training mode's own loss
    x, y = (own_storage(part) for part in split_batch(batch))
    parts = list(slices(x, y, micro))

    def step() -> None:
        loss = run_step(model, x, y, loss_fn, optimizer, micro, bn)
        if not torch.isfinite(loss):
            raise ConfigError(f"measure: the loss is {loss.item()} on this batch; nothing meaningful to measure")

    with _restoring(model, optimizer, restore):
        for _ in range(warmup):
            step()
        optimizer.zero_grad(set_to_none=True)
        static = _static(model, optimizer, x, y)
        meters = [SavedTensorMeter(model, ranges=True) for _ in parts]
        loss_keys: set[int] = set()
        fused = isinstance(optimizer, FusedStep)

        def census_step() -> None:  # ``step`` with its phases marked, gradients already freed
            with bn_policy(model, bn):
                for i, ((xi, yi, share), saved) in enumerate(zip(parts, meters)):
                    if fused:
                        optimizer.armed = i == len(parts) - 1
                    with phase("forward"), saved:
                        out = call_model(model, xi)
                        saved._enter_module("(loss)")  # what the loss keeps gets its own row
                        loss = loss_fn(out, yi)
                        saved._exit_module()
                        del out  # as a training loop does: the output lives on only where backward keeps it
                    loss_keys.add(storage_key(loss))
                    with phase("backward"):
                        (loss * share if micro > 1 else loss).backward()
            with phase("optimizer"):
                optimizer.step()

        # every gradient of the step is marked while alive (a fused step frees them as it goes)
        grad_hooks = [p.register_hook(mark_gradient) for p in model.parameters() if p.requires_grad]
        try:
            census = record(census_step, sum(static.bytes.values()))
        finally:
            for h in grad_hooks:
                h.remove()
        grad_keys = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}  # alive at the end
        split, hidden, where = _split(census, static, meters, grad_keys, model, loss_keys)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        top = max(range(len(meters)), key=lambda i: meters[i].total_bytes + hidden[i])  # the largest micro-batch
        by_module = dict(meters[top].by_module)
        if hidden[top]:
            by_module["(hidden)"] = hidden[top]
        return Measurement(
            saved_bytes=meters[top].total_bytes + hidden[top],
            peak_bytes=census.peak_bytes,
            param_bytes=unique_bytes(model.parameters()),
            grad_bytes=unique_bytes(p.grad for p in model.parameters()),
            optimizer_bytes=unique_bytes(_optimizer_tensors(optimizer)),
            step_seconds=statistics.median(times) if times else float("nan"),
            trainable_param_bytes=unique_bytes(trainable),
            saved_by_module=by_module,
            threads=torch.get_num_threads(),
            hidden_bytes=hidden[top],
            peak_split=split,
            peak_phase=where[0],
            peak_where=where[1],
            phase_peaks=census.phase_peaks(),
            frozen_by_dtype=static.frozen_by_dtype,
        )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]


@dataclasses.dataclass
class _Static:
    """What is alive when the measured step starts: bytes and storage keys by category."""

    bytes: dict[str, int]
    keys: dict[int, str]
    frozen_by_dtype: dict[str, int]


def _static(model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any) -> _Static:
    from edgetrain.ops import state_tensors

    groups = [("weights_trainable", [p for p in model.parameters() if p.requires_grad]),
              ("weights_frozen", [p for p in model.parameters() if not p.requires_grad]),
              ("buffers", list(model.buffers())), ("optimizer", _optimizer_tensors(optimizer)),
              ("batch", [*tensors(x), *tensors(y)]), ("state", [t for t in state_tensors(model)
                                                               if isinstance(t, Tensor)])]
    keys: dict[int, str] = {}
    sizes: dict[str, int] = {c: 0 for c in CATEGORIES}
    frozen: dict[str, int] = {}
    for cat, ts in groups:
        for t in ts:
            if t.device.type == "meta" or storage_key(t) in keys:
                continue  # each storage once, in the first category that holds it
            keys[storage_key(t)] = cat
            sizes[cat] += t.untyped_storage().nbytes()
            if cat == "weights_frozen":
                dt = str(t.dtype).removeprefix("torch.")
                frozen[dt] = frozen.get(dt, 0) + t.untyped_storage().nbytes()
    return _Static(sizes, keys, frozen)


def _split(census, static: _Static, meters: list[SavedTensorMeter], grads: set[int],  # noqa: ANN001
           model: nn.Module, loss_keys: set[int]) -> tuple[dict[str, int], list[int], tuple[str, str]]:
    """(bytes by category at the peak, hidden bytes per micro-batch, (phase, where)) from the step census."""
    from edgetrain.ops import state_tensors

    state = {storage_key(t) for t in state_tensors(model) if isinstance(t, Tensor)}
    forwards = [(start, end) for name, start, end in census.ranges if name == "forward"]
    saved_allocs: set[int] = set()
    hidden_allocs: set[int] = set()
    hidden: list[int] = []
    for (start, end), meter in zip(forwards, meters):  # what each micro-batch's forward keeps at its end
        keys = meter.keys
        at_end = census.live_after(end)
        saved_allocs |= {a for a, e in at_end.items() if e.ptr in keys}
        mine = {a for a, e in at_end.items() if start <= e.time <= end and e.ptr not in keys and e.ptr not in
                loss_keys and e.ptr not in state}
        hidden_allocs |= mine
        hidden.append(sum(at_end[a].size for a in mine))
    hidden += [0] * (len(meters) - len(hidden))
    split = dict(static.bytes)
    idx = census.peak_index
    where = ("", "")
    if idx >= 0:
        freed = {e.alloc for e in census.events if e.size < 0}
        for alloc, e in census.live_at(idx).items():
            if alloc in saved_allocs:
                cat = "saved"
            elif alloc in hidden_allocs:
                cat = "hidden"
            elif e.phase == "backward" and (census.is_gradient(e) or (e.ptr in grads and e.alloc not in freed)):
                cat = "gradients"  # a gradient of the step: marked while alive, or a .grad alive at the end
            elif e.ptr in state:
                cat = "state"  # e.g. a codec buffer (re)made in the step
            else:
                cat = "transient"
            split[cat] += e.size
        peak_event = census.events[idx]
        where = (peak_event.phase, " / ".join(w for w in (peak_event.module or peak_event.node, peak_event.op) if w))
    return split, hidden, where


def _fmt(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


_LABELS = {"weights_trainable": "weights (trained)", "weights_frozen": "weights (frozen)", "buffers": "buffers",
           "gradients": "gradients", "optimizer": "optimizer state", "saved": "saved activations",
           "hidden": "kept outside hooks", "batch": "batch", "state": "technique state", "transient": "transient"}


def format_measurement(m: Measurement) -> str:
    """A short human-readable table of a :class:`Measurement`, with what holds the peak."""
    rows = [("saved for backward", _fmt(m.saved_bytes)), ("peak live tensors", _fmt(m.peak_bytes)),
            ("parameters", _fmt(m.param_bytes)), ("  trainable", _fmt(m.trainable_param_bytes)),
            ("gradients", _fmt(m.grad_bytes)), ("optimizer state", _fmt(m.optimizer_bytes)),
            ("step time", f"{m.step_seconds * 1e3:.1f} ms ({m.threads} threads)")]
    lines = [f"{k:<20} {v:>14}" for k, v in rows]
    if m.peak_split:
        lines.append(f"\nthe peak ({_fmt(m.peak_bytes)}) happens in the {m.peak_phase or '?'}"
                     + (f" at {m.peak_where}" if m.peak_where else "") + "; it holds:")
        for cat, n in m.peak_split.items():
            if n:
                lines.append(f"  {_LABELS.get(cat, cat):<18} {_fmt(n):>14} {100 * n / m.peak_bytes:5.1f}%")
        if m.frozen_by_dtype:
            lines.append(f"  (frozen weights by dtype: {', '.join(f'{k} {_fmt(v)}' for k, v in m.frozen_by_dtype.items())};"
                         f" peak RAM with them in flash: {_fmt(m.ram_peak(flash=True))})")
    return "\n".join(lines)
