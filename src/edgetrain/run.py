"""The records of one training run: its fingerprint, the checks that stop a diverging run, the progress output,
and the bookkeeping of its directory (metrics, checkpoints, resume). :func:`edgetrain.train.train` uses them.

* **Fingerprint** (:func:`fingerprint`): what a resumed run must share with the run that wrote the checkpoint:
  model, recipe, training and evaluation data, schedule. A resume with another one is refused in one line naming
  the first difference (:func:`first_difference`).
* **Divergence** (:func:`nonfinite`): the first NaN or infinite tensor among many, with one sync.
* **Progress** (:class:`Progress`): a tqdm bar on a terminal; lines every few seconds and one per phase elsewhere.
* **Strict JSON** (:func:`finite`): NaN and infinities become ``null``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgetrain import __version__
from edgetrain.checkpoint import RunDir, atomic_write_text, load_checkpoint, save_checkpoint
from edgetrain.errors import CheckpointError, ConfigError, EdgetrainError, TrainingDiverged

#: Fields that change what a run computes: a resumed run must not differ in them (with the total step count when
#: the schedule depends on it).
RUN_FIELDS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_steps", "seed",
              "max_grad_norm")
PROGRESS_SECONDS = 5.0  # without a terminal: one progress line this often


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (and tuples by lists): what strict JSON holds.
    Write JSON as ``json.dumps(finite(obj), allow_nan=False)``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- RNG
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


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------- fingerprint
def _digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of the dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _data_fingerprint(data) -> dict[str, Any] | None:  # noqa: ANN001
    if data is None:
        return None
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    content = _digest([images, labels]) if isinstance(images, Tensor) and isinstance(labels, Tensor) else None
    return {"name": getattr(data, "name", type(data).__name__), "samples": len(data), "sha256": content,
            "transform": repr(getattr(data, "transform", None))}


def fingerprint(model: nn.Module, train_data, eval_data, config, recipe, total: int) -> dict[str, Any]:  # noqa: ANN001
    """What a resumed run must share with the run that wrote the checkpoint: the model (class and weights at the
    start, after the recipe is applied), the recipe, the training and evaluation data (name, size, content hash,
    transform) and the schedule (:data:`RUN_FIELDS`, and the total step count unless the schedule is constant)."""
    schedule = {f: getattr(config, f) for f in RUN_FIELDS}
    if config.schedule != "constant":  # cosine and step learning rates depend on the total
        schedule["total_steps"] = total
    return {"model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                      "initial_weights": _digest(model.state_dict().values())},
            "recipe": recipe.to_dict(), "train_data": _data_fingerprint(train_data),
            "eval_data": _data_fingerprint(eval_data), "schedule": schedule}


_WHAT = {"model": "the model", "recipe": "the recipe", "train_data": "the training data",
         "eval_data": "the evaluation data", "schedule": "the schedule"}
_HINT = {"model.initial_weights": " (other --weights, --seed, --pretrained or model arguments?)",
         "schedule.total_steps": " (the learning rate of a cosine or step schedule depends on the total step count; "
                                 "only a constant schedule may change --steps on resume)"}


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first ``(path, old value, new value)`` where two nested dicts/lists differ, or ``None``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in old or k not in new:
                return sub, old.get(k, "<absent>"), new.get(k, "<absent>")
            found = first_difference(old[k], new[k], sub)
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------- checks
def nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> tuple[str, str] | None:
    """``(name, "nan" | "inf")`` of the first floating-point tensor holding a NaN or an infinity, else ``None``.

    Fast path: one float32 sum per tensor and one sync (a sum is finite only if every element is; 2.4 ms for
    MobileNetV2's 2.3 M parameters and buffers on one thread, a quarter of a max-abs). A non-finite sum is checked
    element-wise, so a sum that merely overflows is not mistaken for divergence."""
    floats = [(n, t.detach()) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not floats:
        return None
    ok = torch.stack([t.sum(dtype=torch.float32) for _, t in floats]).isfinite()  # (T,)
    if bool(ok.all()):
        return None
    for i in (~ok).nonzero().view(-1).tolist():
        name, t = floats[i]
        if bool(t.isnan().any()):
            return name, "nan"
        if bool(t.isinf().any()):
            return name, "inf"
    return None  # large finite values whose float32 sum overflowed


def _state_tensors(obj: Any, prefix: str) -> Iterable[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _state_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _state_tensors(v, f"{prefix}[{i}]")


# --------------------------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar on a terminal; elsewhere (a file, a pipe, CI) a line every :data:`PROGRESS_SECONDS` and one per
    phase, never carriage-return redraws."""

    def __init__(self, enabled: bool, desc: str, total: int, initial: int) -> None:
        self.enabled, self.desc, self.total, self.initial = enabled, desc, total, initial
        self.stream = sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=self.stream)
        else:
            start = f" from step {initial}" if initial else ""
            self._line(f"{total - initial} steps{start} (a line every {PROGRESS_SECONDS:g} s)")

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}")
            return
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS or step == self.total:
            self.last = now
            done, spent = step - self.initial, now - self.t0
            left = spent / max(done, 1) * (self.total - step)
            self._line(f"step {step}/{self.total} ({100 * step / self.total:.0f}%), loss {loss:.4f}, lr {lr:.3g}, "
                       f"{spent:.0f} s, ~{left:.0f} s left")

    def phase(self, text: str) -> None:
        """A phase that is not a step (evaluation): shown when it starts."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} ({text})")
            self.bar.refresh()
        else:
            self._line(text)

    def done(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(self.desc)
            self.bar.set_postfix_str(text)
        else:
            self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- the run
class Run:
    """Bookkeeping of one training run: its directory, metrics file, checkpoints and fingerprint."""

    def __init__(self, config, recipe, fp: dict[str, Any], model: nn.Module) -> None:  # noqa: ANN001
        self.config, self.recipe, self.fingerprint = config, recipe, fp  # a TrainConfig, a Recipe
        self.dir = RunDir(config.out_dir) if config.out_dir else None
        self.ckpt = self.dir.checkpoint if self.dir else None
        self.last_good: int | None = None
        # state-dict entries non-finite by design (a -inf mask buffer): not divergence
        self.nonfinite_at_start = {k for k, v in model.state_dict().items() if nonfinite([(k, v)])}

    def where(self) -> str:
        if self.last_good is not None:
            return f"last good checkpoint: {self.ckpt} (step {self.last_good})"
        return "no checkpoint was written"

    def _write(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except OSError as e:
            raise EdgetrainError(f"{self.dir.path}: cannot write {what} ({e.strerror or e}); {self.where()}") \
                from None

    def log(self, record: dict[str, Any]) -> None:
        if self.dir:
            line = json.dumps(finite(record), allow_nan=False) + "\n"

            def append() -> None:
                with self.dir.metrics.open("a") as f:
                    f.write(line)

            self._write("metrics.jsonl", append)

    def write_meta(self) -> None:
        if self.dir:
            self._write("config.json", lambda: atomic_write_text(
                self.dir.path / "config.json", json.dumps(finite(dataclasses.asdict(self.config)), indent=2) + "\n"))
            self._write("recipe.json", lambda: atomic_write_text(self.dir.path / "recipe.json",
                                                                 self.recipe.to_json() + "\n"))

    def truncate_metrics(self, step: int) -> None:
        """Keep the metric lines up to ``step`` (those of the checkpoint a resumed run continues from): later ones,
        final evaluations and lines a kill cut short are dropped, and written again by the resumed run."""
        path = self.dir.metrics
        if not path.exists():
            return
        keep = []
        for ln in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step \
                    and not rec.get("final"):
                keep.append(ln + "\n")
        self._write("metrics.jsonl", lambda: atomic_write_text(path, "".join(keep)))

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle, step: int,  # noqa: ANN001
             loss: float) -> None:
        if not self.dir:
            return
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loss": loss,
                   "config": dataclasses.asdict(self.config), "recipe": self.recipe.to_dict(),
                   "techniques": handle.state_dict(), "fingerprint": self.fingerprint, "rng": _rng_state(),
                   "version": __version__}
        bad = nonfinite([*_state_tensors(payload["optimizer"]["state"], "optimizer state"),
                         *_state_tensors(payload["techniques"], "technique state"),
                         *((k, v) for k, v in payload["model"].items() if k not in self.nonfinite_at_start)])
        if bad:
            raise TrainingDiverged(f"{bad[0]} is {bad[1]} at step {step}; no checkpoint written from a non-finite "
                                   f"state. {self.where()}")
        self._write("checkpoint.pt", lambda: save_checkpoint(self.ckpt, payload))
        self.last_good = step

    def _check(self, ck: dict[str, Any], model: nn.Module) -> None:
        own, theirs = model.state_dict(), ck["model"]
        missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        shape = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
        if missing or extra or shape:
            raise CheckpointError(f"{self.ckpt}: does not match the model (missing {missing[:3]}, unexpected "
                                  f"{extra[:3]}, wrong shape {shape[:3]})")
        diff = first_difference(ck["fingerprint"], self.fingerprint)
        if diff:
            path, old, new = diff
            what = _WHAT.get(path.split(".")[0].split("[")[0], path)
            raise CheckpointError(f"{self.ckpt}: cannot resume: {what} differs from the checkpoint's ({path}: "
                                  f"{_short(old)} in the checkpoint, {_short(new)} now){_HINT.get(path, '')}; resume "
                                  "with the same settings, or start a new run (another --out, or --force)")

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle) -> tuple[int, float]:  # noqa: ANN001
        """Load the checkpoint into model, optimizer, techniques and RNGs; returns its step and loss ((0, nan) when
        there is none)."""
        if not self.dir:
            raise ConfigError("resume needs an out_dir holding checkpoint.pt")
        if not self.ckpt.exists():
            print(f"edgetrain: no checkpoint at {self.ckpt}; starting a fresh run", file=sys.stderr)
            self.truncate_metrics(0)
            return 0, float("nan")
        ck = load_checkpoint(self.ckpt)
        self._check(ck, model)
        try:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{self.ckpt}: model or optimizer state does not fit ({first})") from None
        handle.load_state_dict(ck["techniques"])
        try:
            _set_rng_state(ck["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{self.ckpt}: malformed RNG state ({type(e).__name__})") from None
        loss = ck.get("loss", float("nan"))
        self.last_good = int(ck["step"])
        self.truncate_metrics(self.last_good)
        return self.last_good, float(loss) if isinstance(loss, (int, float)) else float("nan")


def diverged(what: str, step: int, lr: float, run: Run, detail: str = "") -> TrainingDiverged:
    return TrainingDiverged(f"{what} at step {step} (lr {lr:.3g}); stopped{detail}. {run.where()}")
