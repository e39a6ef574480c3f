"""The reference training loop: steps or epochs, SGD/AdamW, warmup + cosine/step schedule, evaluation,
progress output, JSON-lines metrics, atomic checksummed checkpoints and exact resume.

What it guarantees (docs/reliability.md lists the tests that hold each):

* **Nothing mixed.** A run writes into an ``out_dir`` of its own: an existing run there is continued only with
  ``resume=True`` (and only if the checkpoint's fingerprint of model, recipe, data and schedule matches; a mismatch
  is one line naming the difference) or replaced with ``force=True``. One process at a time holds the directory.
* **Exact resume.** A seeded run resumed from a checkpoint ends with the same weights and metrics, bit for bit, as
  one never interrupted: the batch order depends only on ``(seed, epoch)``, the learning rate is a pure function of
  the step, and the checkpoint holds model, optimizer, RNG states, the state techniques own
  (:meth:`edgetrain.apply.Applied.state_dict`) and the step.
* **Divergence stops the run where it happens.** A non-finite loss, gradient, parameter or buffer raises
  :class:`~edgetrain.errors.TrainingDiverged` naming the step and the tensor; a checkpoint is only ever written
  from a finite state, so the last one on disk is good.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain import smoke
from edgetrain.errors import ConfigError
from edgetrain.execution import FusedStep, run_step
from edgetrain.recipe import as_recipe
from edgetrain.run import RUN_FIELDS, Progress, Run, diverged, finite, fingerprint, nonfinite, seed_all

__all__ = ["RUN_FIELDS", "TrainConfig", "TrainResult", "build_optimizer", "evaluate", "finite", "lr_at", "train"]


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
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            bad("epochs", "must be a positive number")
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
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            bad("max_grad_norm", "must be a positive number or None")
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


def _probe(model: nn.Module, x: Any) -> None:
    """One eval-mode forward of two samples: a model that cannot take the data's batches is one line, here."""
    from edgetrain.inputs import call_model, take

    modes, rng = {m: m.training for m in model.modules()}, torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, take(x, 2))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{type(model).__name__} cannot run on the training batches (input {shape}): {first}") \
            from None
    finally:
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(rng)


def train(model: nn.Module, train_data, eval_data=None, config: TrainConfig | None = None, *, recipe: Any = None,
          resume: bool = False, force: bool = False, progress: bool = True,
          callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_data`` (an :class:`edgetrain.data.ImageData`) under ``recipe``.

    The recipe is applied in place first (the handle is returned in the result). With ``config.out_dir``, the run
    owns that directory: an existing run there is continued with ``resume=True`` (from ``checkpoint.pt`` when
    present, refused in one line if model, recipe, data or schedule differ) or replaced with ``force=True``, and
    refused otherwise. A non-finite loss, gradient, parameter or buffer raises :class:`TrainingDiverged` naming
    the step and the tensor, without touching the last good checkpoint. ``callback(step, metrics)`` runs after
    every step.
    """
    from edgetrain.apply import apply_

    config = config or TrainConfig(epochs=1)
    recipe = as_recipe(recipe)
    if resume and force:
        raise ConfigError("train: give resume or force, not both (force replaces the run resume would continue)")
    if config.threads:
        torch.set_num_threads(config.threads)
    ex = recipe.execution
    if ex.fused_step and config.max_grad_norm:
        raise ConfigError("train: the recipe's fused_step updates each parameter during the backward, so the global "
                          "gradient norm max_grad_norm needs is never there; drop one of the two")
    if ex.fused_step and getattr(model, "clip_gradients", None) is not None:
        raise ConfigError(f"train: {type(model).__name__} clips its gradients before each step, which the recipe's "
                          "fused_step (updates during the backward) leaves no room for; drop fused_step")
    if ex.micro_batches > config.batch_size:
        raise ConfigError(f"train: the recipe asks for {ex.micro_batches} micro-batches, more than the batch size "
                          f"{config.batch_size}")
    spe = train_data.steps_per_epoch(config.batch_size)
    total = smoke.cap(config.total_steps(spe), smoke.STEPS)
    first = next(iter(train_data.batches(config.batch_size, seed=config.seed, epoch=0)))[0]
    _probe(model, first)
    seed_all(config.seed)  # parameters a technique adds (LoRA's A) are drawn from the run's seed, so resume matches
    handle = apply_(model, recipe, first)  # traced and checked on the first batch
    run = None
    try:
        optimizer = build_optimizer(model, config)
        if ex.fused_step:
            optimizer = FusedStep(optimizer)
        fp = fingerprint(model, train_data, eval_data, config, recipe, total) if config.out_dir else {}
        run = Run(config, recipe, fp, model)
        if run.dir:
            run.dir.open(resume=resume, force=force)
        seed_all(config.seed)
        step, loss_value = run.resume(model, optimizer, handle) if resume else (0, float("nan"))
        run.write_meta()
    except BaseException:  # nothing trained: the model is given back as it came
        if run is not None and run.dir:
            run.dir.close()
        if isinstance(optimizer, FusedStep):
            optimizer.remove()
        handle.remove()
        raise
    job = _Job(model, train_data, eval_data, config, recipe, handle, optimizer, run, total, spe)
    try:
        return _loop(job, step, loss_value, progress, callback)
    finally:
        if isinstance(optimizer, FusedStep):  # its hooks would update the parameters in any later backward
            optimizer.remove()
        if run.dir:
            run.dir.close()


@dataclasses.dataclass
class _Job:
    """What the loop works on (fixed for the run)."""

    model: nn.Module
    train_data: Any
    eval_data: Any
    config: TrainConfig
    recipe: Any
    handle: Any
    optimizer: torch.optim.Optimizer
    run: Run
    total: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # buffers that start finite must stay so (a mask buffer may hold -inf by design: it is not watched)
        self.watched = {n for n, b in self.model.named_buffers() if nonfinite([(n, b)]) is None}


def _step(job: _Job, x: Tensor, y: Tensor, step: int) -> tuple[float, float]:
    """One optimizer step (0-based ``step``) in the recipe's execution (micro-batches, fused step) with the
    divergence checks; returns (loss, lr). A fused step updates during the backward, so a non-finite gradient shows
    as a non-finite parameter right after it."""
    model, optimizer, run, ex = job.model, job.optimizer, job.run, job.recipe.execution
    model.train()
    lr = lr_at(step, job.config, job.total)
    for g in optimizer.param_groups:  # before the backward: a fused step updates in it
        g["lr"] = lr

    own = getattr(model, "training_loss", None)  # a training mode's loss (edgetrain.distill)

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        loss = own(out, target) if own is not None else F.cross_entropy(out, target)
        if not torch.isfinite(loss):
            raise diverged(f"loss is {loss.item()}", step + 1, lr, run)
        return loss

    def before_update() -> None:
        bad = nonfinite((n, p.grad) for n, p in job.trainable)
        if bad:
            raise diverged(f"the gradient of {bad[0]} is {bad[1]}", step + 1, lr, run, " before the update")
        clip = getattr(model, "clip_gradients", None)  # a training mode's own clipping (edgetrain.mebqat)
        if clip is not None:
            clip()
        if job.config.max_grad_norm:
            nn.utils.clip_grad_norm_([p for _, p in job.trainable], job.config.max_grad_norm)

    loss = run_step(model, x, y, loss_fn, optimizer, ex.micro_batches, ex.bn, before_step=before_update)
    job.handle.step(step)
    bad = nonfinite([*(("parameter " + n, p) for n, p in job.trainable),
                     *(("buffer " + n, b) for n, b in model.named_buffers() if n in job.watched)])
    if bad:
        raise diverged(f"{bad[0]} became {bad[1]}", step + 1, lr, run)
    return loss.item(), lr


def _evaluate(job: _Job, bar: Progress, at: str = "") -> float:
    t0 = time.perf_counter()
    bar.phase(f"evaluating on {len(job.eval_data):,} samples{at}")
    accuracy = evaluate(job.model, job.eval_data, job.config.eval_batch_size)
    bar.done(f"eval accuracy {accuracy:.4f}{at} ({time.perf_counter() - t0:.1f} s)")
    return accuracy


def _loop(job: _Job, step: int, loss_value: float, progress: bool, callback) -> TrainResult:  # noqa: ANN001
    config, run = job.config, job.run
    t0, history, accuracy = time.perf_counter(), [], None
    bar = Progress(progress, f"train {job.recipe.name}", job.total, step)
    try:
        while step < job.total:
            epoch, start = divmod(step, job.steps_per_epoch)
            for x, y in job.train_data.batches(config.batch_size, seed=config.seed, epoch=epoch, start=start):
                loss_value, lr = _step(job, x, y, step)
                step += 1
                rec = {"step": step, "loss": loss_value, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
                if job.eval_data is not None and config.eval_every and step % config.eval_every == 0 \
                        and step < job.total:
                    rec["eval_accuracy"] = _evaluate(job, bar, f" at step {step}")
                run.log(rec)
                history.append(rec)
                bar.update(step, loss_value, lr)
                if callback is not None:
                    callback(step, rec)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < job.total:
                    run.save(job.model, job.optimizer, job.handle, step, loss_value)
                if step >= job.total:
                    break
        if job.eval_data is not None:
            accuracy = _evaluate(job, bar)
            run.log({"step": step, "eval_accuracy": accuracy, "final": True})
        run.save(job.model, job.optimizer, job.handle, step, loss_value)
    finally:
        bar.close()
    return TrainResult(step, loss_value, accuracy, history, run.ckpt, time.perf_counter() - t0, job.handle)
