"""fp32 vs int8 plans from a recorded T1 contribution analysis: predicted vs measured peak (no training).

    python benchmarks/plan/int8_plans.py benchmarks/results/t1-plan-<date>.json --out benchmarks/results/t1-int8-plans-<date>.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgetrain.bench import BenchSpec, provenance
from edgetrain.devices import format_size, parse_size
from edgetrain.errors import BudgetError
from edgetrain.measure import measure
from edgetrain.plan import Contribution, plan

CASES = [("12MB", 32), ("16MB", 32), ("32MB", 32), ("64MB", 32)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a t1_budgets.py results file (its provenance holds the analysis)")
    p.add_argument("--config", default="benchmarks/t1.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    contribution = Contribution.from_dict(json.loads(Path(args.results).read_text())["provenance"]["contribution"])
    wl = BenchSpec.load(args.config).workload
    data = wl.load_data("train")
    x, y = wl.example_batch(data)
    shape = (wl.channels, wl.image_size, wl.image_size)
    rows = []
    for budget, batch in CASES:
        for precision in ("fp32", "int8"):
            model = wl.build_model(data.num_classes)
            try:
                pl = plan(model, contribution, parse_size(budget), shape, batch, precision=precision)
            except BudgetError as e:
                rows.append({"budget": budget, "batch": batch, "precision": precision, "infeasible": str(e)})
                continue
            m = measure(model, (x[:batch], y[:batch]), recipe=pl.recipe, repeats=2)
            rows.append({"budget": budget, "batch": batch, "precision": precision, "recipe": pl.recipe.to_dict(),
                         "predicted_peak_bytes": pl.peak.bytes, "measured_peak_bytes": m.peak_bytes,
                         "predicted_train_bytes": pl.predicted.train_bytes, "saved_bytes": m.saved_bytes,
                         "predicted_gain": pl.gain})
            print(f"{budget:>7s} b{batch:<3d} {precision}: {pl.recipe.techniques[0].bias_last_k} biases, weights "
                  f"{pl.weights or '-'}; predicted peak {format_size(pl.peak.bytes)}, measured peak "
                  f"{format_size(m.peak_bytes)}, saved {format_size(m.saved_bytes)}, gain {100 * pl.gain:+.2f}")
    out = {"provenance": provenance(args.threads, {"source": args.results}), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
