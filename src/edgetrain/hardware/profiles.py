"""Device profiles for the energy and time model (:mod:`edgetrain.hardware.energy`): compute rates, per-operation and
per-access energies, memory levels, each constant with its source.

A profile is a mapping (the built-ins below, or a YAML file given as ``--profile FILE``) in which every constant is
``{value: ..., source: "..."}``; a bare number is refused, so no constant enters an estimate without a source:

.. code-block:: yaml

    name: my_board
    description: what it is
    compute:
      mac_pj: {value: 4.6, source: "Horowitz, ISSCC 2014 (45 nm): fp32 multiply 3.7 pJ + add 0.9 pJ"}
      macs_per_second: {value: 2.0e9, source: "datasheet ..."}
      efficiency: {depthwise: {value: 0.2, source: "our assumption"}}   # optional, per op kind (default 1);
                                                                          # <kind>_backward for the backward pass
      op_overhead_s: {value: 2.0e-6, source: "..."}                       # optional, per layer and pass
      step_overhead_s: {value: 1.0e-4, source: "..."}                     # optional, per step
    active_watts: {value: 0.0, source: "..."}   # power drawn while the step runs, beyond the per-access energies
    levels:                                      # fastest first; the last one holds what the others cannot
      - name: sram
        capacity: {value: 256KiB, source: "..."}
        read_pj_per_byte: {value: 2.5, source: "..."}
        write_pj_per_byte: {value: 2.5, source: "..."}
        bandwidth: {value: 8.0e9, source: "..."}   # bytes per second

Which constants an estimate needs: energy needs ``mac_pj``, every level's ``read_pj_per_byte`` and
``write_pj_per_byte`` and ``active_watts`` (with ``active_watts > 0`` also the time constants); time needs
``macs_per_second`` and every level's ``bandwidth``. A missing one is named in the error. Zero is allowed only for
energies and overheads a profile folds into another constant (its source says so); capacities, rates and
bandwidths must be positive.

Built-in profiles: ``horowitz45`` (an accelerator-style datapath from Horowitz's 45 nm energy table: energy only),
``mcu``, ``raspberry_pi_4`` (board power x time; the per-access energies of these CPUs are not published, so they
are folded into the board's power), and ``host`` (this machine: rates measured by :mod:`edgetrain.hardware.calibrate`,
no energy constants, so energy is refused on it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from edgetrain.devices import KiB, MiB, parse_size
from edgetrain.errors import ConfigError

OP_KINDS = ("conv", "depthwise", "linear", "other")  # the op kinds a profile may give an efficiency for
#: efficiency keys: a kind (both passes) or ``<kind>_backward`` (the backward pass only, overriding the kind's);
#: a conv/linear kind scales the MAC rate, ``other`` (layers without MACs: norms, activations) the bandwidth
EFFICIENCY_KEYS = OP_KINDS + tuple(f"{k}_backward" for k in OP_KINDS)


@dataclasses.dataclass(frozen=True)
class Const:
    value: float
    source: str


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    capacity: Const | None  # None: unbounded (the last level)
    read_pj_per_byte: Const | None
    write_pj_per_byte: Const | None
    bandwidth: Const | None  # bytes per second


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    levels: tuple[Level, ...]
    mac_pj: Const | None = None
    macs_per_second: Const | None = None
    efficiency: dict[str, Const] = dataclasses.field(default_factory=dict)
    op_overhead_s: Const | None = None
    step_overhead_s: Const | None = None
    active_watts: Const | None = None

    def needs(self, energy: bool, time: bool) -> None:
        """Refuse in one line when a constant the estimate needs is missing (named)."""
        missing = []
        if energy:
            missing += ["compute.mac_pj"] if self.mac_pj is None else []
            missing += ["active_watts"] if self.active_watts is None else []
            for lv in self.levels:
                missing += [f"levels.{lv.name}.{k}" for k in ("read_pj_per_byte", "write_pj_per_byte")
                            if getattr(lv, k) is None]
            time = time or (self.active_watts is not None and self.active_watts.value > 0)
        if time:
            missing += ["compute.macs_per_second"] if self.macs_per_second is None else []
            missing += [f"levels.{lv.name}.bandwidth" for lv in self.levels if lv.bandwidth is None]
        if missing:
            what = "energy" if energy else "time"
            raise ConfigError(f"profile {self.name!r} has no {', '.join(missing)}, which the {what} estimate needs")

    def can(self, energy: bool = False, time: bool = False) -> bool:
        """Whether the profile has every constant the estimate needs."""
        try:
            self.needs(energy=energy, time=time)
        except ConfigError:
            return False
        return True

    def constants(self) -> list[tuple[str, float, str]]:
        """Every constant as (key, value, source), for the docs and ``--json``."""
        out = []
        for key in ("mac_pj", "macs_per_second", "op_overhead_s", "step_overhead_s", "active_watts"):
            c = getattr(self, key)
            if c is not None:
                out.append((key, c.value, c.source))
        out += [(f"efficiency.{k}", c.value, c.source) for k, c in self.efficiency.items()]
        for lv in self.levels:
            for key in ("capacity", "read_pj_per_byte", "write_pj_per_byte", "bandwidth"):
                c = getattr(lv, key)
                if c is not None:
                    out.append((f"{lv.name}.{key}", c.value, c.source))
        return out


# ------------------------------------------------------------------------------------------------ parsing
def _const(d: dict, key: str, where: str, *, size: bool = False, zero_ok: bool = False) -> Const | None:
    if key not in d:
        return None
    c = d[key]
    if not isinstance(c, dict) or set(c) != {"value", "source"}:
        raise ConfigError(f"profile: {where}{key} must be {{value: ..., source: \"...\"}} (every constant carries "
                          f"its source), got {c!r}")
    if not isinstance(c["source"], str) or not c["source"].strip():
        raise ConfigError(f"profile: {where}{key} has an empty source")
    v = c["value"]
    try:
        v = float(parse_size(v)) if size and isinstance(v, str) else float(v)
    except (TypeError, ValueError, ConfigError):
        raise ConfigError(f"profile: {where}{key} must be a number{' or a size like 256KiB' if size else ''}, "
                          f"got {v!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"profile: {where}{key} must be {'>= 0' if zero_ok else '> 0'}, got {v}")
    return Const(v, c["source"].strip())


def parse_profile(d: Any) -> Profile:
    """A :class:`Profile` from its mapping (see the module docstring), validated."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ConfigError("profile: expected a mapping with a name, compute, active_watts and levels")
    unknown = set(d) - {"name", "description", "compute", "active_watts", "levels"}
    if unknown:
        raise ConfigError(f"profile {d['name']!r}: unknown keys {sorted(unknown)}; known: name, description, "
                          "compute, active_watts, levels")
    comp = d.get("compute") or {}
    if not isinstance(comp, dict):
        raise ConfigError(f"profile {d['name']!r}: compute must be a mapping")
    bad = set(comp) - {"mac_pj", "macs_per_second", "efficiency", "op_overhead_s", "step_overhead_s"}
    if bad:
        raise ConfigError(f"profile {d['name']!r}: unknown compute keys {sorted(bad)}; known: mac_pj, "
                          "macs_per_second, efficiency, op_overhead_s, step_overhead_s")
    eff = comp.get("efficiency") or {}
    if not isinstance(eff, dict) or set(eff) - set(EFFICIENCY_KEYS):
        raise ConfigError(f"profile {d['name']!r}: compute.efficiency is a mapping of op kinds {OP_KINDS} (or "
                          f"<kind>_backward), got {eff!r}")
    levels = d.get("levels")
    if not isinstance(levels, list) or not levels:
        raise ConfigError(f"profile {d['name']!r}: levels must be a non-empty list (fastest first)")
    parsed = []
    for i, lv in enumerate(levels):
        if not isinstance(lv, dict) or not isinstance(lv.get("name"), str):
            raise ConfigError(f"profile {d['name']!r}: level {i} must be a mapping with a name")
        bad = set(lv) - {"name", "capacity", "read_pj_per_byte", "write_pj_per_byte", "bandwidth"}
        if bad:
            raise ConfigError(f"profile {d['name']!r}: level {lv['name']!r} has unknown keys {sorted(bad)}")
        w = f"levels.{lv['name']}."
        cap = _const(lv, "capacity", w, size=True)
        if cap is None and i < len(levels) - 1:
            raise ConfigError(f"profile {d['name']!r}: level {lv['name']!r} needs a capacity (only the last level "
                              "may be unbounded)")
        parsed.append(Level(lv["name"], cap, _const(lv, "read_pj_per_byte", w, zero_ok=True),
                            _const(lv, "write_pj_per_byte", w, zero_ok=True), _const(lv, "bandwidth", w)))
    return Profile(
        name=d["name"], description=str(d.get("description", "")), levels=tuple(parsed),
        mac_pj=_const(comp, "mac_pj", "compute.", zero_ok=True),
        macs_per_second=_const(comp, "macs_per_second", "compute."),
        efficiency={k: _const(eff, k, "compute.efficiency.") for k in eff},
        op_overhead_s=_const(comp, "op_overhead_s", "compute.", zero_ok=True),
        step_overhead_s=_const(comp, "step_overhead_s", "compute.", zero_ok=True),
        active_watts=_const(d, "active_watts", "", zero_ok=True))


def load_profile(path: str | Path) -> Profile:
    """A profile from a YAML (or JSON) file; malformed files are one line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile file {str(p)!r} does not exist")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"profile file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_profile(d)


# ------------------------------------------------------------------------------------------------ built-ins
def _c(value: float, source: str) -> dict:
    return {"value": value, "source": source}


_H = "Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, 45 nm at 0.9 V"
_H_MAC = _c(4.6, f"{_H}: fp32 multiply 3.7 pJ + fp32 add 0.9 pJ")
_EQUAL_WRITE = "our assumption: a write costs what a read does (the table gives one figure per access)"

BUILTIN: dict[str, dict] = {
    "horowitz45": {
        "name": "horowitz45",
        "description": "an accelerator-style fp32 datapath with 32 KiB and 1 MiB on-chip SRAM and DRAM, energies from "
                       "Horowitz's 45 nm table (energy only: the table has no rates)",
        "compute": {"mac_pj": _H_MAC},
        "active_watts": _c(0.0, "dynamic energy only: the table gives per-operation energies, no leakage"),
        "levels": [
            {"name": "sram_32k", "capacity": _c(32 * KiB, f"{_H}: the 32 KB cache row"),
             "read_pj_per_byte": _c(2.5, f"{_H}: 20 pJ per 64-bit access to a 32 KB cache = 2.5 pJ/B"),
             "write_pj_per_byte": _c(2.5, _EQUAL_WRITE)},
            {"name": "sram_1m", "capacity": _c(1 * MiB, f"{_H}: the 1 MB cache row"),
             "read_pj_per_byte": _c(12.5, f"{_H}: 100 pJ per 64-bit access to a 1 MB cache = 12.5 pJ/B"),
             "write_pj_per_byte": _c(12.5, _EQUAL_WRITE)},
            {"name": "dram",
             "read_pj_per_byte": _c(160.0, f"{_H}: DRAM 1.3-2.6 nJ per 64-bit access; 160 pJ/B is the 640 pJ per "
                                    "32-bit word Han et al. (NeurIPS 2015, Fig. 1) take from the same table"),
             "write_pj_per_byte": _c(160.0, _EQUAL_WRITE)},
        ],
    },
    "mcu": {
        "name": "mcu",
        "description": "STM32F746-class microcontroller (Cortex-M7, 216 MHz, 320 KB SRAM, 1 MB flash): TTE's target",
        "compute": {
            "mac_pj": _c(0.0, "folded into active_watts (the datasheet gives run-mode current, not energy per op)"),
            "macs_per_second": _c(216e6, "STM32F746 datasheet (DS10916): 216 MHz; Arm Cortex-M7 TRM: one single-"
                                  "precision VFMA issued per cycle (peak; our reading)"),
            "efficiency": {k: _c(0.25, "our assumption: a quarter of the FPU peak for loads, address arithmetic and "
                                 "loop overhead around each multiply-accumulate (not measured on a board)")
                           for k in OP_KINDS[:3]},
        },
        "active_watts": _c(0.33, "STM32F746 datasheet (DS10916), run mode at 216 MHz from flash with ART, peripherals "
                           "disabled: about 100 mA typical at 3.3 V (approximate; we could not re-read the table "
                           "offline)"),
        "levels": [
            {"name": "sram", "capacity": _c(320 * 1000, "STM32F746 datasheet: 320 KB SRAM (TTE uses 256 KB of it)"),
             "read_pj_per_byte": _c(0.0, "folded into active_watts"),
             "write_pj_per_byte": _c(0.0, "folded into active_watts"),
             "bandwidth": _c(216e6 * 4, "our assumption: one 32-bit load or store per 216 MHz cycle")},
            {"name": "external",
             "read_pj_per_byte": _c(0.0, "folded into active_watts"),
             "write_pj_per_byte": _c(0.0, "folded into active_watts"),
             "bandwidth": _c(216e6 * 4 / 2, "our assumption: half the SRAM rate (FMC SDRAM on the discovery board); "
                             "a step that spills here does not fit the MCU's budget anyway")},
        ],
    },
    "raspberry_pi_4": {
        "name": "raspberry_pi_4",
        "description": "Raspberry Pi 4 Model B (BCM2711, 4x Cortex-A72 at 1.5 GHz, 1 MB L2, LPDDR4-3200)",
        "compute": {
            "mac_pj": _c(0.0, "folded into active_watts"),
            "macs_per_second": _c(24e9, "4 Cortex-A72 cores x 1.5 GHz (Raspberry Pi 4 product brief) x 4 fp32 "
                                  "multiply-adds per cycle per core (one 128-bit NEON FMA per cycle: our reading of "
                                  "the A72's FP/ASIMD pipes; peak, not verified)"),
            "efficiency": {"conv": _c(0.3, "our assumption"), "linear": _c(0.4, "our assumption"),
                           "depthwise": _c(0.05, "our assumption (memory-bound kernels; cf. the host's measured "
                                           "ratio in benchmarks/results/host-steptime-*)")},
            "op_overhead_s": _c(30e-6, "our assumption: PyTorch eager dispatch on an A72 (a few times this machine's)"),
        },
        "active_watts": _c(6.4, "Raspberry Pi 4 B under a 4-core stress load: about 6.4 W at the supply (widely "
                           "reported board measurement; approximate)"),
        "levels": [
            {"name": "l2", "capacity": _c(1 * MiB, "Raspberry Pi 4 product brief / BCM2711: 1 MB shared L2"),
             "read_pj_per_byte": _c(0.0, "folded into active_watts"),
             "write_pj_per_byte": _c(0.0, "folded into active_watts"),
             "bandwidth": _c(40e9, "our assumption: 4 cores x 16 B per cycle at 1.5 GHz, two thirds sustained")},
            {"name": "lpddr4",
             "read_pj_per_byte": _c(0.0, "folded into active_watts"),
             "write_pj_per_byte": _c(0.0, "folded into active_watts"),
             "bandwidth": _c(12.8e9, "LPDDR4-3200 on a 32-bit bus: 3200 MT/s x 4 B (product brief; peak)")},
        ],
    },
}


def get_profile(name: str) -> Profile:
    """A built-in profile by name (``host`` is measured on this machine, once per process), or a YAML file."""
    if name == "host":
        from edgetrain.hardware.calibrate import host_profile

        return host_profile()
    if name in BUILTIN:
        return parse_profile(BUILTIN[name])
    if name.endswith((".yaml", ".yml", ".json")):
        return load_profile(name)
    raise ConfigError(f"unknown device profile {name!r}; known: {', '.join([*BUILTIN, 'host'])} (or a .yaml file)")
