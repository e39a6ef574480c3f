"""Arguments shared by the verbs that build a workload (train, measure, plan: model and data; estimate, inspect:
the model and its input shape only)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator

from edgetrain import smoke
from edgetrain.errors import ConfigError
from edgetrain.models import list_models
from edgetrain.models.foreign import parse_args
from edgetrain.recipe import Recipe
from edgetrain.workload import Workload


def add_model_args(g, *, pretrained: bool = True) -> None:  # noqa: ANN001  (a parser or an argument group)
    """``--model``, ``--model-arg``, ``--weights`` (``--pretrained`` with ``pretrained``), ``--image-size``,
    ``--channels``."""
    g.add_argument("--model", default="mobilenet_v2",
                   help=f"a built-in model ({', '.join(list_models())}; default mobilenet_v2), timm:<name> or your "
                   "own package.module:factory (importable: on PYTHONPATH or installed)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the model factory or timm.create_model, repeatable; values are read "
                   "as YAML scalars (0.5, true, relu)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="load a state dict (.safetensors, .pt, .pth) strictly into the model as built")
    if pretrained:
        g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                       help="start from ImageNet weights (mobilenet_v2 only; default: on for mobilenet_v2 without "
                       "--weights)")
    g.add_argument("--image-size", type=int, default=64, help="model input size (default 64)")
    g.add_argument("--channels", type=int, default=3, help="model input channels (default 3)")


def add_workload_args(p: argparse.ArgumentParser, *, recipe: bool = True, eval_data: bool = True) -> None:
    """The workload options; ``recipe=False`` / ``eval_data=False`` for a verb that uses no recipe / no test split
    (an option a verb would ignore is not offered)."""
    g = p.add_argument_group("workload")
    add_model_args(g)
    g.add_argument("--data", default=None,
                   help="dataset name (fashion-mnist, digits), IDX/ImageFolder directory, .npz file, .csv/.parquet "
                   "table, WAV folder or .npy windows (default: Fashion-MNIST if installed, else digits)")
    g.add_argument("--label-column", default=None, metavar="NAME",
                   help="a .csv/.parquet table's label column (default: label)")
    g.add_argument("--sample-rate", type=int, default=None, metavar="HZ",
                   help="a WAV folder's clips are resampled to HZ (default 16000)")
    g.add_argument("--seconds", type=float, default=None,
                   help="a WAV folder's clips are cut or zero-padded to this many seconds (default 1.0)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    g.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of N training images")
    if eval_data:
        g.add_argument("--eval-subset", type=int, default=None, help="use a fixed random subset of N test images")
    g.add_argument("--seed", type=int, default=0, help="seed for model init, data order and subsets")
    if recipe:
        p.add_argument("--recipe", default=None, help="recipe file (.yaml/.json); default: plain training")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def workload(args: argparse.Namespace) -> Workload:
    """The workload of the parsed arguments; options a verb does not have take their defaults (no
    ``--pretrained``: off). Smoke mode (:mod:`edgetrain.smoke`) shrinks image size and batch."""
    wl = Workload(model=args.model, model_args=parse_args(args.model_arg), weights=args.weights,
                  pretrained=getattr(args, "pretrained", False), data=getattr(args, "data", None),
                  image_size=args.image_size, channels=args.channels, batch_size=getattr(args, "batch_size", 32),
                  train_subset=getattr(args, "train_subset", None), eval_subset=getattr(args, "eval_subset", None),
                  seed=getattr(args, "seed", 0), data_args=data_args(args))
    if wl.pretrained and wl.channels != 3:
        raise ConfigError(f"--channels {wl.channels}: the pretrained {wl.model} takes 3-channel images (gray data "
                          "are replicated to 3 channels by default); drop --channels, or add --no-pretrained")
    return smoke.workload(wl)


def data_args(args: argparse.Namespace) -> dict:
    """The ``Workload.data_args`` given by ``--label-column``, ``--sample-rate`` and ``--seconds``."""
    given = {"label": getattr(args, "label_column", None), "sample_rate": getattr(args, "sample_rate", None),
             "seconds": getattr(args, "seconds", None)}
    return {k: v for k, v in given.items() if v is not None}


def recipe(args: argparse.Namespace) -> Recipe:
    if not args.recipe:
        return Recipe(name="plain")
    try:
        return Recipe.load(args.recipe)
    except UnicodeDecodeError:  # Recipe.load reads text: a binary file is not a recipe
        raise ConfigError(f"{args.recipe}: not a recipe file (not UTF-8 text)") from None


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """edgetrain's warnings (:class:`edgetrain.data.DataWarning`) as ``edgetrain: warning: <message>`` lines on
    stderr, each time they occur; other warnings as Python shows them."""
    from edgetrain.data import DataWarning

    show = warnings.showwarning

    def line(message, category, filename, lineno, file=None, text=None):  # noqa: ANN001, PLR0913
        if issubclass(category, DataWarning):
            print(f"edgetrain: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, text)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = line
        yield


#: the optimizer names every verb takes (train, measure, plan, estimate): SGD (with ``--momentum``) or AdamW
OPTIMIZERS = ("sgd", "adamw")


def add_optimizer_args(g, *, what: str) -> None:  # noqa: ANN001  (a parser or an argument group)
    """``--optimizer`` and ``--momentum``, the same names and defaults in every verb (as ``edgetrain train``)."""
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help=f"optimizer {what} (default sgd; with --momentum, default 0.9; adamw keeps two moments)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9; 0: no momentum state)")


def cost_optimizer(args: argparse.Namespace) -> str:
    """The cost model's name of the optimizer ``args`` describe: ``sgd``, ``sgd_momentum`` or ``adamw``."""
    if args.optimizer == "adamw":
        return "adamw"
    return "sgd_momentum" if args.momentum else "sgd"

