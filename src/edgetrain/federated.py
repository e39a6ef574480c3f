"""Federated fine-tuning on Flower: many budgeted devices fine-tune one model, each with its own plan.

Flower (``flwr``, the optional extra ``edgetrain[federated]``) is the engine: its simulation runtime runs one
``ClientApp`` per simulated device on its own Ray workers, and its ``ServerApp`` runs a Flower strategy (FedAvg, or
FedAvgM with server momentum, Hsu et al. 2019, arXiv:1909.06335). edgetrain brings what is on the devices:

* every client has a **device profile** (a memory budget and batch size, or one of :mod:`edgetrain.devices`) and
  trains under the planner's recipe for that budget (:func:`edgetrain.plan.plan`: a sparse-update scheme plus how
  to run it), its peak measured by the meter (:func:`edgetrain.measure`) against the budget;
* a client **sends only what it trained**: each tensor that changed goes as a whole, or as the slices along one
  axis that changed (indices + values, whichever is smaller; :func:`encode_update`), so a client that trained
  biases and a few weight slices sends kilobytes, not the model;
* the server averages each element over the clients that sent it, weighted by their number of samples
  (:func:`average_updates`; elements nobody trained keep their value), then the Flower strategy's own server
  step (FedAvgM's momentum) runs on the result.

The data are split across clients by class with a Dirichlet(``alpha``) prior (:func:`dirichlet_split`, the usual
non-IID benchmark split, Hsu et al. 2019 §4). A client that dies mid-round (its process exits) is reported by
Flower as a failed reply; the round completes without it and the log says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgetrain import smoke
from edgetrain.devices import format_size, get_device, parse_size
from edgetrain.errors import ConfigError
from edgetrain.workload import Workload

INSTALL = "edgetrain federated needs Flower: pip install 'edgetrain[federated]'"
STRATEGIES = ("fedavg", "fedavgm")
SEP = "@"  # "<tensor>@<axis>.index" / "<tensor>@<axis>.values": the changed slices of a tensor along one axis


def require_flower() -> None:
    """One line naming the extra to install when Flower is missing."""
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


# ------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Profile:
    """A kind of client device: ``budget`` bytes of peak RAM for the training step, at ``batch_size``."""

    name: str
    budget: int
    batch_size: int
    flash: int | None = None

    @classmethod
    def from_dict(cls, d: Any, batch_size: int) -> Profile:
        if not isinstance(d, dict) or "name" not in d or not ({"budget", "device"} & set(d)):
            raise ConfigError(f"federated: a profile needs a name and a budget or a device, got {d!r}")
        unknown = sorted(set(d) - {"name", "budget", "device", "batch_size", "flash"})
        if unknown:
            raise ConfigError(f"federated: profile {d['name']!r}: unknown key(s) {unknown}")
        dev = get_device(d["device"]) if "device" in d else None
        budget = parse_size(d["budget"]) if "budget" in d else dev.train_budget
        flash = parse_size(d["flash"]) if d.get("flash") is not None else dev.flash_bytes if dev else None
        return cls(str(d["name"]), budget, int(d.get("batch_size", dev.batch_size if dev else batch_size)), flash)


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """One federated fine-tuning run (``edgetrain federated --config``; every field is a key of its YAML).

    Args:
        workload: the model and data (:class:`~edgetrain.Workload` keys); its ``train_subset`` bounds the data
            split across clients, its ``eval_subset`` the test samples the server scores the global model on.
        clients: number of simulated devices; client ``i`` has ``profiles[i % len(profiles)]``.
        rounds: federated rounds.
        fraction: fraction of the clients sampled each round (at least 2).
        local_steps: SGD steps (momentum 0.9, constant ``lr``) each sampled client takes per round.
        strategy: ``fedavg`` or ``fedavgm`` (server momentum ``server_momentum``, server learning rate 1).
        alpha: Dirichlet concentration of the class split (small: each client sees few classes).
        profiles: ``{name, budget | device, batch_size?}`` per kind of device.
        analysis_steps, analysis_ks, weight_last: the planner's contribution analysis (:func:`edgetrain.plan.analyze`:
            its steps per run, the bias grid (``None``: the default grid), the last convs whose weights it tries).
        fail: ``{client, round, mode?}``: that client fails halfway through its local steps in that round (to
            show a round completing without it): ``mode: raise`` (default) raises in the ClientApp; ``mode: exit``
            ends its worker process (``os._exit``, no reply, no cleanup); Ray restarts the worker for the next client.
    """

    workload: Workload
    clients: int = 50
    rounds: int = 10
    fraction: float = 0.2
    local_steps: int = 10
    lr: float = 0.01
    strategy: str = "fedavg"
    server_momentum: float = 0.9
    alpha: float = 0.5
    profiles: tuple[Profile, ...] = ()
    analysis_steps: int = 100
    analysis_ks: tuple[int, ...] | None = None
    weight_last: int = 12
    seed: int = 0
    fail: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"federated: strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for f in ("clients", "rounds", "local_steps", "analysis_steps"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"federated: {f} must be a positive int, got {getattr(self, f)!r}")
        if self.clients < 2:
            raise ConfigError(f"federated: clients must be at least 2, got {self.clients}")
        if not 0 < self.fraction <= 1 or not 0 < self.alpha < math.inf or not 0 < self.lr < math.inf:
            raise ConfigError("federated: fraction must be in (0, 1], alpha and lr positive")
        if not self.profiles:
            raise ConfigError("federated: give at least one client profile")
        if self.fail is not None and not ({"client", "round"} <= set(self.fail) <= {"client", "round", "mode"}
                                          and self.fail.get("mode", "raise") in ("raise", "exit")):
            raise ConfigError(f"federated: fail takes {{client, round, mode: raise | exit}}, got {self.fail!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FederatedConfig:
        if not isinstance(d, dict) or "workload" not in d:
            raise ConfigError("federated: the config needs a workload mapping (model, data, ...)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"federated: unknown key(s) {unknown}; known: {sorted(known)}")
        wl = d["workload"] if isinstance(d["workload"], Workload) else Workload.from_dict(d["workload"])
        profiles = tuple(p if isinstance(p, Profile) else Profile.from_dict(p, wl.batch_size)
                         for p in d.get("profiles", ()))
        ks = tuple(d["analysis_ks"]) if d.get("analysis_ks") is not None else None
        return cls(**{**d, "workload": wl, "profiles": profiles, "analysis_ks": ks})

    @classmethod
    def load(cls, path: str | Path) -> FederatedConfig:
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the federated config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "workload": self.workload.to_dict()}

    def smoke(self) -> FederatedConfig:
        """In smoke mode: 3 clients, 2 rounds, 2 local steps, a tiny analysis (see :mod:`edgetrain.smoke`)."""
        if not smoke.active():
            return self
        return dataclasses.replace(
            self, workload=smoke.workload(self.workload), clients=min(self.clients, 3), rounds=min(self.rounds, 2),
            local_steps=min(self.local_steps, smoke.STEPS), analysis_steps=min(self.analysis_steps, 2),
            weight_last=min(self.weight_last, 2), analysis_ks=(0, 1), fraction=1.0,
            profiles=tuple(dataclasses.replace(p, batch_size=min(p.batch_size, smoke.BATCH)) for p in self.profiles))

    def profile_of(self, client: int) -> Profile:
        return self.profiles[client % len(self.profiles)]


# -------------------------------------------------------------------------------------------------- data split
def dirichlet_split(labels: Tensor, clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> list[Tensor]:
    """Sample indices of each client: for every class, client shares ~ Dirichlet(alpha) (Hsu et al. 2019, §4).

    Redrawn (up to 100 times, then refused) until every client has at least ``min_size`` samples."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]
    raise ConfigError(f"federated: {len(y)} samples cannot give each of {clients} clients {min_size} samples "
                      f"(a batch) under Dirichlet alpha={alpha}; use fewer clients, more data or a larger alpha")


# ------------------------------------------------------------------------------------------------ update codec
def encode_update(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """What changed from ``old`` to ``new``: a changed tensor whole (``name``), or the slices along one axis that
    hold every change (``name@axis.index`` int32 and ``name@axis.values``), whichever has fewer bytes."""
    out: dict[str, Tensor] = {}
    for name, t in new.items():
        changed = t != old[name]
        if not bool(changed.any()):
            continue
        best, size = {name: t.clone()}, t.numel() * t.element_size()
        for axis in range(t.ndim):
            other = [d for d in range(t.ndim) if d != axis]
            keep = (changed.any(dim=other) if other else changed).nonzero().flatten().to(torch.int32)
            values = t.index_select(axis, keep.long())
            cost = keep.numel() * 4 + values.numel() * values.element_size()
            if cost < size:
                best, size = {f"{name}{SEP}{axis}.index": keep, f"{name}{SEP}{axis}.values": values}, cost
        out.update(best)
    return out


def decode_update(update: dict[str, Tensor]) -> dict[str, tuple[int | None, Tensor | None, Tensor]]:
    """``name -> (axis, index, values)`` (axis and index ``None`` for a whole tensor)."""
    out: dict[str, tuple[int | None, Tensor | None, Tensor]] = {}
    for key, t in update.items():
        if SEP not in key:
            out[key] = (None, None, t)
        elif key.endswith(".values"):
            name, axis = key[:-len(".values")].rsplit(SEP, 1)
            out[name] = (int(axis), update[f"{name}{SEP}{axis}.index"].long(), t)
    return out


def average_updates(current: dict[str, Tensor], updates: list[tuple[float, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Each element: the ``weight``-weighted mean of the values the clients sent for it; the current value where
    nobody sent one."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}
    weight = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}
    for w, update in updates:
        for name, (axis, index, values) in decode_update(update).items():
            if name not in current:
                raise ConfigError(f"federated: a client sent {name!r}, which the model does not have")
            if axis is None:
                total[name] += w * values.double()
                weight[name] += w
            else:
                total[name].index_add_(axis, index, w * values.double())
                weight[name].index_add_(axis, index, torch.full_like(values, w, dtype=torch.float64))
    out = {}
    for k, v in current.items():
        mean = total[k] / weight[k].clamp_min(1e-300)
        mean = mean if torch.is_floating_point(v) else mean.round()  # integer buffers (num_batches_tracked)
        out[k] = torch.where(weight[k] > 0, mean, v.double()).to(v.dtype)
    return out


def nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------------------- the run
def plan_profiles(config: FederatedConfig, *, threads: int = 2, progress: bool = True) -> dict[str, dict[str, Any]]:
    """The planner's recipe for each profile's budget (one contribution analysis, shared); an infeasible budget is
    refused in one line naming the profile and its clients."""
    from edgetrain.errors import BudgetError
    from edgetrain.plan import analyze, plan

    wl = config.workload
    ks = list(config.analysis_ks) if config.analysis_ks is not None else None
    contribution = analyze(wl, steps=config.analysis_steps, weight_last=config.weight_last, ks=ks, threads=threads,
                           progress=progress)
    model = wl.build_model(wl.load_data("train").num_classes)
    shape = tuple(wl.example_input(zeros=True).shape[1:])
    plans = {}
    for p in dict.fromkeys(config.profiles):
        try:
            pl = plan(model, contribution, p.budget, shape, p.batch_size, "sgd_momentum", name=f"plan-{p.name}",
                      flash=p.flash)
        except BudgetError as e:
            who = [i for i in range(config.clients) if config.profile_of(i) == p]
            raise ConfigError(f"federated: profile {p.name!r} (clients {_ranges(who)}): {e}") from None
        plans[p.name] = {"recipe": pl.recipe.to_dict(), "predicted_peak": pl.predicted_bytes}
    return plans


def _ranges(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:6])) + (f", ... ({len(ids)} clients)" if len(ids) > 6 else "")


def run(config: FederatedConfig, out: str | Path, *, force: bool = False, threads: int = 2,
        progress: bool = True) -> dict[str, Any]:
    """Plan every profile, then run the federation on Flower's simulation runtime; writes ``config.json``,
    ``plans.json``, ``rounds.jsonl`` (global accuracy and per-client rows each round), ``model.safetensors`` (the
    final global model) and ``summary.json`` to ``out``. Returns the summary."""
    require_flower()
    from edgetrain import _flower

    config = config.smoke()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty; choose another --out, or --force to replace its run")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("rounds.jsonl", "summary.json", "federated.log", "model.safetensors"):
        (out / f).unlink(missing_ok=True)
    torch.set_num_threads(threads)
    plans = plan_profiles(config, threads=threads, progress=progress)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    t0 = time.perf_counter()
    with _flower.ProcessTreeMemory() as memory:
        summary = _flower.simulate(config, out, threads=threads)
    summary.update(wall_seconds=round(time.perf_counter() - t0, 1), peak_rss_bytes=memory.peak,
                   peak_rss=format_size(memory.peak), smoke=smoke.active(),
                   plans={k: {"predicted_peak": v["predicted_peak"], "techniques": v["recipe"]["techniques"]}
                          for k, v in plans.items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def client_seed(config: FederatedConfig, client: int, server_round: int) -> int:
    return config.seed * 1_000_003 + server_round * 1009 + client
