"""``edgetrain inspect``: what edgetrain thinks a model is (layers, blocks, classifier, activations) and, with a
recipe, which modules each technique would act on."""

from __future__ import annotations

import argparse
import json

import torch

from edgetrain.cli._common import add_model_args, workload


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the structure edgetrain derives from a model (and a recipe's targets)",
                       description="Trace one forward of a random input of the model's input shape and print what "
                       "edgetrain derives from the ops it calls: layers with their op kind, blocks, classifier, "
                       "activations, parameters it cannot see into. With --recipe, also the modules each "
                       "technique would act on (or the error it would raise). No data are loaded.")
    add_model_args(p.add_argument_group("model"), pretrained=False)
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for model init and the example input")
    p.add_argument("--recipe", default=None, help="recipe file (.yaml/.json): list each technique's targets")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from edgetrain.inspect import format_targets, inspect_model
    from edgetrain.recipe import Recipe
    from edgetrain.structure import format_structure

    torch.set_num_threads(args.threads)
    wl = workload(args)
    rec = Recipe.load(args.recipe) if args.recipe else None
    structure, targets = inspect_model(wl.build_model(args.num_classes), wl.example_input(), rec)
    if args.json:
        extra = {"recipe": rec.name, "targets": targets} if rec else {}
        print(json.dumps({**structure.to_dict(), **extra}, indent=2))
        return 0
    print(f"{wl.model}, input {wl.channels}x{wl.image_size}x{wl.image_size}")
    print(format_structure(structure))
    if rec:
        print()
        print(format_targets(rec.name, targets))
    return 0
