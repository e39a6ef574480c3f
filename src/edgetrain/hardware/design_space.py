"""QUIDAM-style design-space sweep: area, energy and latency of one training step on a weight-stationary systolic
accelerator, per processing-element (PE) type, array size and global-buffer size.

Inci, Virupaksha, Jain, Thallam, Ding, Marculescu, "QUIDAM: A Framework for Quantization-Aware DNN Accelerator and
Model Co-Exploration", ACM TECS 2023, arXiv 2206.15463 (earlier QADAM, arXiv 2205.13045, and QAPPA, arXiv
2205.08648). Their design space: bit precision, PE type (FP32, INT16 and the shift-based LightPEs for power-of-two
quantized weights), PE scratchpad and global-buffer sizes, number of PEs; their power/performance/area models come
from synthesized RTL. What we could read of the paper is its abstract: performance per area and per energy vary by
more than 5x and 35x across its design points, and LightPEs reach up to 5.7x the best INT16 design. Their per-PE
numbers were not retrieved, so this module does not reuse them: every constant below comes from public per-operation
figures (Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm; Aladdin, Shao et
al., ISCA 2014, 40 nm) or is our assumption, and says which.

The model (docs/design_space.md has the equations):

* Each conv/linear layer of a training step is three GEMMs per group (forward ``Y = X W``, input gradient
  ``dX = dY W^T``, weight gradient ``dW = X^T dY``), with sizes from the cost model (:func:`edgetrain.cost.estimate`:
  per-sample forward and backward MACs, shapes) and the layer's geometry. A GEMM ``(m, k, n)`` keeps its ``k x n``
  operand stationary in an ``R x C`` array and streams ``m`` rows through it; a tile takes ``m + R + C`` cycles (fill
  and drain). Groups too small for the array (depthwise convs) are packed block-diagonally.
* Energy = MACs x PE energy per MAC + buffer bytes x SRAM energy per byte + DRAM bytes x DRAM energy per byte.
  Latency per GEMM = max(compute cycles / clock, DRAM bytes / bandwidth). Area = PEs x PE area + buffer area.
* Not counted (our simplifications): BatchNorm, activations, pooling and the optimizer step (no MACs in the cost
  model), leakage, control, interconnect, the PE's pipeline registers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from edgetrain.errors import ConfigError

__all__ = ["PE_TYPES", "PRECISIONS", "Accelerator", "Gemm", "PEType", "evaluate", "gemm_cost", "pareto", "pe_type",
           "spread", "sweep", "workload"]

# ------------------------------------------------------------------------------------------------ constants
#: Horowitz, ISSCC 2014, 45 nm, 0.9 V: (energy pJ, area um^2) per operation. Energies of int32 add/mult and fp32
#: add/mult checked against a readable copy (Front. Neurol. table citing Horowitz, PMC8934428 table 3); int8 add,
#: int16 add, int8 mult, fp16 add checked against a public energy table citing Horowitz/Dally (code corpus); fp16 mult
#: 1.1 pJ as given in our brief (not independently seen). The AREAS are the same talk's table as we recall it; no
#: readable copy was found with our search tools: medium confidence.
HOROWITZ_45NM = {"int8_add": (0.03, 36.0), "int16_add": (0.05, 67.0), "int32_add": (0.1, 137.0),
                 "fp16_add": (0.4, 1360.0), "fp32_add": (0.9, 4184.0), "int8_mult": (0.2, 282.0),
                 "int32_mult": (3.1, 3495.0), "fp16_mult": (1.1, 1640.0), "fp32_mult": (3.7, 7700.0)}
#: Aladdin 40 nm 32-bit units (Shao et al., ISCA 2014, as tabulated in public code, e.g. ashleyswang/pm-tech-lib):
#: shifter 0.417 pJ, 249.6 um^2; adder 0.21 pJ, 278.0 um^2. Only their RATIO is used (a shifter costs 1.99x an
#: adder's energy and 0.90x its area), carried to 45 nm and 16 bits: our assumption.
SHIFT_PER_ADD_ENERGY = 0.417 / 0.21
SHIFT_PER_ADD_AREA = 249.6 / 278.0
SRAM_8KB_PJ_PER_BYTE = 10.0 / 8  # Horowitz: 64-bit read of an 8 KB SRAM, 10 pJ (PMC8934428 uses half for 32 bits)
SRAM_REF_BYTES = 8 * 1024
#: larger SRAMs: energy per byte grows as sqrt(size) (our fit: it gives Horowitz's 32 KB 20 pJ / 64 bits exactly
#: and 14.1 pJ/B against his 12.5 for 1 MB, both recalled, not checked)
DRAM_PJ_PER_BYTE = 640.0 / 4  # Horowitz: 32-bit DRAM read ~640 pJ (checked in a public summary of the talk)
SRAM_UM2_PER_BIT = 600 * 0.045**2  # rule of thumb ~600 lambda^2 per SRAM bit, lambda = 45 nm (Greaves, Cambridge SoC
#                                    course, "45nm SRAM memory area"): 1.215 um^2 per bit, array overhead included
CLOCK_HZ = 1e9  # our assumption: every PE type at 1 GHz (45 nm); QUIDAM's clocks were not retrieved
DRAM_BYTES_PER_S = 3200e6 * 4  # one LPDDR4-3200 x32 channel: 3200 MT/s x 4 bytes = 12.8 GB/s (our choice)


def _power_law(lo: tuple[float, float], hi: tuple[float, float], x: float) -> float:
    """``y(x)`` on the power law through ``lo = (x0, y0)`` and ``hi = (x1, y1)`` (interpolation between two sourced
    points; using it for widths between or beside them is our assumption)."""
    (x0, y0), (x1, y1) = lo, hi
    return y0 * (x / x0) ** (math.log(y1 / y0) / math.log(x1 / x0))


def int_mult(bits: int) -> tuple[float, float]:
    """(pJ, um^2) of a ``bits x bits`` integer multiplier, on the power law through Horowitz's 8- and 32-bit ones."""
    (e8, a8), (e32, a32) = HOROWITZ_45NM["int8_mult"], HOROWITZ_45NM["int32_mult"]
    return _power_law((8, e8), (32, e32), bits), _power_law((8, a8), (32, a32), bits)


def fp_mult(significand_bits: int) -> tuple[float, float]:
    """(pJ, um^2) of a float multiplier by its significand width, on the power law through Horowitz's fp16 (11 bits)
    and fp32 (24 bits) multipliers."""
    (e16, a16), (e32, a32) = HOROWITZ_45NM["fp16_mult"], HOROWITZ_45NM["fp32_mult"]
    return (_power_law((11, e16), (24, e32), significand_bits), _power_law((11, a16), (24, a32), significand_bits))


# ------------------------------------------------------------------------------------------------ PE types
#: operand precisions a PE can have ("pot": power-of-two weights, 4-bit sign + exponent codes, as in LightPE-1)
PRECISIONS = ("fp32", "bf16", "int16", "int8", "int4", "pot")


@dataclasses.dataclass(frozen=True)
class PEType:
    """One processing element: a multiplier (or shifters) and an accumulating adder, with its operand widths.

    ``weight_bits`` is the stationary operand's width (weights; in the weight-gradient GEMM, the output gradient),
    ``act_bits`` the streamed one's (activations and their gradients), ``acc_bits`` the partial sums'."""

    name: str
    precision: str
    mult_pj: float
    mult_um2: float
    add_pj: float
    add_um2: float
    weight_bits: float
    act_bits: float
    acc_bits: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"PE type {self.name!r}: unknown precision {self.precision!r}; known: "
                              f"{', '.join(PRECISIONS)}")
        for f in ("mult_pj", "mult_um2", "add_pj", "add_um2", "weight_bits", "act_bits", "acc_bits"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"PE type {self.name!r}: {f} must be a positive number, got {v!r}")

    @property
    def mac_pj(self) -> float:
        return self.mult_pj + self.add_pj

    @property
    def um2(self) -> float:
        return self.mult_um2 + self.add_um2


def _pe_types() -> dict[str, PEType]:
    add32, add16, fpadd32 = HOROWITZ_45NM["int32_add"], HOROWITZ_45NM["int16_add"], HOROWITZ_45NM["fp32_add"]
    shift = (SHIFT_PER_ADD_ENERGY * add16[0], SHIFT_PER_ADD_AREA * add16[1])  # 16-bit shifter (8-bit act << 0..7)
    types = [
        PEType("fp32", "fp32", *HOROWITZ_45NM["fp32_mult"], *fpadd32, 32, 32, 32, "Horowitz fp32 mult + fp32 add"),
        PEType("bf16", "bf16", *fp_mult(8), *fpadd32, 16, 16, 32,
               "fp mult scaled to bf16's 8-bit significand (ours) + fp32 accumulate"),
        PEType("int16", "int16", *int_mult(16), *add32, 16, 16, 32, "int mult scaled to 16 bits (ours) + int32 add"),
        PEType("int8", "int8", *HOROWITZ_45NM["int8_mult"], *add32, 8, 8, 32, "Horowitz int8 mult + int32 add"),
        PEType("int4", "int4", *int_mult(4), *add32, 4, 4, 32, "int mult scaled to 4 bits (ours) + int32 add"),
        PEType("pot-1", "pot", *shift, *add32, 4, 8, 32,
               "LightPE-1-like: one shifter (Aladdin ratio, ours) + int32 add"),
        PEType("pot-2", "pot", 2 * shift[0] + add16[0], 2 * shift[1] + add16[1], *add32, 8, 8, 32,
               "LightPE-2-like: two shifters + int16 add (ours) + int32 add"),
    ]
    return {t.name: t for t in types}


PE_TYPES = _pe_types()


def pe_type(pe: str | PEType) -> PEType:
    """A :class:`PEType` by name (one of :data:`PE_TYPES`), or ``pe`` itself."""
    if isinstance(pe, PEType):
        return pe
    if pe not in PE_TYPES:
        raise ConfigError(f"unknown PE type {pe!r}; known: {', '.join(PE_TYPES)}")
    return PE_TYPES[pe]


# ------------------------------------------------------------------------------------------------ accelerator
@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A weight-stationary ``rows x cols`` array of one PE type with a global buffer, a clock and a DRAM link."""

    pe: PEType
    rows: int
    cols: int
    buffer_bytes: int
    clock_hz: float = CLOCK_HZ
    dram_bytes_per_s: float = DRAM_BYTES_PER_S
    dram_pj_per_byte: float = DRAM_PJ_PER_BYTE

    def __post_init__(self) -> None:
        object.__setattr__(self, "pe", pe_type(self.pe))
        for f in ("rows", "cols", "buffer_bytes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"accelerator: {f} must be a positive int, got {v!r}")
        for f in ("clock_hz", "dram_bytes_per_s", "dram_pj_per_byte"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"accelerator: {f} must be a positive number, got {v!r}")

    @property
    def sram_pj_per_byte(self) -> float:
        return SRAM_8KB_PJ_PER_BYTE * math.sqrt(self.buffer_bytes / SRAM_REF_BYTES)

    @property
    def area_mm2(self) -> float:
        return (self.rows * self.cols * self.pe.um2 + self.buffer_bytes * 8 * SRAM_UM2_PER_BIT) * 1e-6

    @property
    def name(self) -> str:
        return f"{self.pe.name} {self.rows}x{self.cols} {self.buffer_bytes // 1024}KiB"


# ------------------------------------------------------------------------------------------------ GEMM cost
@dataclasses.dataclass(frozen=True)
class Gemm:
    """``groups`` independent products ``A (m x k) @ B (k x n) = C (m x n)``.

    ``a_elems``, ``b_elems`` and ``c_elems`` are the elements of A, B and C as they sit in DRAM (a conv's input
    feature map, not its ``m x k`` im2col matrix, which is formed on chip); by default ``m k``, ``k n`` and ``m n``
    per group. ``out`` is the width C is written at (``"act"``: the streamed width; ``"acc"``: the partial sums',
    for weight gradients)."""

    name: str
    m: int
    k: int
    n: int
    groups: int = 1
    out: str = "act"
    a_elems: int | None = None
    b_elems: int | None = None
    c_elems: int | None = None

    def __post_init__(self) -> None:
        for f in ("m", "k", "n", "groups"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"GEMM {self.name!r}: {f} must be a positive int, got {v!r}")
        if self.out not in ("act", "acc"):
            raise ConfigError(f"GEMM {self.name!r}: out must be 'act' or 'acc', got {self.out!r}")

    @property
    def macs(self) -> int:
        return self.groups * self.m * self.k * self.n

    def dram_elems(self) -> tuple[int, int, int]:
        g = self.groups
        return (self.a_elems if self.a_elems is not None else g * self.m * self.k,
                self.b_elems if self.b_elems is not None else g * self.k * self.n,
                self.c_elems if self.c_elems is not None else g * self.m * self.n)


def tiles(k: int, n: int, groups: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(tiles, row blocks, column blocks) of ``groups`` stationary ``k x n`` operands on a ``rows x cols`` array;
    groups that fit the array several times are packed block-diagonally."""
    if k <= rows and n <= cols:
        return math.ceil(groups / min(rows // k, cols // n)), 1, 1
    kb, nb = math.ceil(k / rows), math.ceil(n / cols)
    return groups * kb * nb, kb, nb


def _orientation(g: Gemm, acc: Accelerator, stationary: str) -> dict[str, float]:
    """Cycles and buffer bytes with ``B`` (``"B"``: k x n, the weights in the forward) or ``A^T`` (``"A"``: k x m)
    held in the array and the other operand streamed through it."""
    pe = acc.pe
    a, b = g.groups * g.m * g.k * pe.act_bits / 8, g.groups * g.k * g.n * pe.weight_bits / 8
    stream_rows, cols_dim = (g.m, g.n) if stationary == "B" else (g.n, g.m)
    t, kb, nb = tiles(g.k, cols_dim, g.groups, acc.rows, acc.cols)
    held, streamed = (b, a) if stationary == "B" else (a, b)
    psums = g.groups * g.m * g.n * pe.acc_bits / 8 * (2 * kb - 1)  # written per row block, read back but the first
    return {"cycles": t * (stream_rows + acc.rows + acc.cols), "sram_bytes": held + streamed * nb + psums}


def gemm_cost(g: Gemm, acc: Accelerator) -> dict[str, Any]:
    """Cycles, bytes moved, energy (J) and time (s) of one GEMM on ``acc`` (equations in docs/design_space.md): the
    mapping holds whichever operand gives the lower energy x delay in the array."""
    pe = acc.pe
    ea, eb, ec = g.dram_elems()
    a, b, out = ea * pe.act_bits / 8, eb * pe.weight_bits / 8, ec * (pe.acc_bits if g.out == "acc" else pe.act_bits) / 8
    half = acc.buffer_bytes / 2  # one operand's block in half the buffer, the other half for the streams
    psums = ec * pe.acc_bits / 8
    dram = out + min(b + a * math.ceil(b / half), a + b * math.ceil(a / half), (a + b) * math.ceil(psums / half))
    best = None
    for stationary in ("B", "A"):
        o = _orientation(g, acc, stationary)
        o["sram_bytes"] += dram  # every DRAM byte is also written into (or read out of) the buffer once
        parts = {"compute_j": g.macs * pe.mac_pj * 1e-12, "sram_j": o["sram_bytes"] * acc.sram_pj_per_byte * 1e-12,
                 "dram_j": dram * acc.dram_pj_per_byte * 1e-12}
        energy = sum(parts.values())
        seconds = max(o["cycles"] / acc.clock_hz, dram / acc.dram_bytes_per_s)
        if best is None or energy * seconds < best["energy_j"] * best["seconds"]:
            best = {"macs": g.macs, **o, "dram_bytes": dram, **parts, "energy_j": energy, "seconds": seconds,
                    "stationary": stationary, "memory_bound": dram / acc.dram_bytes_per_s > o["cycles"] / acc.clock_hz}
    return best


# ------------------------------------------------------------------------------------------------ workload
def _geometry(module: nn.Module) -> tuple[int, int, int] | None:
    """(k, n, groups) of a conv or linear layer's GEMM, or None for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        return module.in_channels // g * math.prod(module.kernel_size), module.out_channels // g, g
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 1
    return None


def workload(model: nn.Module, example: Any, batch_size: int) -> tuple[list[Gemm], dict[str, int]]:
    """The GEMMs of one training step of ``model`` at ``batch_size`` (no recipe), from the cost model's per-layer
    forward and backward MACs and the layers' geometry; also ``{"macs": ..., "unmapped_macs": ...}`` (MACs of modules
    that are not convs or linears, left out)."""
    from edgetrain.cost import estimate

    table = estimate(model, None, batch_size=batch_size, example=example)
    modules = dict(model.named_modules())
    gemms, unmapped, total = [], 0, 0
    for name, row in table.layers.items():
        if not row.macs:
            continue
        total += (row.macs + row.backward_macs) * batch_size
        geo = _geometry(modules.get(name))
        if geo is None:
            unmapped += (row.macs + row.backward_macs) * batch_size
            continue
        k, n, g = geo
        m, rest = divmod(row.macs, g * k * n)
        if rest:
            raise ConfigError(f"workload: {name}: {row.macs} MACs per sample are not a multiple of its GEMM "
                              f"{g} x {k} x {n}")
        m *= batch_size
        x, y, w = (math.prod(row.in_shape) * batch_size, math.prod(row.out_shape) * batch_size, g * k * n)
        products = round(row.backward_macs / row.macs)
        gemms.append(Gemm(f"{name}:fwd", m, k, n, g, a_elems=x, b_elems=w, c_elems=y))
        if products == 2 or (products == 1 and not row.trainable_bytes):
            gemms.append(Gemm(f"{name}:dX", m, n, k, g, a_elems=y, b_elems=w, c_elems=x))
        if products == 2 or (products == 1 and row.trainable_bytes):
            gemms.append(Gemm(f"{name}:dW", k, m, n, g, out="acc", a_elems=x, b_elems=y, c_elems=w))
    return gemms, {"macs": total, "unmapped_macs": unmapped}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(gemms: list[Gemm], acc: Accelerator) -> dict[str, Any]:
    """One design point: area, energy and latency of the whole step, and the figures of merit."""
    if not gemms:
        raise ConfigError("design space: the workload has no conv or linear layer to map")
    costs = [gemm_cost(g, acc) for g in gemms]
    tot = {k: sum(c[k] for c in costs) for k in ("macs", "cycles", "sram_bytes", "dram_bytes", "compute_j", "sram_j",
                                                 "dram_j", "energy_j", "seconds")}
    area = acc.area_mm2
    return {"design": acc.name, "pe": acc.pe.name, "precision": acc.pe.precision, "rows": acc.rows,
            "cols": acc.cols, "buffer_kib": acc.buffer_bytes // 1024, "area_mm2": area, **tot,
            "utilization": tot["macs"] / (acc.rows * acc.cols * tot["cycles"]),
            "memory_bound_share": sum(c["seconds"] for c in costs if c["memory_bound"]) / tot["seconds"],
            "steps_per_s": 1 / tot["seconds"], "perf_per_area": 1 / tot["seconds"] / area,
            "steps_per_j": 1 / tot["energy_j"], "perf_per_energy": 1 / (tot["seconds"] * tot["energy_j"]),
            "steps_per_j_onchip": 1 / (tot["compute_j"] + tot["sram_j"])}


def sweep(gemms: list[Gemm], pes: list[str], sizes: list[int], buffers_kib: list[int]) -> list[dict[str, Any]]:
    """Every (PE type, square array size, buffer size) design point on the workload."""
    return [evaluate(gemms, Accelerator(pe_type(p), s, s, b * 1024)) for p in pes for s in sizes for b in buffers_kib]


def pareto(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both ``x`` and ``y`` (higher is better), by ascending ``x``."""
    front = [r for r in rows if not any(o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y])
                                        for o in rows)]
    return sorted(front, key=lambda r: r[x])


def spread(rows: list[dict[str, Any]], key: str) -> float:
    """max / min of ``key`` over the rows."""
    values = [r[key] for r in rows]
    return max(values) / min(values)
