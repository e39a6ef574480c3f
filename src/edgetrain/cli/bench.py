"""``edgetrain bench``: run a list of recipes on the same model and data; table, JSON/CSV and Pareto plot."""

from __future__ import annotations

import argparse

from edgetrain.bench import BenchSpec, markdown_table, result_paths, run_bench, write_results


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare recipes on the same model and data",
                       description="Run each recipe of a bench config (YAML: work, name, workload, train, recipes) "
                       "on a fresh copy of the same model: measure one training step, train with the stated "
                       "schedule, evaluate. Prints a markdown table; writes <out>/<work>-<name>.{json,csv,md,png}. "
                       "Runs one recipe at a time with --threads torch threads.")
    p.add_argument("--config", required=True, help="bench config file (see benchmarks/*.yaml)")
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument("--name", default=None, help="override the config's name (the results file stem)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps of every recipe")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--force", action="store_true", help="overwrite existing result files of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    spec = BenchSpec.load(args.config)
    if args.name:
        spec.name = args.name
    if args.steps is not None:
        spec.train = {k: v for k, v in spec.train.items() if k != "epochs"} | {"steps": args.steps}
    stem = f"{spec.work.lower()}-{spec.name}"
    result_paths(args.out, stem, force=args.force)  # fail before hours of work, not after
    result = run_bench(spec, threads=args.threads, progress=not args.no_progress)
    paths = write_results(result, args.out, stem, force=args.force)
    print(markdown_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0
