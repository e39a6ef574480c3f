"""Memory technology of the last-level cache: SRAM vs STT-MRAM vs SOT-MRAM, priced with a training step's traffic.

Inci, Isgenc, Marculescu, "DeepNVM++: Cross-Layer Modeling and Optimization Framework of Non-Volatile Memories for
Deep Learning", IEEE TCAD 2022, arXiv 2012.04559. Their claim (abstract): at iso-capacity STT-/SOT-MRAM last-level
caches give up to 3.8x/4.7x lower energy-delay product (EDP) and 2.4x/2.8x less area than SRAM; at iso-area up to
2x/2.3x lower EDP while holding 2.3x/3.3x the capacity. Their figures come from NVSim with their own 16 nm cells and
GPU traces; their cache-level tables were not retrieved here (only the paper's abstract was reachable offline).

**Technology tables** (:data:`NVSIM`): one public NVSim run of SRAM, STT-MRAM and SOT-MRAM caches at 16 KiB-8 MiB,
every value with its file (desaiharsh/18743-Project @713fc0d, ``op_{SRAM,MRAM,SOT}_ww512/<capacity>.txt``: NVSim,
22 nm HP, 350 K, 64-byte lines, 16 ways, sequential access, read-EDP optimised; cells: NVSim's SRAM (146 F^2) and
STT (54 F^2, 10 ns write pulse) samples, and the project's SOT cell (81.5 F^2, 0.4 ns pulse)). Between published
capacities every value is interpolated linearly in log(value) vs log(capacity) (**ours**); outside 16 KiB-8 MiB a
capacity is refused. **Iso-area** (ours): the MRAM capacity whose interpolated area equals the SRAM cache's area.

**The model** (a first-order one, stated so it can be checked). The step's bytes per memory level come from
:func:`edgetrain.hardware.energy.traffic` with levels ``upper..., llc, dram`` (its placement rule: resident state in
the first level that holds all of it, a layer's streaming activations in the first level that holds its input +
output). With L = the cache line (64 B) and lines counted as bytes / L (fractional, summed over the step):

* LLC dynamic energy = reads_llc/L x E_hit + writes_llc/L x E_write + (reads_dram + writes_dram)/L x E_miss
  (a DRAM access looks the line up in the LLC first and misses; no fill: what lives in DRAM does not fit the LLC);
* memory latency T = reads_llc/L x t_hit + writes_llc/L x t_write + (reads_dram + writes_dram)/L x (t_miss + t_DRAM):
  accesses serialised, no overlap between banks, accesses or compute (an upper bound: the ratios are what compare);
* LLC leakage energy = P_leak x (T + ``other_time_s``) (``other_time_s``: step time spent elsewhere, default 0);
* DRAM energy = bytes read x e_read + bytes written x e_write (per byte);
* EDP = (LLC + DRAM energy) x T; the LLC's own EDP = LLC energy x T. The upper levels (L1) are the same for every
  technology and are not priced: they only take traffic away from the LLC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from edgetrain.cost import CostTable
from edgetrain.devices import KiB, MiB, parse_size
from edgetrain.errors import ConfigError
from edgetrain.hardware.energy import PASSES, traffic
from edgetrain.hardware.profiles import Const, Level

TECHNOLOGIES = ("sram", "stt_mram", "sot_mram")
FIELDS = ("area_mm2", "read_latency_s", "miss_latency_s", "write_latency_s", "read_energy_j", "miss_energy_j",
          "write_energy_j", "leakage_w")
_NVSIM_KEYS = ("Total Area (mm^2)", "Cache Hit Latency (ns)", "Cache Miss Latency (ns)", "Cache Write Latency (ns)",
               "Cache Hit Dynamic Energy (nJ per access)", "Cache Miss Dynamic Energy (nJ per access)",
               "Cache Write Dynamic Energy (nJ per access)", "Cache Total Leakage Power (mW)")
_SCALE = (1.0, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-3)  # NVSim's units -> mm^2, s, J, W
_REPO = "desaiharsh/18743-Project @713fc0d (NVSim, 22 nm HP, 350 K, 64 B lines, 16-way, read-EDP optimised)"
_DIRS = {"sram": "op_SRAM_ww512", "stt_mram": "op_MRAM_ww512", "sot_mram": "op_SOT_ww512"}
_CAPS = ("16K", "32K", "64K", "128K", "256K", "512K", "1M", "2M", "4M", "8M")

#: NVSim's cache summary per technology and capacity, in its units: area mm^2; hit, miss, write latency ns; hit,
#: miss, write energy nJ per 64-byte access; leakage mW. Copied from the files named in the module docstring.
NVSIM: dict[str, dict[str, tuple[float, ...]]] = {
    "sram": {
        "16K": (0.015, 0.364, 0.117, 0.246, 0.005, 0.002, 0.004, 24.880),
        "32K": (0.025, 0.492, 0.142, 0.350, 0.008, 0.002, 0.007, 43.563),
        "64K": (0.075, 0.235, 0.143, 0.122, 0.053, 0.002, 0.052, 113.686),
        "128K": (0.151, 0.264, 0.145, 0.124, 0.071, 0.003, 0.069, 227.371),
        "256K": (0.222, 0.412, 0.205, 0.184, 0.088, 0.002, 0.084, 346.616),
        "512K": (0.426, 0.505, 0.166, 0.246, 0.115, 0.004, 0.110, 737.676),
        "1M": (0.804, 0.708, 0.190, 0.343, 0.160, 0.006, 0.152, 1393.899),
        "2M": (1.498, 1.188, 0.271, 0.581, 0.222, 0.006, 0.207, 2628.406),
        "4M": (2.985, 1.851, 0.267, 0.915, 0.313, 0.010, 0.298, 5256.195),
        "8M": (5.751, 3.382, 0.364, 1.744, 0.439, 0.013, 0.409, 9963.393),
    },
    "stt_mram": {
        "16K": (0.048, 3.222, 1.594, 10.161, 0.277, 0.154, 1.162, 7.459),
        "32K": (0.053, 3.264, 1.596, 10.197, 0.277, 0.154, 1.170, 13.859),
        "64K": (0.061, 3.340, 1.597, 10.247, 0.278, 0.154, 1.172, 18.840),
        "128K": (0.080, 3.478, 1.618, 10.446, 0.278, 0.154, 1.189, 36.313),
        "256K": (0.104, 3.802, 1.654, 10.578, 0.263, 0.138, 1.128, 37.626),
        "512K": (0.226, 3.584, 1.664, 10.473, 0.302, 0.139, 1.167, 136.345),
        "1M": (0.342, 4.042, 1.779, 10.635, 0.309, 0.130, 1.154, 140.996),
        "2M": (0.747, 3.942, 1.808, 10.579, 0.369, 0.133, 1.215, 526.843),
        "4M": (1.259, 4.419, 1.705, 10.865, 0.416, 0.133, 1.224, 600.882),
        "8M": (2.438, 4.902, 1.781, 11.068, 0.487, 0.135, 1.302, 1195.658),
    },
    "sot_mram": {
        "16K": (0.045, 3.234, 1.596, 0.566, 0.277, 0.154, 0.026, 7.480),
        "32K": (0.052, 3.291, 1.598, 0.628, 0.277, 0.154, 0.035, 13.896),
        "64K": (0.065, 3.383, 1.599, 0.688, 0.278, 0.154, 0.037, 18.909),
        "128K": (0.092, 3.566, 1.621, 0.975, 0.278, 0.154, 0.056, 36.450),
        "256K": (0.141, 3.642, 1.666, 0.988, 0.283, 0.138, 0.078, 68.174),
        "512K": (0.281, 3.702, 1.677, 1.013, 0.308, 0.139, 0.103, 136.349),
        "1M": (0.564, 3.797, 1.793, 0.795, 0.355, 0.132, 0.140, 268.592),
        "2M": (1.045, 4.146, 1.829, 1.158, 0.390, 0.135, 0.189, 528.696),
        "4M": (1.807, 4.667, 1.727, 1.413, 0.454, 0.133, 0.242, 620.262),
        "8M": (3.393, 5.520, 1.832, 1.833, 0.533, 0.136, 0.341, 1195.691),
    },
}
LINE = Const(64.0, f"{_REPO}: 'Cache Line Size: 64Bytes' (NVSim word width 512 bit: one access moves one line)")

#: DeepNVM++'s headline ratios (abstract), SRAM / MRAM: "up to", over their GPU workloads.
PAPER = {"stt_mram": {"iso_capacity_edp": 3.8, "area": 2.4, "iso_area_edp": 2.0, "iso_area_capacity": 2.3},
         "sot_mram": {"iso_capacity_edp": 4.7, "area": 2.8, "iso_area_edp": 2.3, "iso_area_capacity": 3.3}}


def _bytes(cap: str) -> int:
    return int(cap[:-1]) * (MiB if cap.endswith("M") else KiB)


@dataclasses.dataclass(frozen=True)
class CacheTech:
    """One last-level cache design point: a technology at a capacity, every constant with its source."""

    technology: str
    capacity: Const  # bytes
    line_bytes: Const
    area_mm2: Const
    read_latency_s: Const  # a read hit
    miss_latency_s: Const  # a lookup that misses (the DRAM access comes on top)
    write_latency_s: Const
    read_energy_j: Const  # per line
    miss_energy_j: Const
    write_energy_j: Const
    leakage_w: Const

    def constants(self) -> list[tuple[str, float, str]]:
        return [(f.name, getattr(self, f.name).value, getattr(self, f.name).source)
                for f in dataclasses.fields(self) if f.name != "technology"]


@dataclasses.dataclass(frozen=True)
class Dram:
    """What a miss of the last-level cache costs: per-byte energies and a latency per line."""

    read_pj_per_byte: Const
    write_pj_per_byte: Const
    line_latency_s: Const


_H = "Horowitz, ISSCC 2014 (45 nm): DRAM 1.3-2.6 nJ per 64-bit access; 160 pJ/B as in the horowitz45 profile"
DRAM = Dram(Const(160.0, _H), Const(160.0, "our assumption: a write costs what a read does (one figure per access)"),
            Const(30e-9, "ours, from JEDEC JESD79-4 DDR4-3200AA (22-22-22, tCK 0.625 ns): tRCD 13.75 ns + CL "
                  "13.75 ns + BL8 burst 2.5 ns for a closed-page 64-byte line"))


def _check_tech(technology: str) -> None:
    if technology not in TECHNOLOGIES:
        raise ConfigError(f"unknown memory technology {technology!r}; known: {', '.join(TECHNOLOGIES)}")


def _capacity(capacity: float | str) -> float:
    try:
        c = float(parse_size(capacity)) if isinstance(capacity, str) else float(capacity)
    except (TypeError, ValueError, ConfigError):
        raise ConfigError(f"cache capacity must be a number of bytes or a size like 1MiB, got {capacity!r}") from None
    if not math.isfinite(c) or c <= 0:
        raise ConfigError(f"cache capacity must be > 0 bytes, got {capacity!r}")
    lo, hi = _bytes(_CAPS[0]), _bytes(_CAPS[-1])
    if not lo <= c <= hi:
        raise ConfigError(f"cache capacity {c / KiB:g} KiB is outside the technology table's 16 KiB-8 MiB")
    return c


def llc(technology: str, capacity: float | str) -> CacheTech:
    """The ``technology`` cache of ``capacity`` bytes (or a size like ``"1MiB"``) from :data:`NVSIM`: the published
    values at a published capacity, log-log interpolated (ours) between the two around it otherwise."""
    _check_tech(technology)
    c = _capacity(capacity)
    caps = [_bytes(k) for k in _CAPS]
    i = max(j for j, k in enumerate(caps) if k <= c)
    rows = NVSIM[technology]
    src = [f"{_REPO}: {_DIRS[technology]}/{k}.txt" for k in _CAPS]
    vals = {}
    for n, (name, key, scale) in enumerate(zip(FIELDS, _NVSIM_KEYS, _SCALE, strict=True)):
        if caps[i] == c:
            vals[name] = Const(rows[_CAPS[i]][n] * scale, f"{src[i]}, '{key}'")
            continue
        a, b = rows[_CAPS[i]][n], rows[_CAPS[i + 1]][n]
        t = math.log(c / caps[i]) / math.log(caps[i + 1] / caps[i])
        v = math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
        vals[name] = Const(v * scale, f"ours: log-log interpolation of '{key}' between {src[i]} and "
                                      f"{_CAPS[i + 1]}.txt")
    return CacheTech(technology, Const(c, "the capacity asked for"), LINE, **vals)


def iso_area_capacity(technology: str, sram_capacity: float | str) -> float:
    """The capacity (bytes) of a ``technology`` cache with the area of the SRAM cache of ``sram_capacity`` (ours:
    the log-log interpolated area curve of :data:`NVSIM`, inverted); refused outside the table."""
    _check_tech(technology)
    target = llc("sram", sram_capacity).area_mm2.value
    areas = [NVSIM[technology][k][0] for k in _CAPS]
    caps = [_bytes(k) for k in _CAPS]
    for i in range(len(_CAPS) - 1):
        if areas[i] <= target <= areas[i + 1]:
            t = math.log(target / areas[i]) / math.log(areas[i + 1] / areas[i])
            return math.exp(math.log(caps[i]) + t * math.log(caps[i + 1] / caps[i]))
    raise ConfigError(f"no {technology} cache in the table (16 KiB-8 MiB, {areas[0]}-{areas[-1]} mm^2) has the "
                      f"{target:.3g} mm^2 of a {_capacity(sram_capacity) / KiB:g} KiB SRAM cache")


def _const(d: dict, key: str, where: str) -> Const:
    if key not in d:
        raise ConfigError(f"{where}: missing {key}")
    c = d[key]
    if not isinstance(c, dict) or set(c) != {"value", "source"} or not str(c["source"]).strip():
        raise ConfigError(f"{where}: {key} must be {{value: ..., source: \"...\"}} with a non-empty source, got {c!r}")
    try:
        v = float(parse_size(c["value"])) if key == "capacity" and isinstance(c["value"], str) else float(c["value"])
    except (TypeError, ValueError, ConfigError):
        raise ConfigError(f"{where}: {key} must be a number, got {c['value']!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: {key} must be > 0, got {c['value']!r}")
    return Const(v, str(c["source"]).strip())


def parse_llc(d: Any) -> CacheTech:
    """A :class:`CacheTech` from a mapping ``{technology, capacity, line_bytes, area_mm2, ...}`` of
    ``{value, source}`` constants (every field of :class:`CacheTech`; each must be positive)."""
    if not isinstance(d, dict):
        raise ConfigError(f"cache: expected a mapping of constants, got {type(d).__name__}")
    tech = d.get("technology")
    _check_tech(tech)
    keys = [f.name for f in dataclasses.fields(CacheTech) if f.name != "technology"]
    unknown = set(d) - {"technology", *keys}
    if unknown:
        raise ConfigError(f"cache {tech!r}: unknown keys {sorted(unknown)}; known: {', '.join(keys)}")
    return CacheTech(tech, **{k: _const(d, k, f"cache {tech!r}") for k in keys})


def parse_dram(d: Any) -> Dram:
    """A :class:`Dram` from ``{read_pj_per_byte, write_pj_per_byte, line_latency_s}`` ``{value, source}``
    constants, each positive."""
    if not isinstance(d, dict) or set(d) != {f.name for f in dataclasses.fields(Dram)}:
        raise ConfigError("dram: expected exactly read_pj_per_byte, write_pj_per_byte, line_latency_s, got "
                          f"{sorted(d) if isinstance(d, dict) else d!r}")
    return Dram(**{k: _const(d, k, "dram") for k in d})


@dataclasses.dataclass
class LLCCost:
    """One training step's last-level cache and DRAM cost with one cache technology (see the module docstring)."""

    technology: str
    capacity_bytes: float
    area_mm2: float
    resident_level: str
    llc_read_bytes: float
    llc_write_bytes: float
    dram_read_bytes: float
    dram_write_bytes: float
    llc_dynamic_j: float
    llc_leakage_j: float
    dram_j: float
    llc_time_s: float  # hits and writes at the LLC, and the LLC lookups of misses
    dram_time_s: float
    time_s: float  # memory latency of the step (LLC + DRAM)
    llc_energy_j: float
    energy_j: float  # LLC + DRAM
    edp_js: float  # energy_j x time_s
    llc_edp_js: float  # llc_energy_j x time_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def llc_cost(table: CostTable, cache: CacheTech, model: nn.Module | None = None, *,
             upper: tuple[tuple[str, float], ...] = (), dram: Dram = DRAM, other_time_s: float = 0.0) -> LLCCost:
    """Price one step of ``table`` on the hierarchy ``upper`` (name, capacity bytes; fastest first) + ``cache`` +
    DRAM (``model``: the traced model with its recipe applied, as for :func:`edgetrain.hardware.energy.traffic`)."""
    if not math.isfinite(other_time_s) or other_time_s < 0:
        raise ConfigError(f"other_time_s must be >= 0 seconds, got {other_time_s!r}")
    names = [n for n, _ in upper]
    if {"llc", "dram"} & set(names) or len(set(names)) != len(names):
        raise ConfigError(f"upper levels need distinct names other than 'llc' and 'dram', got {names}")
    for n, cap in upper:
        if not cap > 0 or cap >= cache.capacity.value:
            raise ConfigError(f"upper level {n!r} capacity must be > 0 and below the LLC's "
                              f"{cache.capacity.value:g} bytes, got {cap!r}")
    levels = (*(Level(n, Const(float(c), "upper level"), None, None, None) for n, c in upper),
              Level("llc", cache.capacity, None, None, None), Level("dram", None, None, None, None))
    rows, home, _ = traffic(table, levels, model)
    tot = {(k, lv): sum(getattr(t, k)[p][lv] for t in rows for p in PASSES)
           for k in ("reads", "writes") for lv in ("llc", "dram")}
    line = cache.line_bytes.value
    hits, writes = tot["reads", "llc"] / line, tot["writes", "llc"] / line
    misses = (tot["reads", "dram"] + tot["writes", "dram"]) / line
    dyn = hits * cache.read_energy_j.value + writes * cache.write_energy_j.value + misses * cache.miss_energy_j.value
    t_llc = hits * cache.read_latency_s.value + writes * cache.write_latency_s.value + misses * cache.miss_latency_s.value
    t_dram = misses * dram.line_latency_s.value
    time_s = t_llc + t_dram
    leak = cache.leakage_w.value * (time_s + other_time_s)
    e_dram = (tot["reads", "dram"] * dram.read_pj_per_byte.value + tot["writes", "dram"] * dram.write_pj_per_byte.value) * 1e-12
    e_llc = dyn + leak
    return LLCCost(cache.technology, cache.capacity.value, cache.area_mm2.value, home, tot["reads", "llc"],
                   tot["writes", "llc"], tot["reads", "dram"], tot["writes", "dram"], dyn, leak, e_dram, t_llc, t_dram,
                   time_s, e_llc, e_llc + e_dram, (e_llc + e_dram) * time_s, e_llc * time_s)


def compare(table: CostTable, sram_capacity: float | str, model: nn.Module | None = None, *,
            upper: tuple[tuple[str, float], ...] = (), dram: Dram = DRAM,
            technologies: tuple[str, ...] = TECHNOLOGIES) -> list[dict[str, Any]]:
    """Each technology at the SRAM cache's capacity (iso-capacity) and at its area (iso-area), with the ratios
    SRAM / technology of EDP, LLC EDP and area. SRAM's row is the baseline of both comparisons."""
    for t in technologies:
        _check_tech(t)
    base = llc_cost(table, llc("sram", sram_capacity), model, upper=upper, dram=dram)
    out = []
    for tech in technologies:
        for mode in ("iso-capacity", "iso-area"):
            if tech == "sram" and mode == "iso-area":
                continue
            cap = iso_area_capacity(tech, sram_capacity) if mode == "iso-area" and tech != "sram" else sram_capacity
            c = base if tech == "sram" else llc_cost(table, llc(tech, cap), model, upper=upper, dram=dram)
            out.append({"mode": "baseline" if tech == "sram" else mode, **c.to_dict(),
                        "edp_ratio": base.edp_js / c.edp_js, "llc_edp_ratio": base.llc_edp_js / c.llc_edp_js,
                        "area_ratio": base.area_mm2 / c.area_mm2,
                        "capacity_ratio": c.capacity_bytes / base.capacity_bytes})
    return out
