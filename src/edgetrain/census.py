"""The step census: every allocation and free of a training step, from the torch profiler's allocation events
(with their addresses), so that the peak can be split by what holds it and placed in time.

:func:`record` runs ``step`` (a callable doing forward, loss, backward and optimizer step, with the phases marked by
:func:`phase`) under ``torch.profiler`` with ``profile_memory=True`` and returns a :class:`Census`: the ordered
allocation events (signed sizes, allocation ids, addresses, the op that made them and the phase/module/autograd
node they happened in) and the baseline of bytes already alive. :meth:`Census.split` attributes every allocation
alive at the peak to a category, using what the meter knows after the step: which storages were saved for backward
(saved-tensor hooks), which are the gradients, the outputs, and the tensors alive before the step (weights,
buffers, optimizer state, the batch, technique state).

The allocator sees every tensor storage whatever holds it (a ``ctx`` attribute, an RNG state kept by checkpointing,
a codec's buffer), so nothing kept alive escapes the total; what the categories cannot name is *transient*
(forward intermediates not kept, backward gradient buffers, optimizer temporaries, decoded activations).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._C._profiler import _EventType

PHASES = ("forward", "loss", "backward", "optimizer")
_PREFIX = "edgetrain::"
_GRAD = _PREFIX + "grad:"


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the step (``forward``, ``loss``, ``backward``, ``optimizer``) for the census."""
    with torch.profiler.record_function(_PREFIX + name):
        yield


def mark_gradient(g: torch.Tensor) -> None:
    """A parameter's gradient hook: marks a moment at which ``g``, a gradient of the step, is alive, so that the
    census tells its allocation from others the allocator places at the same address before or after."""
    with torch.profiler.record_function(f"{_GRAD}{g.untyped_storage().data_ptr()}"):
        pass


@contextlib.contextmanager
def module_range(name: str) -> Iterator[None]:
    with torch.profiler.record_function(f"{_PREFIX}module:{name}"):
        yield


@dataclasses.dataclass
class Event:
    time: int  # ns
    alloc: int  # allocation number (pairs an allocation with its free at the same address)
    ptr: int
    size: int  # > 0 allocation, < 0 free
    op: str  # the op that made it ("" outside any op)
    phase: str
    module: str  # innermost module in the forward ("" elsewhere)
    node: str  # autograd node in the backward ("" elsewhere)


@dataclasses.dataclass
class Census:
    """What one step allocated and freed, in order, on top of ``baseline`` bytes alive when it started."""

    events: list[Event]
    baseline: int
    ranges: list[tuple[str, int, int]]  # (phase, start, end) in time order (a phase recurs per micro-batch)
    grad_marks: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # address -> times (mark_gradient)

    def is_gradient(self, e: Event) -> bool:
        """Whether allocation ``e`` held a gradient of the step: a :func:`mark_gradient` at its address falls within
        its life (addresses alone mislead: a fused step frees each gradient and the allocator reuses the block)."""
        marks = self.grad_marks.get(e.ptr)
        if not marks:
            return False
        end = self._frees().get(e.alloc)
        return any(e.time <= t and (end is None or t <= end) for t in marks)

    def _frees(self) -> dict[int, int]:
        if not hasattr(self, "_free_times"):
            self._free_times = {e.alloc: e.time for e in self.events if e.size < 0}
        return self._free_times

    @property
    def phase_ends(self) -> dict[str, int]:
        """The end of each phase's last range."""
        return {name: end for name, _, end in self.ranges}

    def running(self) -> list[int]:
        run, out = 0, []
        for e in self.events:
            run += e.size
            out.append(run)
        return out

    @property
    def peak_index(self) -> int:
        run = self.running()
        return max(range(len(run)), key=run.__getitem__) if run else -1

    @property
    def peak_bytes(self) -> int:
        run = self.running()
        return self.baseline + max([0, *run])

    def phase_peaks(self) -> dict[str, int]:
        """The peak within each phase (baseline included)."""
        out: dict[str, int] = {}
        for e, r in zip(self.events, self.running()):
            out[e.phase] = max(out.get(e.phase, 0), self.baseline + r)
        return out

    def live_at(self, index: int) -> dict[int, Event]:
        """Allocations made during the step and alive after event ``index`` (by allocation id)."""
        live: dict[int, Event] = {}
        for e in self.events[:index + 1]:
            if e.size > 0:
                live[e.alloc] = e
            else:
                live.pop(e.alloc, None)
        return live

    def live_after(self, time: int) -> dict[int, Event]:
        idx = max((i for i, e in enumerate(self.events) if e.time <= time), default=-1)
        return self.live_at(idx)


def _context(node: Any) -> tuple[str, str, str, str]:
    """(op, phase, module, autograd node) of an allocation event, from its ancestors in the profiler's tree."""
    op = phase_name = module = grad_node = ""
    p = node.parent
    while p is not None:
        name = p.name
        if name.startswith(_PREFIX + "module:"):
            module = module or name[len(_PREFIX) + 7:]
        elif name.startswith(_PREFIX):
            phase_name = phase_name or name[len(_PREFIX):]
        elif name.startswith("autograd::engine::evaluate_function: "):
            grad_node = grad_node or name.split(": ", 1)[1]
        elif not op and p.typed[0] == _EventType.TorchOp:
            op = name
        p = p.parent
    return op, phase_name, module, grad_node


def record(step: Callable[[], Any], baseline: int) -> Census:
    """Run ``step`` under the profiler and collect its allocation events (``baseline``: bytes alive before)."""
    from edgetrain.measure import _quiet_native_stderr

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.__enter__()
    try:
        step()
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
    events, ranges, marks = [], [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        kind = node.typed[0]
        if kind == _EventType.Allocation:
            f = node.typed[1]
            if f.device.type != "cpu" or f.alloc_size == 0:
                continue
            events.append(Event(node.start_time_ns, 0, f.ptr, f.alloc_size, *_context(node)))
        elif node.name.startswith(_GRAD):
            marks.setdefault(int(node.name[len(_GRAD):]), []).append(node.start_time_ns)
        elif node.name.startswith(_PREFIX) and not node.name.startswith(_PREFIX + "module:"):
            ranges.append((node.name[len(_PREFIX):], node.start_time_ns, node.end_time_ns))
    events.sort(key=lambda e: e.time)
    # pair each free with the allocation at its address; a free of a block allocated before the step has none (the
    # profiler does not record those) and is dropped: the census tracks what the step made
    live: dict[int, int] = {}
    kept = []
    for n, e in enumerate(events):
        if e.size > 0:
            e.alloc = live[e.ptr] = n
        elif e.ptr in live:
            e.alloc = live.pop(e.ptr)
        else:
            continue
        kept.append(e)
    return Census(kept, baseline, sorted(ranges, key=lambda r: r[1]), marks)
