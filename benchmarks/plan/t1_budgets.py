"""T1 plans at several memory budgets: predicted vs measured peak, and accuracy after the T1 schedule.

1. Contribution analysis on T1's training subset (100-step runs, scored on a held-out fifth; cached).
2. ``edgetrain.plan`` at each budget: the training step's peak RAM at batch 32 (each plan also chooses its
   execution: frozen part as inference, fused optimizer step, micro-batches), plus the MCU plan: 256 KiB at
   batch 1 with the MCU profile's flash for frozen weights (TTE trains at batch 1 on the device).
3. Every plan, plain full fine-tuning and classifier-only are trained with the T1 schedule of
   ``benchmarks/t1.yaml`` (600 SGD steps, momentum 0.9, cosine, lr 0.01), each plan with its execution, and
   measured by the meter (the measured peak is set against the plan's predicted peak).

    python benchmarks/plan/t1_budgets.py --threads 2 --out benchmarks/results --name plan-<date>

Existing results of the same name are refused (``--force`` overwrites them). ``EDGETRAIN_SMOKE=1``: a tiny
workload and a two-point analysis grid (a check that the script runs; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from edgetrain import smoke
from edgetrain.bench import BenchSpec, markdown_table, result_paths, run_bench, write_results
from edgetrain.devices import format_size, get_device, parse_size
from edgetrain.errors import BudgetError, EdgetrainError
from edgetrain.measure import measure
from edgetrain.plan import analyze, plan
from edgetrain.recipe import Recipe
from edgetrain.techniques.sparse_update import SparseUpdate

BUDGETS = ["12MB", "16MB", "32MB", "64MB"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="benchmarks/t1.yaml", help="workload and schedule (default T1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--analysis-steps", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="overwrite existing results of this name")
    args = p.parse_args()
    try:
        run(args)
    except EdgetrainError as e:  # one line and exit status 2, as the command line
        print(f"edgetrain: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    base = BenchSpec.load(args.config)
    wl = base.workload
    stem = f"{base.work.lower()}-{args.name}"
    result_paths(Path(args.out), stem, force=args.force)  # fail now, not after an hour, if the results exist
    small = {"ks": [0, 1], "weight_last": 2} if smoke.active() else {}  # EDGETRAIN_SMOKE=1: a command check
    contribution = analyze(wl, steps=smoke.cap(args.analysis_steps, smoke.ANALYSIS_STEPS),
                           lr=base.train.get("lr", 0.01), threads=args.threads, **small)
    print(json.dumps(contribution.to_dict(), indent=1), file=sys.stderr)
    num_classes = wl.load_data("train").num_classes
    probe = wl.build_model(num_classes)
    shape = (wl.channels, wl.image_size, wl.image_size)
    recipes = [Recipe(name="plain"), Recipe([SparseUpdate(bias_last_k=0)], name="classifier-only")]
    budgets, infeasible = {}, {}
    for text in BUDGETS:
        try:
            pl = plan(probe, contribution, parse_size(text), shape, wl.batch_size, name=f"plan-{text}")
            recipes.append(pl.recipe)
            budgets[pl.recipe.name] = (parse_size(text), pl.peak.bytes, wl.batch_size, pl.gain)
        except BudgetError as e:
            infeasible[text] = str(e)
    claims = {}
    try:
        mcu = plan(probe, contribution, parse_size("256KiB"), shape, 1, name="plan-mcu-256KiB-b1",
                   flash=get_device("mcu").flash_bytes)
        recipes.append(mcu.recipe)
        budgets[mcu.recipe.name] = (parse_size("256KiB"), mcu.peak.bytes, 1, mcu.gain)
        claims[mcu.recipe.name] = ("TTE (NeurIPS 2022): training within 256 KB SRAM; peak 2939 KB -> 141 KB (21x) on "
                                   "MobileNetV2 with sparse update, int8 and operator reordering")
    except BudgetError as e:  # a result like the others, not the end of the run
        infeasible["256KiB-b1"] = str(e)
    spec = BenchSpec(work=base.work, name=args.name, workload=wl, train=base.train, recipes=recipes,
                     paper_claims=claims, measure_repeats=3)
    result = run_bench(spec, threads=args.threads)
    # the MCU plan's memory at the batch it was planned for
    x, y = wl.example_batch(wl.load_data("train"))
    for row in result["rows"]:
        if row["name"] in budgets:
            budget, predicted, batch, gain = budgets[row["name"]]
            row.update(budget_bytes=budget, predicted_peak_bytes=predicted, plan_batch=batch, predicted_gain=gain)
            if batch != wl.batch_size:
                model = wl.build_model(num_classes)
                m = measure(model, (x[:batch], y[:batch]), recipe=Recipe.from_dict(row["recipe"]), repeats=3)
                row["peak_bytes_at_plan_batch"] = m.peak_bytes
    result["provenance"].update(infeasible=infeasible, contribution=contribution.to_dict())
    write_results(result, args.out, stem, force=args.force)
    print(markdown_table(result))
    for row in result["rows"]:
        if "budget_bytes" in row:
            got = row.get("peak_bytes_at_plan_batch", row["peak_bytes"])
            print(f"{row['name']}: budget {format_size(row['budget_bytes'])}, predicted peak "
                  f"{format_size(row['predicted_peak_bytes'])}, measured peak {format_size(got)} "
                  f"({got / row['predicted_peak_bytes']:.3f}x) at batch {row['plan_batch']}")
    for text, msg in infeasible.items():
        print(f"{text}{'' if '-b' in text else f' at batch {wl.batch_size}'}: {msg}")


if __name__ == "__main__":
    main()
