"""QUIDAM-style design-space sweep (issue 16): PE type x array size x global-buffer size, one training step each of
small_cnn (Fashion-MNIST shape, 1x28x28) and MobileNetV2 (3x64x64), from edgetrain's cost model; area, energy,
latency, performance per area and per energy of every design point, the Pareto front and the spreads beside QUIDAM's.

Inci et al., "QUIDAM: A Framework for Quantization-Aware DNN Accelerator and Model Co-Exploration", ACM TECS 2023,
arXiv 2206.15463: performance per area and per energy vary by more than 5x and 35x across its design points;
LightPEs give up to 5.7x over the best INT16 design. The model and its sourced constants:
:mod:`edgetrain.hardware.design_space` (docs/design_space.md). Arithmetic only: no training, no data.
Writes ``<out>/design-space-<name>.{json,md,png}``.

    OMP_NUM_THREADS=1 python benchmarks/hardware/design_space.py --out benchmarks/results --name 2026-12-07
"""

from __future__ import annotations

import argparse
import statistics

import torch

from edgetrain import smoke
from edgetrain.bench import place_labels, plain_log_ticks, provenance, result_paths
from edgetrain.errors import ConfigError
from edgetrain.hardware import design_space as ds
from edgetrain.models import create_model
from edgetrain.report import run_main, write_report

CLAIMS = {"perf_per_area": "> 5x across design points", "perf_per_energy": "> 35x across design points",
          "lightpe_vs_int16": "up to 5.7x perf per area and energy over the best INT16 design"}
MODELS = {"small_cnn": {"in_channels": 1, "image": 28}, "mobilenet_v2": {"in_channels": 3, "image": 64}}
METRICS = ("perf_per_area", "steps_per_j", "perf_per_energy", "steps_per_j_onchip")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{what}: comma-separated positive ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"--{what}: comma-separated positive ints, got {text!r}")
    return values


def spreads(rows: list[dict], front: list[dict], sizes: list[int], buffers: list[int]) -> dict:
    """max/min of each metric: over all points, over the PE types at each fixed (array, buffer), over each PE type's
    best point, on the front, and the best LightPE-like point against the best INT16 one."""
    out = {}
    for key in METRICS:
        fixed = [ds.spread([r for r in rows if r["rows"] == s and r["buffer_kib"] == b], key)
                 for s in sizes for b in buffers]
        best = [max(r[key] for r in rows if r["pe"] == p) for p in dict.fromkeys(r["pe"] for r in rows)]
        pot = [r[key] for r in rows if r["precision"] == "pot"]
        i16 = [r[key] for r in rows if r["pe"] == "int16"]
        out[key] = {"all": ds.spread(rows, key), "pe_only_median": statistics.median(fixed),
                    "pe_only_min": min(fixed), "pe_only_max": max(fixed), "best_per_pe": max(best) / min(best),
                    "front": ds.spread(front, key),
                    "best_pot_over_best_int16": max(pot) / max(i16) if pot and i16 else None}
    return out


def figure(results: dict):  # returns a matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(results), figsize=(7.2 * len(results), 6.0), squeeze=False)
    markers = {32: "o", 128: "s", 512: "^"}
    for ax, (model, res) in zip(axes[0], results.items()):
        rows, front = res["rows"], res["front"]
        for i, pe in enumerate(ds.PE_TYPES):
            for b in sorted({r["buffer_kib"] for r in rows}):
                pts = [r for r in rows if r["pe"] == pe and r["buffer_kib"] == b]
                if pts:
                    ax.scatter([r["perf_per_area"] for r in pts], [r["steps_per_j"] for r in pts],
                               s=[6 + r["rows"] for r in pts], c=f"C{i}", marker=markers.get(b, "D"), alpha=0.75)
        ax.step([r["perf_per_area"] for r in front], [r["steps_per_j"] for r in front], where="post", c="k", lw=0.8,
                alpha=0.6)
        ax.set(xscale="log", yscale="log", xlabel="performance per area (training steps/s per mm²)",
               ylabel="energy efficiency (training steps per J)",
               title=f"{model}, batch {res['batch_size']}: {len(rows)} design points")
        ax.grid(True, which="both", alpha=0.25)
        plain_log_ticks(ax.xaxis)
        plain_log_ticks(ax.yaxis)
    handles = [Line2D([], [], ls="", marker="o", c=f"C{i}", label=pe) for i, pe in enumerate(ds.PE_TYPES)]
    handles += [Line2D([], [], ls="", marker=m, c="0.4", label=f"{b} KiB buffer") for b, m in markers.items()]
    handles += [Line2D([], [], c="k", lw=0.8, label="Pareto front (labelled)"),
                Line2D([], [], ls="", marker="o", c="0.4", ms=3, label="marker size: array side 8..64")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    for ax, res in zip(axes[0], results.values()):
        front = res["front"]
        place_labels(ax, [(r["perf_per_area"], r["steps_per_j"]) for r in front],
                     [f"{r['pe']} {r['rows']}² {r['buffer_kib']}K" for r in front], fontsize=6)
    return fig


def table(rows: list[dict], front: list[dict]) -> list[str]:
    on = {r["design"] for r in front}
    head = ("| design | area mm² | energy mJ | latency ms | util | mem-bound | compute / SRAM / DRAM energy | "
            "steps/s/mm² | steps/J | steps/s/J | front |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        e = r["energy_j"]
        lines.append(f"| {r['design']} | {r['area_mm2']:.3f} | {1e3 * e:.3f} | {1e3 * r['seconds']:.3f} | "
                     f"{r['utilization']:.3f} | {r['memory_bound_share']:.2f} | {r['compute_j'] / e:.2f} / "
                     f"{r['sram_j'] / e:.2f} / {r['dram_j'] / e:.2f} | {r['perf_per_area']:.4g} | "
                     f"{r['steps_per_j']:.4g} | {r['perf_per_energy']:.4g} | {'yes' if r['design'] in on else ''} |")
    return lines


def spread_lines(model: str, s: dict) -> list[str]:
    head = (f"| {model} | all points | PE type only (fixed array and buffer): median [min, max] | "
            "best point per PE type | Pareto front | best pot / best int16 | QUIDAM |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    names = {"perf_per_area": "perf per area", "steps_per_j": "steps per J (perf/W)",
             "perf_per_energy": "perf per energy (1/(E·t))", "steps_per_j_onchip": "steps per J, on chip only"}
    for key, label in names.items():
        v = s[key]
        claim = CLAIMS.get(key, "")
        lines.append(f"| {label} | {v['all']:.1f}x | {v['pe_only_median']:.1f}x [{v['pe_only_min']:.1f}, "
                     f"{v['pe_only_max']:.1f}] | {v['best_per_pe']:.1f}x | {v['front']:.1f}x | "
                     f"{v['best_pot_over_best_int16']:.2f}x | "
                     f"{claim} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pes", default=",".join(ds.PE_TYPES), help="PE types (edgetrain.hardware.design_space)")
    ap.add_argument("--sizes", default="8,16,32,64", help="square array sides")
    ap.add_argument("--buffers-kib", default="32,128,512", help="global-buffer sizes, KiB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    models = a.models.split(",")
    for m in models:
        if m not in MODELS:
            raise ConfigError(f"--models: unknown model {m!r}; known: {', '.join(MODELS)}")
    pes = a.pes.split(",")
    for p in pes:
        ds.pe_type(p)
    sizes, buffers = _ints(a.sizes, "sizes"), _ints(a.buffers_kib, "buffers-kib")
    batch = smoke.cap(a.batch_size, smoke.BATCH)  # EDGETRAIN_SMOKE=1: a command check, not a result
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch}")
    paths = result_paths(a.out, f"design-space-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    results = {}
    for name in models:
        spec = MODELS[name]
        image = min(spec["image"], smoke.IMAGE_SIZE) if smoke.active() else spec["image"]
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=spec["in_channels"])
        gemms, info = ds.workload(model, torch.zeros(2, spec["in_channels"], image, image), batch)
        rows = ds.sweep(gemms, pes, sizes, buffers)
        front = ds.pareto(rows, "perf_per_area", "steps_per_j")
        results[name] = {"input": [spec["in_channels"], image, image], "batch_size": batch, **info,
                         "gemms": len(gemms), "rows": rows, "front": front,
                         "spreads": spreads(rows, front, sizes, buffers)}
        print(f"[design-space] {name}: {len(rows)} design points, {len(front)} on the front; spread all points: "
              + ", ".join(f"{k} {v['all']:.1f}x" for k, v in results[name]["spreads"].items()), flush=True)
    consts = {"horowitz_45nm": ds.HOROWITZ_45NM, "shift_per_add_energy": ds.SHIFT_PER_ADD_ENERGY,
              "shift_per_add_area": ds.SHIFT_PER_ADD_AREA, "sram_8kb_pj_per_byte": ds.SRAM_8KB_PJ_PER_BYTE,
              "dram_pj_per_byte": ds.DRAM_PJ_PER_BYTE, "sram_um2_per_bit": ds.SRAM_UM2_PER_BIT,
              "clock_hz": ds.CLOCK_HZ, "dram_bytes_per_s": ds.DRAM_BYTES_PER_S,
              "pe_types": {n: {"mac_pj": t.mac_pj, "um2": t.um2, "weight_bits": t.weight_bits, "act_bits": t.act_bits,
                               "acc_bits": t.acc_bits, "source": t.source} for n, t in ds.PE_TYPES.items()}}
    prov.update(finished=provenance(a.threads)["date"], work="issue 16 design space", paper_claims=CLAIMS,
                constants=consts, sweep={"pes": pes, "sizes": sizes, "buffers_kib": buffers})
    for res in results.values():
        res["front"] = [r["design"] for r in res["front"]]
    intro = (f"Commit {prov['commit']}, {prov['date']}; model: edgetrain.hardware.design_space "
             "(docs/design_space.md). Perf = training steps/s; steps/s/J = 1/(energy x latency).")
    lines = ["# Design-space sweep (QUIDAM-style): one training step per design point", "", intro, ""]
    for name, res in results.items():
        title = (f"## {name}: input {res['input']}, batch {res['batch_size']}, {res['macs']:,} MACs per step "
                 f"({res['unmapped_macs']:,} unmapped), {res['gemms']} GEMMs")
        front = [r for r in res["rows"] if r["design"] in res["front"]]
        lines += [title, "", *spread_lines(name, res["spreads"]), "", *table(res["rows"], front), ""]
    write_report(paths[0], {"provenance": prov, "results": results}, paths[2], lines)
    import matplotlib.pyplot as plt

    for res in results.values():
        res["front"] = [r for r in res["rows"] if r["design"] in res["front"]]
    fig = figure(results)
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    print(paths[3])
    return 0


if __name__ == "__main__":
    run_main(main, "design-space")
