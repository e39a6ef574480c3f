"""``edgetrain plan``: choose what to train so that a training step fits a memory budget."""

from __future__ import annotations

import argparse
import json

import torch

from edgetrain import smoke
from edgetrain.cli._common import add_optimizer_args, add_workload_args, cost_optimizer, workload


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="pick a sparse-update scheme that fits a memory budget",
                       description="Measure (once, cached) how much each layer's bias and weight updates help on "
                       "the training data, then choose the scheme with the largest gain, and how to run it (frozen part "
                       "as inference, fused optimizer step, micro-batches), whose predicted peak RAM of the training "
                       "step fits --budget. -o writes a recipe for `edgetrain train --recipe`.")
    add_workload_args(p, recipe=False, eval_data=False)  # the analysis scores on held-out training data
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)  # refused with a reason, see run()
    p.add_argument("--budget", default=None,
                   help="memory budget with a unit: B, KB, KiB, MB, MiB, GB, GiB (default: the device's)")
    p.add_argument("--device", default=None, help="device profile: mcu, raspberry_pi_4, jetson_nano, phone "
                   "(sets the default budget and batch size)")
    p.add_argument("--plan-batch-size", type=int, default=None,
                   help="batch size the budget must hold (default: the device's, else --batch-size)")
    add_optimizer_args(p, what="whose state the budget counts, as `edgetrain train` takes it")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="train the chosen weights in fp32 (default) or as int8 with QAS (whole weights only)")
    p.add_argument("--frozen", choices=["fp32", "int8"], default="fp32",
                   help="store the frozen weights in fp32 (default, exact) or int8 per channel (Int8Frozen: a "
                   "quarter of the bytes, lossy with a stated bound)")
    p.add_argument("--analysis-steps", type=int, default=100, help="steps of each analysis run (default 100)")
    p.add_argument("--analysis-lr", type=float, default=0.01, help="learning rate of the analysis runs")
    p.add_argument("--weight-last", type=int, default=12,
                   help="analyse weight updates of the non-depthwise convs among the last N (default 12)")
    p.add_argument("-o", "--output", default=None, help="write the plan as a recipe (.json or .yaml)")
    p.add_argument("--json", action="store_true", help="print the plan and its per-layer estimate as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgetrain.devices import format_size, get_device, parse_size
    from edgetrain.errors import ConfigError
    from edgetrain.plan import analyze, format_plan, plan
    from edgetrain.train import finite

    if args.recipe is not None:
        raise ConfigError("plan takes no --recipe: it plans a sparse-update recipe from scratch and writes it with -o; "
                          "to combine the plan with other techniques, add them to the written recipe (and check its "
                          "memory with `edgetrain estimate --recipe`)")
    torch.set_num_threads(args.threads)
    device = get_device(args.device) if args.device else None
    if args.budget is None and device is None:
        raise ConfigError("plan: give --budget (e.g. 256KB) or --device")
    budget = parse_size(args.budget) if args.budget is not None else device.train_budget
    wl = workload(args)
    batch = args.plan_batch_size or (device.batch_size if device else wl.batch_size)
    small = {"ks": [0, 1], "weight_last": min(args.weight_last, 2)} if smoke.active() else {}
    contribution = analyze(wl, steps=smoke.cap(args.analysis_steps, smoke.ANALYSIS_STEPS), lr=args.analysis_lr,
                           **{"weight_last": args.weight_last, **small}, threads=args.threads,
                           progress=not args.no_progress)
    data = wl.load_data("train")
    model = wl.build_model(data.num_classes)
    p = plan(model, contribution, budget, wl.input_shape(), batch, cost_optimizer(args),
             precision=args.precision, flash=device.flash_bytes if device else None, frozen=args.frozen)
    if args.output:
        try:
            p.recipe.save(args.output)
        except OSError as e:
            raise ConfigError(f"-o {args.output}: cannot write the plan ({e.strerror or e})") from None
    if args.json:
        print(json.dumps(finite({"recipe": p.recipe.to_dict(), "budget": budget, "predicted_bytes": p.predicted_bytes,
                                 "gain": p.gain, "estimate": p.predicted.to_dict(),
                                 "contribution": contribution.to_dict()}), indent=2, allow_nan=False))
        return 0
    dev = f" on {device.description}" if device else ""
    flash = " (frozen weights in flash where they fit)" if device and device.flash_bytes else ""
    print(f"plan for {wl.model}{dev}: budget {format_size(budget)} ({budget} B) for the training step's peak "
          f"RAM{flash}, batch {batch}")
    print(format_plan(p, model))
    frozen = p.peak.split.get("weights_frozen", 0) if p.peak is not None else 0
    if device and device.flash_bytes and frozen > device.flash_bytes:
        print(f"note: the frozen weights ({format_size(frozen)} in {args.frozen}) "
              f"exceed the device's {format_size(device.flash_bytes)} flash: TTE deploys int8 models "
              "(MobileNetV2-w0.35, MCUNet) there")
    if args.output:
        print(f"wrote {args.output}: run it with `edgetrain train --recipe {args.output}`")
    return 0
