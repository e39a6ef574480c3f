"""``edgetrain measure``: one real training step of a workload under a recipe, measured."""

from __future__ import annotations

import argparse
import json

import torch

from edgetrain.cli._common import add_optimizer_args, add_workload_args, recipe, workload
from edgetrain.execution import FusedStep
from edgetrain.run import finite


def add_parser(sub) -> None:
    p = sub.add_parser("measure", help="measure one training step (saved, peak, state bytes, step time)",
                       description="Run real training steps of a model under a recipe and report the fields of "
                       "the measurement contract: saved_bytes, peak_bytes, param_bytes, grad_bytes, "
                       "optimizer_bytes, step_seconds.")
    add_workload_args(p)
    add_optimizer_args(p, what="of the measured steps")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the measured steps")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up (median reported)")
    p.add_argument("--json", action="store_true", help="print the contract fields as JSON")


def run(args: argparse.Namespace) -> int:
    from edgetrain.apply import apply_
    from edgetrain.measure import format_measurement, measure
    from edgetrain.train import TrainConfig, build_optimizer

    torch.set_num_threads(args.threads)
    wl, rec = workload(args), recipe(args)
    data = wl.load_data("train")
    model = wl.build_model(data.num_classes)
    batch = wl.example_batch(data)
    apply_(model, rec, batch[0])
    opt = build_optimizer(model, TrainConfig(steps=1, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum))
    ex = rec.execution  # the recipe's micro-batches and fused step run as in `edgetrain train`
    fused = FusedStep(opt) if ex.fused_step else None
    try:
        m = measure(model, batch, optimizer=fused or opt, warmup=1, repeats=args.repeats, micro=ex.micro_batches,
                    bn=ex.bn)
    finally:
        if fused is not None:
            fused.remove()
    if args.json:
        print(json.dumps(finite({"recipe": rec.name, **m.to_dict()}), indent=2, allow_nan=False))
    else:
        print(f"{wl.model} on {data.name}, batch {'x'.join(map(str, batch[0].shape))}, recipe {rec.name!r}")
        print(format_measurement(m))
    return 0
