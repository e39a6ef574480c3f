"""``edgetrain`` command line: one module per verb, each a thin layer over a public function."""

from __future__ import annotations

import argparse
import os
import sys

from edgetrain import __version__
from edgetrain.cli import bench, estimate, export, federated, inspect, ls, measure, plan, train
from edgetrain.errors import EdgetrainError

VERBS = {"train": train, "measure": measure, "estimate": estimate, "plan": plan, "bench": bench, "inspect": inspect,
         "ls": ls, "export": export, "federated": federated}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Train and fine-tune neural networks within a memory budget; measure what a training step "
        "really stores.",
    )
    parser.add_argument("--version", action="version", version=f"edgetrain {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}")
    for name, module in VERBS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb].run(args) or 0
    except EdgetrainError as e:
        print(f"edgetrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: quiet, as the Python docs advise ("Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
