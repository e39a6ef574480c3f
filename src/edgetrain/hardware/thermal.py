"""Thermal-aware execution: a slimmable network switched to a narrower width before a phone-class device throttles.

Papers: Yu, Yang, Xu, Yang, Huang, *Slimmable Neural Networks*, ICLR 2019, arXiv:1812.08928 (one set of weights run
at several widths, the first ``w * c`` channels of every layer; switchable BatchNorm: one BatchNorm per width);
Yu and Huang, *Universally Slimmable Networks and Improved Training Techniques*, ICCV 2019, arXiv:1903.05134
(sandwich rule, in-place distillation: the narrower widths learn the widest one's soft predictions); Zhou, Liang,
Chin, Marculescu, *Play It Cool: Dynamic Shifting Prevents Thermal Throttling*, ICML 2022 DyNN workshop,
arXiv:2206.10849 (shift to the small sub-network of a shared-weight network when the phone is about to throttle).

Models (docs/thermal.md has every constant's source):

* Lumped RC thermal model of the SoC: ``C dT/dt = P - (T - T_amb) / R``. Over a step ``dt`` at constant ``P`` the
  exact solution is ``T' = T_inf + (T - T_inf) exp(-dt / (R C))``, ``T_inf = T_amb + P R``; explicit Euler is
  ``T' = T + dt (P R - (T - T_amb)) / (R C)``.
* Power: ``P = P_static + u * n * k * f * V(f)**2`` (the Linux energy model's ``dynamic-power-coefficient`` ``k`` in
  uW/MHz/V^2 per core, ``n`` cores, ``f`` in MHz), ``u`` the busy fraction of the time.
* Latency of a frame: ``L = MACs / (n * m * f)``, ``m`` effective MACs per cycle per core; a frame that takes
  longer than the frame period misses its deadline and the frames released meanwhile are dropped.
* Governor: step-wise (our simplification of Linux ``drivers/thermal/gov_step_wise.c``), polled every ``poll``
  seconds: temperature at or above the trip point and rising -> one frequency level down; below
  ``trip - hysteresis`` -> one level up; otherwise hold.
* Policy: before each frame, predict the temperature ``horizon`` seconds ahead for each width at the current
  frequency (the RC model's exact solution) and run the widest width whose prediction stays below
  ``trip - margin`` (the narrowest when none does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError

__all__ = ["PHONE", "PHONE_SOURCES", "RC", "WIDTHS", "Device", "Governor", "SlimmableCNN", "Trace", "channels",
           "choose_width", "set_width", "simulate", "slimmable_step"]

WIDTHS = (0.25, 0.5, 0.75, 1.0)  # the switches of Yu et al. 2019 (S-Net, section 4)
# SDM845 big cluster (Kryo 385 Gold, CPU4-7), Linux arch/arm64/boot/dts/qcom/sdm845.dtsi cpu4_opp_table: every 4th
# operating point (our subset), MHz
SDM845_BIG_MHZ = (576.0, 902.4, 1209.6, 1536.0, 1843.2, 2169.6, 2476.8, 2803.2)


def _positive(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or \
            (value == 0 and not zero):
        raise ConfigError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ thermal model
@dataclass(frozen=True)
class RC:
    """A lumped thermal model: thermal resistance ``r`` (K/W) to ambient, capacitance ``c`` (J/K), ambient ``amb``
    (degrees C)."""

    r: float
    c: float
    amb: float = 25.0

    def __post_init__(self) -> None:
        _positive("RC r (thermal resistance, K/W)", self.r)
        _positive("RC c (thermal capacitance, J/K)", self.c)
        _finite("RC amb (ambient, C)", self.amb)

    @property
    def tau(self) -> float:
        """The time constant ``R C`` in seconds."""
        return self.r * self.c

    def step(self, temp: float, power: float, dt: float, method: str = "exact") -> float:
        """The temperature ``dt`` seconds on at constant ``power`` (W): ``"exact"`` or ``"euler"``."""
        _positive("power (W)", power, zero=True)
        _positive("dt (s)", dt, zero=True)
        if method == "exact":
            inf = self.amb + power * self.r
            return inf + (temp - inf) * math.exp(-dt / self.tau)
        if method == "euler":
            return temp + dt * (power * self.r - (temp - self.amb)) / self.tau
        raise ConfigError(f"RC.step method must be 'exact' or 'euler', got {method!r}")


# ------------------------------------------------------------------------------------------------ device
@dataclass(frozen=True)
class Device:
    """A phone-class CPU cluster: frequency levels (MHz, ascending) and their voltages, the power and compute
    constants, the thermal model and the governor's trip point."""

    rc: RC
    mhz: tuple[float, ...]
    volts: tuple[float, ...]
    cores: int
    k_dyn: float  # uW/MHz/V^2 per core
    p_static: float  # W, drawn busy or idle
    macs_per_cycle: float  # effective, per core
    trip: float  # C
    hysteresis: float  # C
    poll: float  # s

    def __post_init__(self) -> None:
        if not self.mhz or len(self.mhz) != len(self.volts):
            raise ConfigError(f"Device: give one voltage per frequency level, got {len(self.mhz)} levels and "
                              f"{len(self.volts)} voltages")
        for i, (f, v) in enumerate(zip(self.mhz, self.volts)):
            _positive(f"Device mhz[{i}]", f)
            _positive(f"Device volts[{i}]", v)
        if any(b <= a for a, b in zip(self.mhz, self.mhz[1:])):
            raise ConfigError(f"Device mhz must be strictly ascending, got {self.mhz}")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError(f"Device cores must be an int >= 1, got {self.cores!r}")
        _positive("Device k_dyn (uW/MHz/V^2)", self.k_dyn)
        _positive("Device p_static (W)", self.p_static, zero=True)
        _positive("Device macs_per_cycle", self.macs_per_cycle)
        _finite("Device trip (C)", self.trip)
        _positive("Device hysteresis (C)", self.hysteresis, zero=True)
        _positive("Device poll (s)", self.poll)
        if self.trip <= self.rc.amb:
            raise ConfigError(f"Device trip {self.trip} C must be above the ambient {self.rc.amb} C")

    def _level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(self.mhz):
            raise ConfigError(f"frequency level must be an int in [0, {len(self.mhz) - 1}], got {level!r}")
        return level

    def dynamic_power(self, level: int) -> float:
        """W drawn above ``p_static`` while busy at ``level``: ``n k f V**2`` (k in uW/MHz/V^2)."""
        i = self._level(level)
        return self.cores * self.k_dyn * self.mhz[i] * self.volts[i] ** 2 * 1e-6

    def power(self, level: int, busy: float) -> float:
        """W at ``level`` with busy fraction ``busy`` in [0, 1]."""
        if not 0 <= _finite("busy fraction", busy) <= 1:
            raise ConfigError(f"busy fraction must be in [0, 1], got {busy!r}")
        return self.p_static + busy * self.dynamic_power(level)

    def latency(self, macs: float, level: int) -> float:
        """Seconds to compute ``macs`` multiply-accumulates at ``level``."""
        _positive("MACs", macs)
        return macs / (self.cores * self.macs_per_cycle * self.mhz[self._level(level)] * 1e6)


def linear_volts(mhz: Sequence[float], lo: tuple[float, float], hi: tuple[float, float]) -> tuple[float, ...]:
    """Voltages on the line through ``lo = (MHz, V)`` and ``hi = (MHz, V)``."""
    slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
    return tuple(round(lo[1] + slope * (f - lo[0]), 6) for f in mhz)


PHONE = Device(
    # R, C: our assumption, chosen so that the full-width network at the top frequency crosses the trip point
    # within 1-2 minutes (phones throttle within minutes of a sustained CPU load); ambient: a 25 C room
    rc=RC(r=20.0, c=2.5, amb=25.0),
    mhz=SDM845_BIG_MHZ,
    # our assumption: the mainline dtsi gives no voltages (firmware sets them); linear 0.60 V at 300 MHz to
    # 1.05 V at 2803.2 MHz, a typical mobile DVFS range
    volts=linear_volts(SDM845_BIG_MHZ, (300.0, 0.60), (2803.2, 1.05)),
    cores=4,  # SDM845's four big cores, CPU4-7 (sdm845.dtsi)
    k_dyn=442.0,  # sdm845.dtsi dynamic-power-coefficient of CPU4-7 (Linux energy model: uW/MHz/V^2)
    p_static=0.5,  # W, our assumption (leakage and uncore while the cluster runs the model)
    macs_per_cycle=2.0,  # our assumption: 1/4 of a Cortex-A75-class core's 8 fp32 NEON FMAs per cycle
    trip=90.0,  # sdm845.dtsi cpu4-thermal trip-point0: passive, 90000 mC
    hysteresis=2.0,  # sdm845.dtsi: hysteresis = <2000> mC
    poll=0.25,  # sdm845.dtsi: polling-delay-passive = <250> ms
)
#: where each of PHONE's constants comes from (written into results files beside the numbers)
PHONE_SOURCES = {
    "rc.r": "our assumption: 20 K/W, so that the full-width net at the top level settles above the trip point",
    "rc.c": "our assumption: 2.5 J/K (tau = 50 s), so that it crosses the trip within 1-2 minutes",
    "rc.amb": "our assumption: a 25 C room",
    "mhz": "Linux arch/arm64/boot/dts/qcom/sdm845.dtsi cpu4_opp_table (big cluster), every 4th OPP (our subset)",
    "volts": "our assumption: linear from 0.60 V at 300 MHz to 1.05 V at 2803.2 MHz (the dtsi has no voltages)",
    "cores": "sdm845.dtsi: four big cores CPU4-7 (Kryo 385 Gold) run the model",
    "k_dyn": "sdm845.dtsi dynamic-power-coefficient = <442> for CPU4-7 (Linux energy model, uW/MHz/V^2)",
    "p_static": "our assumption: 0.5 W leakage and uncore",
    "macs_per_cycle": "our assumption: 2 effective fp32 MACs/cycle/core, 1/4 of a Cortex-A75-class NEON peak of 8",
    "trip": "sdm845.dtsi cpu4-thermal trip-point0: passive, temperature = <90000> (mC)",
    "hysteresis": "sdm845.dtsi cpu4-thermal trip-point0: hysteresis = <2000> (mC)",
    "poll": "sdm845.dtsi cpu4-thermal: polling-delay-passive = <250> (ms)",
}


# ------------------------------------------------------------------------------------------------ governor
@dataclass
class Governor:
    """Step-wise throttling (module docstring). ``state`` 0 runs the top level, ``state`` s runs level
    ``top - s``."""

    device: Device
    state: int = 0
    last: float | None = None

    @property
    def level(self) -> int:
        return len(self.device.mhz) - 1 - self.state

    def update(self, temp: float) -> int:
        """One poll at temperature ``temp``; returns the frequency level to run."""
        _finite("temperature", temp)
        rising = self.last is not None and temp > self.last
        if temp >= self.device.trip and rising:
            self.state = min(self.state + 1, len(self.device.mhz) - 1)
        elif temp < self.device.trip - self.device.hysteresis:
            self.state = max(self.state - 1, 0)
        self.last = temp
        return self.level


def choose_width(rc: RC, temp: float, powers: Mapping[float, float], horizon: float, limit: float) -> float:
    """The widest width whose constant power keeps the RC prediction ``horizon`` s ahead below ``limit`` (C); the
    narrowest when none does."""
    _positive("horizon (s)", horizon)
    if not powers:
        raise ConfigError("choose_width: no widths to choose from")
    order = sorted(powers)
    for w in reversed(order):
        if rc.step(temp, powers[w], horizon) < limit:
            return w
    return order[0]


# ------------------------------------------------------------------------------------------------ simulation
@dataclass
class Trace:
    """Per processed frame: start time (s), width, frequency (MHz), latency (s), temperature at its end (C),
    seconds it held the device (its frame slots); and the run's totals."""

    time: list[float] = field(default_factory=list)
    width: list[float] = field(default_factory=list)
    mhz: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    temp: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    slots: int = 0
    on_time: int = 0
    peak: float = 0.0
    throttled_s: float = 0.0

    def summary(self, accuracy: Mapping[float, float], period: float) -> dict:
        """Deadline misses, time-weighted mean accuracy, peak temperature, latency statistics, time per width."""
        total = sum(self.held)
        share = {w: sum(h for x, h in zip(self.width, self.held) if x == w) / total for w in sorted(set(self.width))}
        lat = sorted(self.latency)
        return {"slots": self.slots, "frames": len(self.latency), "on_time": self.on_time,
                "miss_rate": 1 - self.on_time / self.slots, "dropped": self.slots - len(self.latency),
                "mean_accuracy": sum(accuracy[w] * s for w, s in share.items()),
                "on_time_accuracy": sum(accuracy[w] for w, x in zip(self.width, self.latency) if x <= period)
                / self.slots,
                "width_share": {str(w): s for w, s in share.items()}, "peak_temp": self.peak,
                "throttled_share": self.throttled_s / (self.slots * period),
                "latency_mean_ms": 1e3 * sum(lat) / len(lat), "latency_p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))],
                "latency_max_ms": 1e3 * lat[-1]}


def simulate(device: Device, macs: Mapping[float, float], widths: Sequence[float], *, seconds: float, fps: float,
             horizon: float | None = None, margin: float = 0.0, model: RC | None = None) -> Trace:
    """Run frames at ``fps`` for ``seconds`` on ``device`` under its step-wise governor.

    Args:
        macs: per-frame forward MACs of each width.
        widths: the widths the run may use; one width = always that width, several = the policy chooses.
        horizon: the policy's prediction horizon (s); needed when ``widths`` has more than one.
        margin: the policy keeps its prediction below ``trip - margin``.
        model: the RC model the policy predicts with (default the device's own: a perfect model).
    """
    period = 1.0 / _positive("fps", fps)
    _positive("seconds", seconds)
    unknown = [w for w in widths if w not in macs]
    if not widths or unknown:
        raise ConfigError(f"unknown width(s) {unknown or '(none given)'}; widths with MACs: {sorted(macs)}")
    if len(widths) > 1 and horizon is None:
        raise ConfigError("the policy (several widths) needs a prediction horizon in seconds")
    _positive("margin (C)", margin, zero=True)
    model = model or device.rc
    gov, tr = Governor(device), Trace()
    temp, slot, n_slots, next_poll = device.rc.amb, 0, round(seconds * fps), 0.0
    while slot < n_slots:
        t = slot * period
        if t >= next_poll:
            gov.update(temp)
            next_poll = t + device.poll
        level = gov.level
        if len(widths) == 1:
            w = widths[0]
        else:
            powers = {x: device.power(level, min(1.0, device.latency(macs[x], level) / period)) for x in widths}
            w = choose_width(model, temp, powers, horizon, device.trip - margin)
        lat = device.latency(macs[w], level)
        n = min(max(1, math.ceil(lat / period - 1e-12)), n_slots - slot)
        held = n * period
        busy = min(lat, held)
        temp = device.rc.step(temp, device.power(level, 1.0), busy)
        tr.peak = max(tr.peak, temp)  # first order: the temperature is monotone within each constant-power span
        temp = device.rc.step(temp, device.p_static, held - busy)
        tr.time.append(t), tr.width.append(w), tr.mhz.append(device.mhz[level]), tr.latency.append(lat)
        tr.temp.append(temp), tr.held.append(held)
        tr.on_time += lat <= period
        tr.throttled_s += held * (gov.state > 0)
        slot += n
    tr.slots = n_slots
    return tr


# ------------------------------------------------------------------------------------------------ slimmable network
class SlimConv2d(nn.Conv2d):
    """A conv whose first ``round(w * out)`` filters over the first ``round(w * in)`` input channels run at width
    ``w`` (the input channels stay whole when ``slim_in`` is False)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, slim_in: bool = True, padding: int = 0) -> None:
        super().__init__(cin, cout, kernel, padding=padding, bias=False)
        self.slim_in, self.width = slim_in, 1.0

    def forward(self, x: Tensor) -> Tensor:  # (N, in_w, H, W) -> (N, out_w, H', W')
        cout = channels(self.out_channels, self.width)
        cin = channels(self.in_channels, self.width) if self.slim_in else self.in_channels
        return F.conv2d(x, self.weight[:cout, :cin], None, self.stride, self.padding)


class SwitchableBN2d(nn.Module):
    """One BatchNorm2d per width (switchable BatchNorm), each over that width's channels."""

    def __init__(self, c: int, widths: Sequence[float]) -> None:
        super().__init__()
        self.widths, self.width = tuple(widths), 1.0
        self.bn = nn.ModuleList(nn.BatchNorm2d(channels(c, w)) for w in self.widths)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.widths.index(self.width)](x)


def channels(c: int, width: float) -> int:
    """``max(1, round(width * c))``."""
    return max(1, round(width * c))


class SlimmableCNN(nn.Module):
    """Three 3x3 conv blocks (conv, switchable BN, ReLU; 2x2 max pooling after the first two), global average
    pooling and a linear head whose input channels follow the width; every width shares the weights."""

    def __init__(self, widths: Sequence[float] = WIDTHS, chans: Sequence[int] = (16, 32, 64), in_channels: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        if not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1
                             for w in widths) or max(widths) != 1.0:
            raise ConfigError(f"SlimmableCNN widths must be numbers in (0, 1] including 1.0, got {tuple(widths)}")
        self.widths, self.width = tuple(sorted(float(w) for w in widths)), 1.0
        cins = (in_channels, *chans[:-1])
        self.convs = nn.ModuleList(SlimConv2d(a, b, 3, slim_in=i > 0, padding=1)
                                   for i, (a, b) in enumerate(zip(cins, chans)))
        self.bns = nn.ModuleList(SwitchableBN2d(c, self.widths) for c in chans)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, classes)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        x = x.mean((2, 3))
        return F.linear(x, self.head.weight[:, :x.shape[1]], self.head.bias)


def set_width(model: nn.Module, width: float) -> nn.Module:
    """Run every slimmable layer of ``model`` at ``width`` (one of ``model.widths``)."""
    widths = getattr(model, "widths", ())
    if width not in widths:
        raise ConfigError(f"unknown width {width!r}; this network runs at {list(widths)}")
    model.width = width
    for m in model.modules():
        if isinstance(m, (SlimConv2d, SwitchableBN2d)):
            m.width = width
    return model


def slimmable_step(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, *, distill: bool = True) -> float:
    """One step over every width (S-Net): the widest learns the labels; the others learn the widest one's soft
    predictions (in-place distillation, US-Net) when ``distill``, else the labels. Gradients of all widths add up
    before one optimizer step. Returns the widest width's loss."""
    opt.zero_grad(set_to_none=True)
    soft, top = None, 0.0
    for w in sorted(model.widths, reverse=True):
        out = set_width(model, w)(x)
        if soft is None or not distill:
            loss = F.cross_entropy(out, y)
        else:
            loss = F.kl_div(F.log_softmax(out, 1), soft, reduction="batchmean")
        if soft is None:
            soft, top = F.softmax(out.detach(), 1), float(loss.detach())
        loss.backward()
    opt.step()
    set_width(model, max(model.widths))
    return top
