"""Federated fine-tuning (FedAvg, FedAvgM) of budgeted clients against centralised fine-tuning, on Flower.

For each strategy: one ``edgetrain federated`` run of the config (50 clients, Dirichlet split of Fashion-MNIST,
four device profiles, each client under the planner's recipe for its budget). Then the centralised baseline: the
largest profile's recipe trained on the whole training split for as many steps as one round's sampled clients take
in all (rounds x clients per round x local steps), same lr and batch, scored on the same test samples at every
round's worth of steps. Writes ``<out>/<stem>.json`` (provenance, every round, per-profile bytes and peaks) and
``.md``; the runs themselves go to ``runs/<stem>/``.

    python benchmarks/federated/federated.py --name federated-2026-12-02 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.devices import format_size
from edgetrain.federated import FederatedConfig, run
from edgetrain.recipe import Recipe
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, train


def profile_rows(config: FederatedConfig, rounds: list[dict]) -> list[dict]:
    """Per profile: clients, rounds trained, bytes sent per client-round, measured peak against the budget."""
    out = []
    for p in dict.fromkeys(config.profiles):
        rows = [c for r in rounds for c in r["clients"] if config.profile_of(c["client"]) == p]
        if not rows:
            continue
        sent = [c["bytes-sent"] for c in rows]
        out.append({"profile": p.name, "budget": p.budget, "batch_size": p.batch_size, "client_rounds": len(rows),
                    "bytes_sent_mean": sum(sent) / len(sent), "bytes_sent_max": max(sent),
                    "peak_max": max(c["peak"] for c in rows), "predicted_peak": rows[0]["predicted-peak"],
                    "within_budget": sum(c["peak"] <= c["budget"] for c in rows)})
    return out


def centralised(config: FederatedConfig, recipe: dict, batch_size: int, threads: int, schedule: str) -> dict:
    """Accuracy after every round's worth of steps, and the mean training loss over each such stretch."""
    wl = config.workload
    data, test = wl.load_data("train"), wl.load_data("test")
    per_round = max(2, round(config.fraction * config.clients)) * config.local_steps
    model = wl.build_model(data.num_classes)
    cfg = TrainConfig(steps=per_round * config.rounds, batch_size=batch_size, optimizer="sgd", lr=config.lr,
                      momentum=0.9, schedule=schedule, eval_every=per_round, seed=config.seed, threads=threads)
    result = train(model, data, test, cfg, recipe=Recipe.from_dict(recipe), progress=False)
    losses = [h["loss"] for h in result.history]
    return {"schedule": schedule, "steps": cfg.steps,
            "accuracy_per_round": [h["eval_accuracy"] for h in result.history if "eval_accuracy" in h]
            + [result.accuracy],
            "loss_per_round": [sum(losses[i:i + per_round]) / len(losses[i:i + per_round])
                               for i in range(0, len(losses), per_round)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_name("fashion.yaml")))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default="fedavg,fedavgm")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="read the federated runs already in runs/<stem>/ instead of running them again")
    a = ap.parse_args(argv)
    stem = f"fashion-{a.name}"
    paths = result_paths(a.out, stem, force=a.force)
    prov = provenance(a.threads)
    base = FederatedConfig.load(a.config)
    runs, config = {}, base.smoke()
    for strategy in a.strategies.split(","):
        where = Path("runs") / stem / strategy
        if a.reuse_runs:
            summary = json.loads((where / "summary.json").read_text())
            summary["reused_from"] = str(where)
        else:
            summary = run(dataclasses.replace(base, strategy=strategy), where, force=True, threads=a.threads,
                          progress=False)
        rounds = [json.loads(x) for x in (Path("runs") / stem / strategy / "rounds.jsonl").read_text().splitlines()]
        runs[strategy] = {"summary": summary, "rounds": rounds, "profiles": profile_rows(config, rounds[1:])}
    plans = json.loads((Path("runs") / stem / a.strategies.split(",")[0] / "plans.json").read_text())
    largest = max(dict.fromkeys(config.profiles), key=lambda p: p.budget)
    torch.set_num_threads(a.threads)
    central = {s: centralised(config, plans[largest.name]["recipe"], largest.batch_size, a.threads, s)
               for s in ("constant", "cosine")}  # constant: the clients' schedule; cosine: the planner docs'
    result = {"provenance": prov, "config": config.to_dict(), "smoke": smoke.active(), "runs": runs,
              "centralised": {"profile": largest.name, **central}, "plans": plans}
    lines = [f"# Federated fine-tuning: {config.clients} clients, {config.rounds} rounds, Dirichlet alpha "
             f"{config.alpha} ({prov.get('commit', '?')}, {prov.get('date', '?')})", "",
             f"Centralised: the {largest.name} profile's plan on the whole training split, one round's worth of steps "
             "(clients per round x local steps) per row, same lr and batch; its mean training loss over those steps "
             "in brackets.", "",
             "| round | " + " | ".join(runs) + " | centralised, constant lr | centralised, cosine lr |",
             "|---|" + "---|" * (len(runs) + 2)]
    for i in range(config.rounds + 1):
        accs = [f"{100 * r['rounds'][i]['accuracy']:.2f}%" if i < len(r["rounds"]) else "-" for r in runs.values()]
        cs = [f"{100 * c['accuracy_per_round'][i - 1]:.2f}% ({c['loss_per_round'][i - 1]:.3f})"
              if 0 < i <= min(len(c["accuracy_per_round"]), len(c["loss_per_round"])) else "-" for c in central.values()]
        lines.append(f"| {i} | " + " | ".join(accs + cs) + " |")
    for strategy, r in runs.items():
        s = r["summary"]
        reused = f" (run reused from {s['reused_from']})" if "reused_from" in s else ""
        lines += ["", f"## {strategy}{reused}: wall {s['wall_seconds']:.0f} s, peak memory of the run {s['peak_rss']} (PSS "
                  "of the driver and Flower's workers)", "",
                  "| profile | budget | batch | client-rounds | sent per client-round (mean / max) | x whole model | "
                  "measured peak (max) | predicted | within budget |", "|---|---|---|---|---|---|---|---|---|"]
        for p in r["profiles"]:
            lines.append(f"| {p['profile']} | {format_size(p['budget'])} | {p['batch_size']} | {p['client_rounds']} | "
                         f"{format_size(p['bytes_sent_mean'])} / {format_size(p['bytes_sent_max'])} | "
                         f"{p['bytes_sent_mean'] / s['bytes_whole_model']:.4f} | {format_size(p['peak_max'])} | "
                         f"{format_size(p['predicted_peak'])} | {p['within_budget']}/{p['client_rounds']} |")
    write_report(paths[0], result, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "federated")
