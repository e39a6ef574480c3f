"""The time model against measured step times on this machine, and each row's modelled energy per device profile.

For each built-in model and recipe: the median wall time of ``--steps`` training steps (forward, cross-entropy,
backward, SGD with momentum 0.9; after 3 warm-up steps; batch ``--batch``, seeded noise input) beside the step time
:func:`edgetrain.hardware.energy.step_cost` predicts on the ``host`` profile (rates measured by
:mod:`edgetrain.hardware.calibrate` in the same process, at the same thread count) and the ratio predicted /
measured. The same cost table is also priced on ``horowitz45`` (energy), ``raspberry_pi_4`` and ``mcu`` (time and
board energy): model outputs, validated only through the host's times. Writes ``<out>/host-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/hardware/step_time.py --out benchmarks/results --name steptime-2026-12-07 --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.cost import estimate
from edgetrain.hardware.energy import step_cost
from edgetrain.hardware.profiles import get_profile
from edgetrain.models import create_model
from edgetrain.report import run_main, write_report

MODELS = {  # name: (create_model kwargs, input shape)
    "small_cnn": ({"in_channels": 1}, (1, 28, 28)),
    "mobilenet_v2": ({}, (3, 64, 64)),
    "resnet18": ({}, (3, 64, 64)),
    "mcunet_tiny": ({}, (3, 64, 64)),
    "tiny_transformer": ({}, None),
}
RECIPES = {
    "plain": [],
    "classifier-only": [et.Freeze()],
    "last-block": [et.Freeze(last_k_blocks=1)],
    "bias-only": [et.BiasOnly()],
    "actnn-2bit": [et.ActNN(bits=2)],
}


def measure_step(model: torch.nn.Module, recipe: et.Recipe, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds of one training step with ``recipe`` applied (the model is restored afterwards)."""
    with et.apply_(model, recipe, x[:2]):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        times = []
        for i in range(steps + 3):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"host-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    batch, steps = smoke.cap(a.batch, smoke.BATCH), smoke.cap(a.steps, 1)
    host = get_profile("host")
    others = {n: get_profile(n) for n in ("horowitz45", "raspberry_pi_4", "mcu")}
    models = a.models.split(",")[:1] if smoke.active() else a.models.split(",")
    rows = []
    for mname in models:
        kwargs, shape = MODELS[mname]
        torch.manual_seed(0)
        model = create_model(mname, num_classes=10, **kwargs)
        if shape is None:
            shape = (model.in_channels, model.default_input_size, model.default_input_size)
        if smoke.active():
            shape = (shape[0], min(shape[1], 16), min(shape[2], 16))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
        for rname, techniques in RECIPES.items():
            recipe = et.Recipe(techniques, name=rname)
            table = estimate(model, recipe, batch_size=batch, example=x[:2])
            with et.apply_(model, recipe, x[:2]):
                pred = step_cost(table, host, model, energy=False, time=True)
                priced = {n: step_cost(table, p, model) for n, p in others.items()}
            measured = measure_step(model, recipe, x, y, steps)
            row = {"model": mname, "recipe": rname, "input": list(shape), "batch": batch,
                   "forward_macs": table.macs, "backward_macs": table.backward_macs,
                   "saved_bytes": table.saved_bytes, "measured_s": measured, "predicted_s": pred.time_s,
                   "ratio": pred.time_s / measured, "host_time_by_pass": pred.time_by_pass,
                   "bytes_by_level_host": pred.bytes_by_level}
            for n, c in priced.items():
                row[f"{n}_energy_j"], row[f"{n}_time_s"] = c.energy_j, c.time_s
                row[f"{n}_energy_by"] = c.energy_by
            rows.append(row)
            print(f"[step-time] {mname} {rname}: measured {1e3 * measured:.1f} ms, predicted "
                  f"{1e3 * pred.time_s:.1f} ms (x{row['ratio']:.2f}); horowitz45 {1e3 * row['horowitz45_energy_j']:.2f} mJ",
                  file=sys.stderr, flush=True)
    ratios = [r["ratio"] for r in rows]
    summary = {"geomean_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
               "min_ratio": min(ratios), "max_ratio": max(ratios)}
    prov.update(batch=batch, steps=steps, optimizer="SGD momentum 0.9",
                host_profile=[{"key": k, "value": v, "source": s} for k, v, s in host.constants()])
    lines = [f"Time model vs measured step time on this machine ({a.threads} thread(s), batch {batch}); energy is "
             "modelled, not measured.", "",
             "| model | recipe | measured ms | predicted ms | predicted/measured | horowitz45 mJ | of which DRAM | "
             "raspberry_pi_4 ms | raspberry_pi_4 mJ | mcu s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dram = r["horowitz45_energy_by"]["dram"] / r["horowitz45_energy_j"]
        lines.append(f"| {r['model']} | {r['recipe']} | {1e3 * r['measured_s']:.1f} | {1e3 * r['predicted_s']:.1f} | "
                     f"{r['ratio']:.2f} | {1e3 * r['horowitz45_energy_j']:.2f} | {100 * dram:.0f}% | "
                     f"{1e3 * r['raspberry_pi_4_time_s']:.1f} | {1e3 * r['raspberry_pi_4_energy_j']:.0f} | "
                     f"{r['mcu_time_s']:.2f} |")
    lines += ["", f"predicted/measured: geometric mean {summary['geomean_ratio']:.2f}, range "
              f"{summary['min_ratio']:.2f}-{summary['max_ratio']:.2f} over {len(rows)} rows."]
    write_report(paths[0], {"provenance": prov, "summary": summary, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "step-time")
