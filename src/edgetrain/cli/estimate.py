"""``edgetrain estimate``: the analytic cost model's per-layer table for a model and recipe (no training)."""

from __future__ import annotations

import argparse
import json

import torch

from edgetrain.cli._common import add_model_args, add_optimizer_args, cost_optimizer, recipe, workload
from edgetrain.run import finite


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="predict a training step's memory per layer (no training)",
                       description="Predict weight, gradient, optimizer-state, saved-activation and workspace bytes "
                       "and MACs per layer from traced forward passes (shapes only; no backward, no data).")
    add_model_args(p.add_argument_group("model"), pretrained=False)
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    add_optimizer_args(p, what="whose state is counted")
    p.add_argument("--recipe", default=None, help="recipe file (.yaml/.json); default: plain training")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from edgetrain.cost import estimate, format_table

    torch.set_num_threads(args.threads)
    wl, rec = workload(args), recipe(args)
    model = wl.build_model(args.num_classes)
    table = estimate(model, rec, batch_size=wl.batch_size, optimizer=cost_optimizer(args),
                     example=wl.example_input(zeros=True))
    if args.json:
        print(json.dumps(finite(table.to_dict()), indent=2, allow_nan=False))
    else:
        print(f"{wl.model}, input {wl.channels}x{wl.image_size}x{wl.image_size}, recipe {rec.name!r} (estimate, "
              "not a measurement; `edgetrain measure` measures)")
        print(format_table(table))
    return 0
