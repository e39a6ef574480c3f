"""``edgetrain ls``: the registered techniques and what each reduces."""

from __future__ import annotations

import argparse
import json

from edgetrain.registry import list_techniques


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list registered techniques", description="List registered techniques.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    infos = list_techniques()
    if args.json:
        print(json.dumps([{"name": i.name, "config": i.config.__name__, "reduces": sorted(i.reduces),
                           "exact": i.exact, "cost_model": i.estimate is not None,
                           "conflicts": sorted(i.conflicts), "summary": i.summary,
                           "paper": i.paper} for i in infos], indent=2))
        return 0
    w = max(len(i.name) for i in infos)
    print(f"{'technique':<{w}}  {'config':<16} {'reduces':<40} {'estimate':<8} summary")
    for i in infos:
        est = "yes" if i.estimate is not None else "no"
        print(f"{i.name:<{w}}  {i.config.__name__:<16} {', '.join(sorted(i.reduces)):<40} {est:<8} {i.summary}")
    return 0
