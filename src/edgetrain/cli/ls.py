"""``edgetrain ls``: the registered techniques, what each reduces, what it acts on and where it refuses."""

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
                           "exact": i.exact, "cost_model": i.traceable, "conflicts": sorted(i.conflicts),
                           "acts_on": i.looks_for, "limits": i.limits, "summary": i.summary,
                           "paper": i.paper} for i in infos], indent=2))
        return 0
    w = max(len(i.name) for i in infos)
    print(f"{'technique':<{w}}  {'config':<16} {'reduces':<40} {'estimate':<8} summary")
    for i in infos:
        est = "yes" if i.traceable else "no"
        print(f"{i.name:<{w}}  {i.config.__name__:<16} {', '.join(sorted(i.reduces)):<40} {est:<8} {i.summary}")
        print(f"{'':<{w}}  {'':<16} acts on {i.looks_for}; {i.limits}" if i.limits else
              f"{'':<{w}}  {'':<16} acts on {i.looks_for}")
    return 0
