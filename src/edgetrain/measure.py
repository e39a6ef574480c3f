"""The meter: what one real training step stores, measured.

:func:`measure` runs real training steps and reports the fields of the measurement contract
(DESIGN.md):

* ``saved_bytes`` — tensors saved for backward during the forward pass, seen through
  :func:`torch.autograd.graph.saved_tensors_hooks`. Each storage counts once, at its full size (a view
  keeps its whole storage alive). Storages of the model's parameters and buffers are not counted (they
  are resident anyway and reported in ``param_bytes``). Techniques that keep tensors alive through their
  own saved-tensor hooks (innermost hooks win in PyTorch) report them with :func:`account_saved`, so
  compressed payloads count at their real size.
* ``peak_bytes`` — the peak of live tensor bytes over a full step (zero_grad, forward, loss, backward,
  optimizer step): the bytes live at the start (unique storages of parameters, buffers, gradients,
  optimizer state and the batch) plus the maximum running sum of the CPU allocator's allocation and free
  events recorded by the torch profiler (``profile_memory=True``). Not a sum of shapes.
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

from edgetrain.errors import ConfigError
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

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[Tensor] = ()) -> None:
        self.model = model
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

    def _exit_module(self) -> None:
        self._stack.pop()

    def _pack(self, t: Tensor) -> Tensor:
        self.account(t)
        return t

    def __enter__(self) -> SavedTensorMeter:
        if self.model is not None:
            for name, m in self.model.named_modules():
                self._handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._enter_module(n)))
                self._handles.append(m.register_forward_hook(lambda *_: self._exit_module()))
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


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured training step (fields of the measurement contract first)."""

    saved_bytes: int
    peak_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    step_seconds: float
    trainable_param_bytes: int
    saved_by_module: dict[str, int]
    threads: int

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
            repeats: int = 5, restore: bool = True) -> Measurement:
    """Run real training steps of ``model`` on ``batch`` and measure them.

    Args:
        model: the model, in the mode it should train in (this function does not call ``train()``).
        batch: ``(inputs, target)`` or ``inputs``; inputs are a tensor (``model(x)``), a tuple (``model(*x)``) or a
            dict (``model(**x)``). Tensors that are views into a larger storage (a batch sliced from a dataset)
            are copied first, so the counts see the batch, not the dataset.
        loss_fn: ``loss_fn(output, target)``; default: the output's own ``loss``, else cross-entropy of its
            logits.
        optimizer: default SGD (lr 0.01, momentum 0.9) over the parameters that require grad.
        recipe: applied with :func:`edgetrain.apply_` before measuring and removed afterwards.
        warmup: untimed steps first (they also create the optimizer state the step then holds).
        repeats: timed steps; ``step_seconds`` is their median.
        restore: put model, gradients, optimizer state and RNG back as they were afterwards.
    """
    if recipe is not None:
        from edgetrain.apply import apply_

        with apply_(model, recipe, split_batch(batch)[0]):
            return measure(model, batch, loss_fn, optimizer, warmup=warmup, repeats=repeats, restore=restore)
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"measure: need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"measure: {type(model).__name__} has no parameter that requires grad: nothing to train")
    if optimizer is None:
        optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    loss_fn = loss_fn or default_loss
    x, y = (own_storage(part) for part in split_batch(batch))

    def step(meter: SavedTensorMeter | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        with meter if meter is not None else contextlib.nullcontext():
            out = call_model(model, x)
            if meter is not None:
                meter._enter_module("(loss)")  # what the loss keeps gets its own row
            loss = loss_fn(out, y)
            if meter is not None:
                meter._exit_module()
        if not torch.isfinite(loss):
            raise ConfigError(f"measure: the loss is {loss.item()} on this batch; nothing meaningful to measure")
        loss.backward()
        optimizer.step()

    def state_tensors() -> list[Tensor]:
        return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]

    with _restoring(model, optimizer, restore):
        for _ in range(warmup):
            step()
        saved = SavedTensorMeter(model)
        step(saved)
        live = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), *state_tensors(),
                *tensors(x), *tensors(y)]
        peak = PeakMeter(live)
        with peak:
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return Measurement(
            saved_bytes=saved.total_bytes,
            peak_bytes=peak.peak_bytes,
            param_bytes=unique_bytes(model.parameters()),
            grad_bytes=unique_bytes(p.grad for p in model.parameters()),
            optimizer_bytes=unique_bytes(state_tensors()),
            step_seconds=statistics.median(times),
            trainable_param_bytes=unique_bytes(trainable),
            saved_by_module=dict(saved.by_module),
            threads=torch.get_num_threads(),
        )


def _fmt(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_measurement(m: Measurement) -> str:
    """A short human-readable table of a :class:`Measurement`."""
    rows = [("saved for backward", _fmt(m.saved_bytes)), ("peak live tensors", _fmt(m.peak_bytes)),
            ("parameters", _fmt(m.param_bytes)), ("  trainable", _fmt(m.trainable_param_bytes)),
            ("gradients", _fmt(m.grad_bytes)), ("optimizer state", _fmt(m.optimizer_bytes)),
            ("step time", f"{m.step_seconds * 1e3:.1f} ms ({m.threads} threads)")]
    return "\n".join(f"{k:<20} {v:>14}" for k, v in rows)
