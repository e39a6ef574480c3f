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
    p.add_argument("--energy", action="store_true",
                   help="also model the step's energy (J) and time on a device profile, split by memory level and by "
                   "layer (docs/hardware.md)")
    p.add_argument("--profile", default="horowitz45", metavar="NAME|FILE",
                   help="device profile for --energy: horowitz45 (default), mcu, raspberry_pi_4, host (this machine, "
                   "time only) or a profile .yaml")
    p.add_argument("--top", type=int, default=10, help="layers listed by --energy (default 10)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from edgetrain.apply import apply_
    from edgetrain.cost import estimate, format_table
    from edgetrain.hardware.energy import format_cost, step_cost
    from edgetrain.hardware.profiles import get_profile

    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile) if args.energy else None  # a bad profile is refused before any tracing
    wl, rec = workload(args), recipe(args)
    model = wl.build_model(args.num_classes)
    example = wl.example_input(zeros=True)
    table = estimate(model, rec, batch_size=wl.batch_size, optimizer=cost_optimizer(args), example=example)
    cost = None
    if profile is not None:
        with apply_(model, rec, example):  # which weights train and the op kinds, as the step would see them
            cost = step_cost(table, profile, model)
    if args.json:
        out = table.to_dict()
        if cost is not None:
            out["step_cost"] = cost.to_dict()
            out["step_cost"]["constants"] = [{"key": k, "value": v, "source": s} for k, v, s in profile.constants()]
        print(json.dumps(finite(out), indent=2, allow_nan=False))
    elif cost is not None:
        print(f"{wl.model}, input {'x'.join(map(str, wl.input_shape()))}, recipe {rec.name!r} on {profile.name} "
              f"({profile.description})")
        print(format_cost(cost, top=args.top))
    else:
        print(f"{wl.model}, input {wl.channels}x{wl.image_size}x{wl.image_size}, recipe {rec.name!r} (estimate, "
              "not a measurement; `edgetrain measure` measures)")
        print(format_table(table))
    return 0
