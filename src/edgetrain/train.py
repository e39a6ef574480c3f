"""The reference training loop: steps or epochs, SGD/AdamW, warmup + cosine/step schedule, evaluation,
a tqdm progress bar, JSON-lines metrics, atomic checkpoints and exact resume.

A seeded run resumed from a checkpoint ends with the same weights, bit for bit, as one never
interrupted: the batch order depends only on ``(seed, epoch)``, the learning rate is a pure function of
the step, and the checkpoint carries model, optimizer, RNG states and the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgetrain import __version__
from edgetrain.checkpoint import load_checkpoint, save_checkpoint
from edgetrain.errors import CheckpointError, ConfigError, TrainingDiverged
from edgetrain.recipe import as_recipe

#: Fields that change what a run computes: a resumed run must not differ in them.
RUN_FIELDS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_steps", "seed",
              "max_grad_norm")


@dataclasses.dataclass
class TrainConfig:
    """Training schedule and bookkeeping.

    Args:
        steps: optimizer steps in total (or give ``epochs``; exactly one of the two).
        epochs: converted to ``ceil(epochs * steps_per_epoch)`` steps.
        batch_size: samples per step.
        optimizer: ``"sgd"`` (with ``momentum``; one state buffer per trainable parameter) or ``"adamw"`` (two).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: decoupled for AdamW, L2 for SGD.
        schedule: ``"cosine"`` (to 0), ``"constant"`` or ``"step"`` (x0.1 at 50% and again at 75%), after a linear
            warmup of ``warmup_steps``.
        warmup_steps: linear warmup steps.
        eval_every: evaluate every N steps (and always at the end when eval data are given).
        eval_batch_size: evaluation batch size.
        checkpoint_every: checkpoint every N steps (and always at the end) when ``out_dir`` is set.
        seed: seeds torch/numpy/random at the start of a fresh run and the batch order.
        threads: ``torch.set_num_threads`` when given.
        out_dir: where ``metrics.jsonl``, ``checkpoint.pt``, ``config.json`` and ``recipe.json`` go.
        max_grad_norm: clip the global gradient norm.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    eval_every: int | None = None
    eval_batch_size: int = 256
    checkpoint_every: int | None = None
    seed: int = 0
    threads: int | None = None
    out_dir: str | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> None:
            raise ConfigError(f"TrainConfig.{field}: {msg}, got {getattr(self, field)!r}")

        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"TrainConfig: give exactly one of steps and epochs (steps={self.steps}, "
                              f"epochs={self.epochs})")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            bad("steps", "must be a positive int")
        if self.epochs is not None and not self.epochs > 0:
            bad("epochs", "must be > 0")
        for f in ("batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive int")
        for f in ("eval_every", "checkpoint_every", "threads"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f, "must be a positive int or None")
        if self.optimizer not in ("sgd", "adamw"):
            bad("optimizer", "must be 'sgd' or 'adamw'")
        if self.schedule not in ("cosine", "constant", "step"):
            bad("schedule", "must be 'cosine', 'constant' or 'step'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ConfigError("TrainConfig: warmup_steps, weight_decay and momentum must be >= 0")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else math.ceil(self.epochs * steps_per_epoch)


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_loss: float
    accuracy: float | None
    history: list[dict[str, Any]]
    checkpoint: Path | None
    seconds: float
    handle: Any = None


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameter (check the recipe)")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_at(step: int, config: TrainConfig, total: int) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then the schedule; a pure function of the step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "step":
        return config.lr * (0.1 if progress >= 0.5 else 1.0) * (0.1 if progress >= 0.75 else 1.0)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256) -> float:
    """Top-1 accuracy on every sample of ``data``, in eval mode (the previous modes are restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        correct = 0
        for x, y in data.batches(batch_size, shuffle=False, drop_last=False):
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        for m, mode in modes.items():
            m.training = mode
    return correct / len(data)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]],
            "python": list(random.getstate()[1]) + [random.getstate()[0]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), None))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class _Run:
    """Bookkeeping of one training run: paths, metrics file, checkpoints."""

    def __init__(self, config: TrainConfig, recipe) -> None:
        self.config = config
        self.recipe = recipe
        self.out = Path(config.out_dir) if config.out_dir else None
        self.ckpt = self.out / "checkpoint.pt" if self.out else None
        self.last_good: int | None = None

    def log(self, record: dict[str, Any]) -> None:
        if self.out:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def start(self) -> None:
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            (self.out / "recipe.json").write_text(self.recipe.to_json() + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (written after the checkpoint a resumed run continues from)."""
        path = self.out / "metrics.jsonl" if self.out else None
        if path and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if not self.ckpt:
            return
        save_checkpoint(self.ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "config": dataclasses.asdict(self.config), "recipe": self.recipe.to_dict(),
                                    "rng": _rng_state(), "version": __version__})
        self.last_good = step

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the checkpoint into model and optimizer; returns its step (0 when there is none)."""
        if not self.ckpt:
            raise ConfigError("resume needs an out_dir holding checkpoint.pt")
        if not self.ckpt.exists():
            print(f"edgetrain: no checkpoint at {self.ckpt}; starting a fresh run", file=sys.stderr)
            return 0
        ck = load_checkpoint(self.ckpt)
        if ck.get("recipe") != self.recipe.to_dict():
            raise CheckpointError(f"{self.ckpt}: was written with recipe {ck.get('recipe', {}).get('name')!r}, "
                                  f"not {self.recipe.name!r} (or with other settings)")
        old = ck["config"]
        diff = [f for f in RUN_FIELDS if old.get(f) != getattr(self.config, f)]
        if diff:
            raise CheckpointError(f"{self.ckpt}: config differs in {diff} "
                                  f"({', '.join(f'{f}={old.get(f)!r}' for f in diff)})")
        own = model.state_dict()
        missing, extra = sorted(set(own) - set(ck["model"])), sorted(set(ck["model"]) - set(own))
        shape = sorted(k for k in set(own) & set(ck["model"]) if own[k].shape != ck["model"][k].shape)
        if missing or extra or shape:
            raise CheckpointError(f"{self.ckpt}: does not match the model (missing {missing[:3]}, unexpected "
                                  f"{extra[:3]}, wrong shape {shape[:3]})")
        model.load_state_dict(ck["model"])
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.ckpt}: optimizer state does not match ({e})") from None
        _set_rng_state(ck["rng"])
        self.last_good = int(ck["step"])
        self.truncate_metrics(self.last_good)
        return self.last_good


def train(model: nn.Module, train_data, eval_data=None, config: TrainConfig | None = None, *, recipe: Any = None,
          resume: bool = False, progress: bool = True,
          callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_data`` (an :class:`edgetrain.data.ImageData`) under ``recipe``.

    The recipe is applied in place first (the handle is returned in the result). ``resume=True`` continues
    from ``out_dir/checkpoint.pt`` when present. A NaN or infinite loss raises :class:`TrainingDiverged`
    without touching the last good checkpoint. ``callback(step, metrics)`` runs after every step.
    """
    from edgetrain.apply import apply_

    config = config or TrainConfig(epochs=1)
    recipe = as_recipe(recipe)
    if config.threads:
        torch.set_num_threads(config.threads)
    spe = train_data.steps_per_epoch(config.batch_size)
    total = config.total_steps(spe)
    first = next(iter(train_data.batches(config.batch_size, seed=config.seed, epoch=0)))[0]
    handle = apply_(model, recipe, first)  # traced and checked on the first batch
    optimizer = build_optimizer(model, config)
    run = _Run(config, recipe)
    _seed_all(config.seed)
    step = run.resume(model, optimizer) if resume else 0
    run.start()
    t0, history, loss_value, accuracy = time.perf_counter(), [], float("nan"), None
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {recipe.name}", unit="step",
               dynamic_ncols=True, file=sys.stderr)
    try:
        while step < total:
            epoch, start = divmod(step, spe)
            for x, y in train_data.batches(config.batch_size, seed=config.seed, epoch=epoch, start=start):
                model.train()
                loss = F.cross_entropy(model(x), y)
                lr = lr_at(step, config, total)
                if not torch.isfinite(loss):
                    where = (f"last good checkpoint: {run.ckpt} (step {run.last_good})" if run.last_good is not None
                             else "no checkpoint was written")
                    raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1} (lr {lr:.3g}); stopped. {where}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm:
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.step()
                handle.step(step)
                step += 1
                loss_value = loss.item()
                rec = {"step": step, "loss": loss_value, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
                if eval_data is not None and config.eval_every and step % config.eval_every == 0 and step < total:
                    rec["eval_accuracy"] = evaluate(model, eval_data, config.eval_batch_size)
                run.log(rec)
                history.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2g}")
                if callback is not None:
                    callback(step, rec)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    run.save(model, optimizer, step)
                if step >= total:
                    break
        if eval_data is not None:
            accuracy = evaluate(model, eval_data, config.eval_batch_size)
            run.log({"step": step, "eval_accuracy": accuracy})
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy:.3f}")
        run.save(model, optimizer, step)
    finally:
        bar.close()
    return TrainResult(step, loss_value, accuracy, history, run.ckpt, time.perf_counter() - t0, handle)
