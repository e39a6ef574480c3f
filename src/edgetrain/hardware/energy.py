"""Energy and time of one training step on a device profile, from the cost model's per-layer MACs and bytes.

The argument (Horowitz, ISSCC 2014; Sze, Chen, Yang, Emer, "Efficient Processing of Deep Neural Networks: A Tutorial
and Survey", Proc. IEEE 2017): a multiply-accumulate costs a few pJ, a DRAM access a few hundred, so where the bytes
of a step live decides its energy. This module turns :func:`edgetrain.cost.estimate`'s table into bytes read and
written per layer, pass and memory level, and those into joules and seconds with a :mod:`profile
<edgetrain.hardware.profiles>`. A first-order model; its rules, stated so they can be checked:

**Bytes moved** (batch B; activations 4 bytes per element, the float32 the meter sees). Per layer row of the table:

* forward: reads its input (B x |in| x 4) and its weights, writes its output (B x |out| x 4);
* backward, when the layer takes part (it trains a parameter, needs its input's gradient, or saved something):
  reads the output's gradient and what it saved; a conv/linear that passes the gradient on also reads its weights
  and writes the input's gradient; trainable parameters' gradients are written;
* optimizer: per trainable byte T, reads the parameter, its gradient and k state copies, writes the parameter and
  the k copies: (2 + k) T read, (1 + k) T written (k = 0 SGD, 1 momentum, 2 Adam).

Whether a conv/linear passes the gradient on comes from the trace: its backward MACs are one product per gradient
needed (input, weight). What a technique changes (frozen layers, smaller saved tensors, trainable subsets, fewer
backward MACs) reaches the bytes and MACs through the traced table.

**Where the bytes live** (the memory levels of the profile, fastest first):

* the step's *resident* state (weights, gradients, optimizer state, saved activations: it lives across layers)
  goes to the first level that holds all of it; its accesses are charged there;
* a layer's *streaming* activations (its input, output and their gradients) go to the first level that holds
  the layer's input and output together;
* a saved activation written at a streaming level other than the resident one is written back once (its eviction).

**Energy** = forward and backward MACs x ``mac_pj`` + bytes x each level's read/write energy + ``active_watts`` x
time. **Time** = per layer and pass, the larger of compute (MACs / (``macs_per_second`` x the op kind's
efficiency for the pass)) and memory (bytes / bandwidth, summed over levels; a layer without MACs divides it by the
``other`` efficiency), plus ``op_overhead_s``: a roofline per layer;
plus the profile's ``step_overhead_s`` once per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from edgetrain.cost import OPT_COPIES, CostTable
from edgetrain.hardware.profiles import Level, Profile

ACT_BYTES = 4  # bytes per activation element: float32, what the meter sees on the CPU
PASSES = ("forward", "backward", "optimizer")


@dataclasses.dataclass
class Traffic:
    """One layer's MACs and bytes per pass: ``reads[pass][level]``, ``writes[pass][level]``."""

    name: str
    kind: str  # the op kind for the profile's efficiency: conv, depthwise, linear or other
    macs: dict[str, int]
    reads: dict[str, dict[str, float]]
    writes: dict[str, dict[str, float]]

    def bytes(self, pass_: str | None = None) -> float:
        passes = PASSES if pass_ is None else (pass_,)
        return sum(sum(self.reads[p].values()) + sum(self.writes[p].values()) for p in passes)


@dataclasses.dataclass
class StepCost:
    """Energy (J) and time (s) of one training step, split by level, pass and layer."""

    profile: str
    batch_size: int
    energy_j: float | None
    time_s: float | None
    energy_by: dict[str, float]  # compute, each level, active power
    time_by_pass: dict[str, float]
    layers: list[dict[str, Any]]  # name, kind, macs, bytes, energy_j (incl. active power x its time), time_s
    bytes_by_level: dict[str, float]
    resident_level: str
    resident_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _numel(shape: tuple | None) -> int:
    return math.prod(shape) if shape else 0


def _module(model: nn.Module | None, name: str) -> nn.Module | None:
    """The row's module, or ``None`` (no model given, or a row such as ``(loss)`` that names no module)."""
    if model is None:
        return None
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _kind(model: nn.Module | None, name: str, row_kind: str) -> str:
    m = _module(model, name)
    if isinstance(m, nn.Conv2d | nn.Conv1d):
        return "depthwise" if m.groups > 1 and m.groups == m.in_channels else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return {"Conv2d": "conv", "Conv1d": "conv", "Linear": "linear"}.get(row_kind, "other")


def _weight_trains(model: nn.Module | None, name: str, row) -> bool:  # noqa: ANN001
    w = getattr(_module(model, name), "weight", None) if name else None  # the root's own row: by its bytes
    if isinstance(w, nn.Parameter):
        return w.requires_grad
    return row.trainable_bytes > 0


def _home(levels: tuple[Level, ...], nbytes: float) -> str:
    for lv in levels:
        if lv.capacity is None or nbytes <= lv.capacity.value:
            return lv.name
    return levels[-1].name


def traffic(table: CostTable, levels: tuple[Level, ...], model: nn.Module | None = None) -> tuple[list[Traffic], str,
                                                                                                  int]:
    """Per-layer MACs and bytes per pass and level (see the module docstring), the resident level and bytes."""
    b, k = table.batch_size, OPT_COPIES[table.optimizer]
    resident = int(table.param_bytes + table.grad_bytes + table.optimizer_bytes + table.saved_bytes
                   + b * _numel(table.input_shape) * ACT_BYTES)
    home = _home(levels, resident)
    out = []
    for r in table.layers.values():
        ib, ob = b * _numel(r.in_shape) * ACT_BYTES, b * _numel(r.out_shape) * ACT_BYTES
        saved, T = r.saved(b), r.trainable_bytes
        stream = _home(levels, ib + ob)
        rd = {p: {lv.name: 0.0 for lv in levels} for p in PASSES}
        wr = {p: {lv.name: 0.0 for lv in levels} for p in PASSES}
        fmacs = r.macs * b
        rd["forward"][stream] += ib
        rd["forward"][home] += r.weight_bytes
        wr["forward"][stream] += ob
        if saved and stream != home:
            wr["forward"][home] += saved
        w_needs = _weight_trains(model, r.name, r) if r.macs else False
        grads = round(r.backward_macs / r.macs) if r.macs else 0
        in_needs = grads - int(w_needs) > 0 if r.macs else saved > 0
        bmacs = r.backward_macs * b
        if T or in_needs or saved:
            rd["backward"][stream] += ob
            rd["backward"][home] += saved
            if in_needs:
                wr["backward"][stream] += ib
                if r.macs:
                    rd["backward"][home] += r.weight_bytes
            wr["backward"][home] += T
        rd["optimizer"][home] += (2 + k) * T
        wr["optimizer"][home] += (1 + k) * T
        out.append(Traffic(r.name, _kind(model, r.name, r.kind), {"forward": fmacs, "backward": bmacs, "optimizer": 0},
                           rd, wr))
    return out, home, resident


def step_cost(table: CostTable, profile: Profile, model: nn.Module | None = None, *, energy: bool | None = None,
              time: bool | None = None) -> StepCost:
    """Energy and time of one step of ``table`` on ``profile`` (``model``: the traced model, for op kinds and which
    weights train; ``None`` falls back to the table's row kinds).

    ``energy``/``time``: ``True`` asks for it (a profile missing a constant it needs is refused, the constant
    named), ``False`` skips it, ``None`` (default) gives it when the profile has what it needs.
    """
    energy = profile.can(energy=True) if energy is None else energy
    time = profile.can(time=True) if time is None else time
    if not energy and not time:
        profile.needs(energy=False, time=True)  # neither is possible: name what time would need
    profile.needs(energy=energy, time=time)
    want_time = time or (energy and profile.active_watts is not None and profile.active_watts.value > 0)
    rows, home, resident = traffic(table, profile.levels, model)
    lv = {x.name: x for x in profile.levels}
    layers, by_pass = [], dict.fromkeys(PASSES, 0.0)
    e_by = {"compute": 0.0, **{x.name: 0.0 for x in profile.levels}}
    bytes_by = {x.name: 0.0 for x in profile.levels}
    total_t = 0.0
    for t in rows:
        e_layer = t_layer = 0.0
        for p in PASSES:
            for name in lv:
                bytes_by[name] += t.reads[p][name] + t.writes[p][name]
            if energy:
                e = t.macs[p] * profile.mac_pj.value * 1e-12
                e_by["compute"] += e
                e_layer += e
                for name, x in lv.items():
                    e = (t.reads[p][name] * x.read_pj_per_byte.value + t.writes[p][name] * x.write_pj_per_byte.value)
                    e_by[name] += e * 1e-12
                    e_layer += e * 1e-12
            if want_time and (t.macs[p] or t.bytes(p)):
                eff = profile.efficiency.get(f"{t.kind}_backward" if p == "backward" else t.kind,
                                             profile.efficiency.get(t.kind))
                e = eff.value if eff else 1.0
                compute = t.macs[p] / (profile.macs_per_second.value * (e if t.kind != "other" else 1.0))
                memory = sum((t.reads[p][n] + t.writes[p][n]) / x.bandwidth.value for n, x in lv.items())
                memory /= e if t.kind == "other" and p != "optimizer" else 1.0
                over = profile.op_overhead_s.value if profile.op_overhead_s and p != "optimizer" else 0.0
                dt = max(compute, memory) + over
                by_pass[p] += dt
                t_layer += dt
        total_t += t_layer
        if energy and want_time:  # the board's power while this layer runs
            e_layer += profile.active_watts.value * t_layer
        layers.append({"name": t.name, "kind": t.kind, "macs": sum(t.macs.values()), "bytes": t.bytes(),
                       "energy_j": e_layer if energy else None, "time_s": t_layer if want_time else None})
    if want_time and profile.step_overhead_s is not None:
        total_t += profile.step_overhead_s.value
        by_pass["step"] = profile.step_overhead_s.value
    energy_j = None
    if energy:
        e_by["active"] = profile.active_watts.value * total_t
        energy_j = sum(e_by.values())
    return StepCost(profile.name, table.batch_size, energy_j, total_t if want_time else None, e_by if energy else {},
                    by_pass if want_time else {}, layers, bytes_by, home, resident)


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1, ""), (1e-3, "m"), (1e-6, "u"), (1e-9, "n"), (1e-12, "p")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"0 {unit}"


def format_cost(cost: StepCost, top: int = 10) -> str:
    """Totals, the split by memory level and pass, and the ``top`` layers by energy (or time)."""
    lines = [f"one step on {cost.profile!r}, batch {cost.batch_size} (a model, not a measurement): "
             f"energy {_si(cost.energy_j, 'J')}, time {_si(cost.time_s, 's')}",
             f"resident state {cost.resident_bytes / 1024:.1f} KiB lives in {cost.resident_level}"]
    if cost.energy_by:
        parts = ", ".join(f"{k} {_si(v, 'J')}" for k, v in cost.energy_by.items())
        lines.append(f"energy by where it goes: {parts}")
    lines.append("bytes moved by level: " + ", ".join(f"{k} {v / 1024**2:.2f} MiB" for k, v in cost.bytes_by_level.items()))
    if cost.time_by_pass:
        lines.append("time by pass: " + ", ".join(f"{k} {_si(v, 's')}" for k, v in cost.time_by_pass.items()))
    key = "energy_j" if cost.energy_j is not None else "time_s"
    rows = sorted(cost.layers, key=lambda r: -(r[key] or 0))[:top]
    head = f"{'layer':34s} {'kind':9s} {'MMACs':>9s} {'MiB moved':>10s} {'energy':>10s} {'time':>10s}"
    lines += ["", f"top {len(rows)} layers by {'energy' if key == 'energy_j' else 'time'}:", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'] or '(root)':34.34s} {r['kind']:9s} {r['macs'] / 1e6:9.2f} {r['bytes'] / 1024**2:10.3f} "
                     f"{_si(r['energy_j'], 'J'):>10s} {_si(r['time_s'], 's'):>10s}")
    return "\n".join(lines)
