"""The Flower side of :mod:`edgetrain.federated`: the ClientApp, the ServerApp, the strategies and the run.

Imported only when Flower is installed (``edgetrain[federated]``); :func:`edgetrain.federated.require_flower`
says in one line what to install otherwise. The ClientApp is a module-level object so that Flower's workers (and a
SuperNode on a real device) import it by name: ``edgetrain._flower:client_app``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedAvgM

from edgetrain.devices import format_size
from edgetrain.errors import ConfigError
from edgetrain.federated import FederatedConfig, average_updates, client_seed, dirichlet_split, encode_update

client_app = ClientApp()
_ENV: dict[str, Any] = {}  # per worker process: run dir -> (config, plans, train data, client indices)


def _env(run_dir: str) -> tuple[FederatedConfig, dict[str, Any], Any, list[torch.Tensor]]:
    if run_dir not in _ENV:
        config = FederatedConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
        plans = json.loads((Path(run_dir) / "plans.json").read_text())
        data = config.workload.load_data("train")
        parts = dirichlet_split(data.labels, config.clients, config.alpha, config.seed,
                                min_size=max(p.batch_size for p in config.profiles))
        _ENV[run_dir] = (config, plans, data, parts)
    return _ENV[run_dir]


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """One round on one device: plan's recipe, measured peak (first round only), local steps, the changed slices."""
    from edgetrain.measure import measure
    from edgetrain.recipe import Recipe
    from edgetrain.train import TrainConfig, train

    torch.set_num_threads(1)  # one Flower worker per core
    cfg = msg.content["config"]
    config, plans, data, parts = _env(str(cfg["run-dir"]))
    client, server_round = int(context.node_config["partition-id"]), int(cfg["server-round"])
    profile = config.profile_of(client)
    t0 = time.perf_counter()
    model = config.workload.build_model(data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    old = {k: v.clone() for k, v in model.state_dict().items()}
    local = dataclasses.replace(data, images=data.images[parts[client]], labels=data.labels[parts[client]],
                                name=f"{data.name}[client {client}]")
    recipe = Recipe.from_dict(plans[profile.name]["recipe"])
    if "peak" not in context.state:  # the meter's peak of this client's step, on its first batch
        model.train()
        batch = next(iter(local.batches(profile.batch_size, seed=client)))
        m = measure(model, batch, recipe=recipe, warmup=1, repeats=1)
        flash = profile.flash is not None and m.peak_split.get("weights_frozen", 0) <= profile.flash
        context.state["peak"] = MetricRecord({"peak": m.ram_peak(flash=flash)})
    fail = config.fail or {}

    def die_halfway(step: int, _metrics: dict[str, Any]) -> None:
        if (fail.get("client"), fail.get("round")) == (client, server_round) and step >= config.local_steps // 2:
            if fail.get("mode") == "exit":
                os._exit(3)  # the worker process dies mid-round: no reply, no cleanup
            raise RuntimeError(f"client {client} failed at local step {step} of round {server_round} (the config's "
                               "fail setting)")

    tc = TrainConfig(steps=config.local_steps, batch_size=profile.batch_size, optimizer="sgd", lr=config.lr,
                     momentum=0.9, schedule="constant", seed=client_seed(config, client, server_round))
    result = train(model, local, None, tc, recipe=recipe, progress=False, callback=die_halfway)
    result.handle.remove()  # trained slices written back into the weights
    arrays = ArrayRecord(encode_update(old, model.state_dict()))
    metrics = MetricRecord({"num-examples": len(local), "client": client, "train-loss": float(result.final_loss),
                            "bytes-sent": arrays.count_bytes(), "peak": context.state["peak"]["peak"],
                            "budget": profile.budget, "predicted-peak": int(plans[profile.name]["predicted_peak"]),
                            "seconds": time.perf_counter() - t0})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@client_app.query()
def _whoami(msg: Message, context: Context) -> Message:
    """Which client this node is: the server asks once before round 1, so that a client that dies without ever
    replying is still named."""
    return Message(RecordDict({"metrics": MetricRecord({"client": int(context.node_config["partition-id"])})}),
                   reply_to=msg)


def node_clients(grid: Grid, clients: int) -> dict[int, int]:
    """node id -> client id of every node, asked by a query message (waits until ``clients`` nodes are up)."""
    while len(ids := list(grid.get_node_ids())) < clients:
        time.sleep(0.2)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in ids])
    return {m.metadata.src_node_id: int(m.content["metrics"]["client"]) for m in replies if not m.has_error()}


class PartialFedAvg(FedAvg):
    """FedAvg over partial updates: each element averaged over the clients that sent it (weighted by samples).

    ``on_round(round, client_rows, failures)`` sees every round's replies."""

    on_round: Any = None
    global_arrays: ArrayRecord | None = None
    nodes: dict[int, int] | None = None  # node id -> client id (node_clients, and every reply): failures are named

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # noqa: ANN201
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):  # noqa: ANN001, ANN201
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        rows = [dict(m.content["metrics"].items()) for m in valid]
        self.nodes = {**(self.nodes or {}), **{m.metadata.src_node_id: int(r["client"]) for m, r in zip(valid, rows)}}
        failures = [(self.nodes.get(m.metadata.src_node_id), m.metadata.src_node_id, m.error.reason) for m in errors]
        if self.on_round is not None:
            self.on_round(server_round, rows, failures)
        if not valid:
            return None, None
        current = self.global_arrays.to_torch_state_dict()
        updates = [(float(m.content["metrics"]["num-examples"]), m.content["arrays"].to_torch_state_dict())
                   for m in valid]
        arrays = ArrayRecord(average_updates(current, updates))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class PartialFedAvgM(FedAvgM, PartialFedAvg):
    """FedAvgM (Hsu et al. 2019): Flower's server momentum on top of :class:`PartialFedAvg`'s average."""


class ProcessTreeMemory:
    """Peak of the summed proportional set size (PSS: shared pages split among the processes sharing them) of this
    process and all its descendants (Flower's Ray workers), sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _reason(text: str) -> str:
    """The exception's own message out of the traceback Flower reports for a failed reply; a Ray worker that died
    under the client (its process exited or was killed) is said as such."""
    died = re.search(r"ray\.exceptions\.(ActorDiedError|ActorUnavailableError)", text)
    if died:
        return f"its process died mid-round (Ray: {died.group(1)}); its worker is restarted"
    line = [x for x in text.strip().splitlines() if x.strip()][-1]
    return line.split("Message: ", 1)[-1].removesuffix("'>").strip()[:200]


def _say(out: Path, text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    with open(out / "federated.log", "a") as f:
        f.write(text + "\n")


def simulate(config: FederatedConfig, out: Path, *, threads: int = 2) -> dict[str, Any]:
    """Run the federation on Flower's simulation runtime (``config.clients`` SuperNodes, ``threads`` workers)."""
    from flwr.simulation import run_simulation
    from safetensors.torch import save_file

    from edgetrain.train import evaluate

    wl = config.workload
    test = wl.load_data("test")
    model = wl.build_model(test.num_classes)
    whole = ArrayRecord(model.state_dict()).count_bytes()
    state: dict[str, Any] = {"rows": {}, "error": None}
    t_start = time.perf_counter()

    def on_round(server_round: int, rows: list[dict[str, Any]], failures: list[tuple[int | None, int, str]]) -> None:
        state["rows"][server_round] = {"clients": rows, "failed": [
            {"client": client, "node": node, "reason": _reason(reason)}
            for client, node, reason in failures]}
        if not rows:  # nothing to aggregate: stop rather than report rounds in which nothing trained
            first = state["rows"][server_round]["failed"][0]["reason"] if failures else "no replies"
            raise ConfigError(f"federated: round {server_round}: every sampled client failed ({first})")

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        acc = evaluate(model, test)
        row = {"round": server_round, "accuracy": acc, **state["rows"].get(server_round, {"clients": [], "failed": []})}
        sent = [c["bytes-sent"] for c in row["clients"]]
        row.update(bytes_whole_model=whole, bytes_sent_mean=sum(sent) / len(sent) if sent else 0,
                   bytes_sent_max=max(sent, default=0),
                   within_budget=sum(c["peak"] <= c["budget"] for c in row["clients"]),
                   seconds=round(time.perf_counter() - t_start, 1))
        with open(out / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        text = f"round {server_round}/{config.rounds}: global accuracy {100 * acc:.2f}%"
        if server_round:
            text += (f", {len(sent)} clients trained, sent {format_size(row['bytes_sent_mean'])} each on average "
                     f"(max {format_size(row['bytes_sent_max'])}; whole model {format_size(whole)}), "
                     f"measured peak within budget for {row['within_budget']}/{len(sent)}")
            for f_ in row["failed"]:
                who = f"client {f_['client']}" if f_["client"] is not None else f"the client on node {f_['node']}"
                text += f"; {who} failed ({f_['reason']}), the round completed without it"
        _say(out, text + f" [{row['seconds']:.0f} s]")
        return MetricRecord({"accuracy": acc})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            random.seed(config.seed)  # Flower samples clients with `random`
            cls = PartialFedAvgM if config.strategy == "fedavgm" else PartialFedAvg
            kw = {"server_momentum": config.server_momentum} if config.strategy == "fedavgm" else {}
            n = max(2, round(config.fraction * config.clients))
            strategy = cls(fraction_train=n / config.clients, fraction_evaluate=0.0, min_train_nodes=n,
                           min_available_nodes=config.clients, **kw)
            strategy.on_round, strategy.nodes = on_round, node_clients(grid, config.clients)
            result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                    num_rounds=config.rounds, train_config=ConfigRecord({"run-dir": str(out)}),
                                    evaluate_fn=evaluate_fn)
            save_file({k: v.contiguous() for k, v in result.arrays.to_torch_state_dict().items()},
                      str(out / "model.safetensors"))
        except BaseException as e:  # noqa: BLE001  (re-raised by simulate, in the main thread)
            state["error"] = e

    quiet = logging.getLogger("flwr").level
    logging.getLogger("flwr").setLevel(logging.ERROR)  # our own line per round instead of Flower's INFO log
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs: silences Ray's FutureWarning
    # A worker whose process dies is restarted (max_restarts), and a client sent to it while it restarts is retried
    # once (max_task_retries; so is the dying client, which dies again): a death costs only the dying client's reply.
    workers = {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1}
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.clients,
                       backend_config={"client_resources": workers,
                                       "init_args": {"num_cpus": threads, "include_dashboard": False,
                                                     "log_to_driver": False}})
    finally:
        logging.getLogger("flwr").setLevel(quiet)
    if state["error"] is not None:
        raise state["error"]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {"rounds": len(rows) - 1, "final_accuracy": rows[-1]["accuracy"], "bytes_whole_model": whole,
            "strategy": config.strategy, "clients": config.clients}

