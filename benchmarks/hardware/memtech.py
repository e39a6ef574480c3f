"""SRAM vs STT-MRAM vs SOT-MRAM last-level cache, priced with the traffic of one training step (DeepNVM++-style).

Inci, Isgenc, Marculescu, "DeepNVM++", IEEE TCAD 2022, arXiv 2012.04559; the model, its constants and their sources
are in :mod:`edgetrain.hardware.memtech`. For each model and recipe (batch ``--batch``): the step's cost table
(:func:`edgetrain.cost.estimate`), its bytes per level on a hierarchy of a ``--l1`` L1, the last-level cache and
DRAM, and for each SRAM capacity in ``--capacities`` the LLC of each technology at that capacity (iso-capacity) and
at that SRAM cache's area (iso-area): LLC and DRAM energy, the step's memory latency, EDP and area, and the ratios
SRAM / MRAM beside DeepNVM++'s. A model, not a measurement: nothing here runs on a cache. Writes
``<out>/memtech-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/hardware/memtech.py --out benchmarks/results --name 2026-12-07
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.cost import estimate
from edgetrain.devices import KiB, parse_size
from edgetrain.errors import ConfigError
from edgetrain.hardware.memtech import DRAM, LINE, PAPER, TECHNOLOGIES, compare, llc, parse_dram
from edgetrain.models import create_model
from edgetrain.report import run_main, write_report

MODELS = {  # name: (create_model kwargs, input shape)
    "small_cnn": ({"in_channels": 1}, (1, 28, 28)),
    "mobilenet_v2": ({}, (3, 64, 64)),
    "resnet18": ({}, (3, 64, 64)),
}
RECIPES = {"plain": [], "last-block": [et.Freeze(last_k_blocks=1)], "actnn-2bit": [et.ActNN(bits=2)]}
L1_SOURCE = "Arm Cortex-A72 (Raspberry Pi 4): 32 KiB L1 data cache per core (Cortex-A72 TRM); its energy not priced"


def _geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--capacities", default="256KiB,1MiB,2MiB", help="SRAM LLC capacities (comma-separated)")
    ap.add_argument("--l1", default="32KiB", help="the level above the LLC (0 or none: no level)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dram-line-ns", type=float, default=None,
                    help="DRAM time per 64-byte line instead of the 30 ns closed-page latency, e.g. 5 (64 B at the "
                         "12.8 GB/s of LPDDR4-3200 x32: a bandwidth-bound, fully overlapped stream)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    caps = [parse_size(c) for c in a.capacities.split(",")]
    l1 = 0 if a.l1 in ("0", "none") else parse_size(a.l1)
    for c in caps:
        llc("sram", c)  # refuses a capacity outside the table before any work
    dram = DRAM
    if a.dram_line_ns is not None:
        dram = parse_dram({
            "read_pj_per_byte": {"value": DRAM.read_pj_per_byte.value, "source": DRAM.read_pj_per_byte.source},
            "write_pj_per_byte": {"value": DRAM.write_pj_per_byte.value, "source": DRAM.write_pj_per_byte.source},
            "line_latency_s": {"value": a.dram_line_ns * 1e-9, "source": "--dram-line-ns (5: 64 B / 12.8 GB/s, "
                               "LPDDR4-3200 x32 peak, as in the raspberry_pi_4 profile)"}})
    paths = result_paths(a.out, f"memtech-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    batch = smoke.cap(a.batch, smoke.BATCH)
    models = a.models.split(",")[:1] if smoke.active() else a.models.split(",")
    caps = caps[:1] if smoke.active() else caps
    upper = (("l1", float(l1)),) if l1 else ()
    rows = []
    for mname in models:
        kwargs, shape = MODELS[mname]
        torch.manual_seed(0)
        model = create_model(mname, num_classes=10, **kwargs)
        if smoke.active():
            shape = (shape[0], min(shape[1], 16), min(shape[2], 16))
        x = torch.zeros(2, *shape)
        for rname, techniques in RECIPES.items():
            recipe = et.Recipe(techniques, name=rname)
            table = estimate(model, recipe, batch_size=batch, example=x)
            with et.apply_(model, recipe, x):
                for cap in caps:
                    for r in compare(table, cap, model, upper=upper, dram=dram):
                        rows.append({"model": mname, "recipe": rname, "input": list(shape), "batch": batch,
                                     "sram_capacity": cap, **r})
            print(f"[memtech] {mname} {rname}: done", file=sys.stderr, flush=True)
    summary = {}
    for tech in TECHNOLOGIES[1:]:
        for mode in ("iso-capacity", "iso-area"):
            sel = [r for r in rows if r["technology"] == tech and r["mode"] == mode]
            summary[f"{tech} {mode}"] = {
                k: {"max": max(r[k] for r in sel), "min": min(r[k] for r in sel), "geomean": _geo([r[k] for r in sel])}
                for k in ("edp_ratio", "llc_edp_ratio", "area_ratio", "capacity_ratio")}
    prov.update(batch=batch, l1_bytes=l1, l1_source=L1_SOURCE, line_bytes=LINE.value, line_source=LINE.source,
                optimizer=f"{table.optimizer} (edgetrain.cost.estimate's default)",
                dram=[{"key": k, "value": getattr(dram, k).value, "source": getattr(dram, k).source}
                      for k in ("read_pj_per_byte", "write_pj_per_byte", "line_latency_s")],
                tables={t: [{"capacity": c, "constants": [{"key": k, "value": v, "source": s}
                                                          for k, v, s in llc(t, c).constants()]} for c in caps]
                        for t in TECHNOLOGIES})
    lines = [("Last-level cache technology per training step (a first-order model, not a measurement): batch "
             f"{batch}, L1 {l1 / KiB:g} KiB, 64-byte lines, DRAM {dram.read_pj_per_byte.value:g} pJ/B and "
             f"{dram.line_latency_s.value * 1e9:g} ns per line. Ratios are SRAM / technology (> 1: the technology "
             "is better)."), "",
             ("| model | recipe | SRAM LLC | technology | mode | capacity KiB | area mm^2 | step in | LLC uJ | "
             "DRAM uJ | latency ms | EDP nJs | EDP ratio | LLC-EDP ratio | area ratio |"),
             "|---|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['sram_capacity'] / KiB:g} KiB | {r['technology']} | "
                     f"{r['mode']} | {r['capacity_bytes'] / KiB:.0f} | {r['area_mm2']:.3f} | {r['resident_level']} | "
                     f"{1e6 * r['llc_energy_j']:.1f} | {1e6 * r['dram_j']:.1f} | {1e3 * r['time_s']:.3f} | "
                     f"{1e9 * r['edp_js']:.2f} | {r['edp_ratio']:.2f} | {r['llc_edp_ratio']:.2f} | "
                     f"{r['area_ratio']:.2f} |")
    lines += ["", ("SRAM / technology over every row above (min-max, geometric mean) beside DeepNVM++'s \"up to\" "
              "(abstract; GPU traces, 16 nm cells):"), "",
              ("| technology | mode | EDP ratio | LLC-EDP ratio | area ratio | capacity ratio | DeepNVM++ EDP | "
              "DeepNVM++ area / capacity |"), "|---|---|---|---|---|---|---:|---:|"]
    for key, s in summary.items():
        tech, mode = key.split()
        p = PAPER[tech]
        fmt = " | ".join(f"{s[k]['min']:.2f}-{s[k]['max']:.2f} ({s[k]['geomean']:.2f})"
                         for k in ("edp_ratio", "llc_edp_ratio", "area_ratio", "capacity_ratio"))
        pe = p["iso_capacity_edp"] if mode == "iso-capacity" else p["iso_area_edp"]
        pa = f"area {p['area']}x" if mode == "iso-capacity" else f"capacity {p['iso_area_capacity']}x"
        lines.append(f"| {tech} | {mode} | {fmt} | {pe}x | {pa} |")
    write_report(paths[0], {"provenance": prov, "paper": PAPER, "summary": summary, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "memtech")
