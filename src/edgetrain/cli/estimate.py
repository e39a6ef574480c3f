"""``edgetrain estimate``: the analytic cost model's per-layer table for a model and recipe (no training)."""

from __future__ import annotations

import argparse
import json

import torch

from edgetrain.cli._common import recipe


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="predict a training step's memory per layer (no training)",
                       description="Predict weight, gradient, optimizer-state, saved-activation and workspace bytes "
                       "and MACs per layer from traced forward passes (shapes only; no backward, no data).")
    p.add_argument("--model", default="mobilenet_v2", help="model name (default mobilenet_v2)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--image-size", type=int, default=64, help="input size (default 64)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--optimizer", choices=["sgd", "sgd_momentum", "adamw"], default="sgd_momentum",
                   help="optimizer state: none, momentum (default) or Adam's two moments")
    p.add_argument("--recipe", default=None, help="recipe file (.yaml/.json); default: plain training")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from edgetrain.cost import estimate, format_table
    from edgetrain.models import create_model

    torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.channels,
                         image_size=args.image_size)
    table = estimate(model, recipe(args), (args.channels, args.image_size, args.image_size), args.batch_size,
                     args.optimizer)
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print(f"{args.model}, input {args.channels}x{args.image_size}x{args.image_size}, recipe "
              f"{recipe(args).name!r} (estimate, not a measurement; `edgetrain measure` measures)")
        print(format_table(table))
    return 0
