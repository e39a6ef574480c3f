"""Arguments shared by the verbs that build a workload (train, measure)."""

from __future__ import annotations

import argparse

from edgetrain.recipe import Recipe
from edgetrain.workload import Workload


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--model", default="mobilenet_v2", help="model name (see edgetrain.models.list_models())")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights (default: on for mobilenet_v2, off otherwise)")
    g.add_argument("--data", default=None,
                   help="dataset name (fashion-mnist, digits), IDX/ImageFolder directory or .npz file "
                   "(default: Fashion-MNIST if installed, else digits)")
    g.add_argument("--image-size", type=int, default=64, help="model input size (default 64)")
    g.add_argument("--channels", type=int, default=3, help="model input channels (default 3)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    g.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of N training images")
    g.add_argument("--eval-subset", type=int, default=None, help="use a fixed random subset of N test images")
    g.add_argument("--seed", type=int, default=0, help="seed for model init, data order and subsets")
    p.add_argument("--recipe", default=None, help="recipe file (.yaml/.json); default: plain training")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def workload(args: argparse.Namespace) -> Workload:
    pretrained = args.pretrained if args.pretrained is not None else args.model == "mobilenet_v2"
    return Workload(model=args.model, pretrained=pretrained, data=args.data, image_size=args.image_size,
                    channels=args.channels, batch_size=args.batch_size, train_subset=args.train_subset,
                    eval_subset=args.eval_subset, seed=args.seed)


def recipe(args: argparse.Namespace) -> Recipe:
    return Recipe.load(args.recipe) if args.recipe else Recipe(name="plain")
