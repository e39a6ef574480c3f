"""``edgetrain federated``: federated fine-tuning of one model across many budgeted devices, on Flower."""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("federated", help="federated fine-tuning across budgeted devices (Flower simulation)",
                       description="Plan each client profile's budget, split the training data across --clients "
                       "simulated devices (Dirichlet, non-IID) and run Flower's simulation runtime: every sampled "
                       "client trains its plan for a few steps and sends only the slices it changed; the server "
                       "averages them (FedAvg or FedAvgM) and scores the global model each round. Writes "
                       "rounds.jsonl, summary.json, federated.log and model.safetensors to --out. Needs the "
                       "federated extra: pip install 'edgetrain[federated]'.")
    p.add_argument("--config", required=True, help="a federated config (.yaml): workload, clients, rounds, profiles")
    p.add_argument("--out", required=True, help="the run directory (refused when it holds files, unless --force)")
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    p.add_argument("--clients", type=int, default=None, help="override the config's number of clients")
    p.add_argument("--rounds", type=int, default=None, help="override the config's number of rounds")
    p.add_argument("--strategy", choices=["fedavg", "fedavgm"], default=None, help="override the config's strategy")
    p.add_argument("--threads", type=int, default=2, help="Flower workers (one client per core at a time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for the planner's analysis")


def run(args: argparse.Namespace) -> int:
    from edgetrain.federated import FederatedConfig, require_flower, run as federate

    require_flower()
    config = FederatedConfig.load(args.config)
    overrides = {k: getattr(args, k) for k in ("clients", "rounds", "strategy") if getattr(args, k) is not None}
    config = dataclasses.replace(config, **overrides)
    summary = federate(config, args.out, force=args.force, threads=args.threads, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
