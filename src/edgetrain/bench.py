"""Benchmark runner: the same model and data under several recipes, measured side by side.

Each recipe gets a fresh model (same seed), one metered training step (:func:`edgetrain.measure`), then a
short training run with a fixed schedule and an evaluation. Rows carry the fields of the measurement
contract (DESIGN.md); ``step_ratio`` divides by the ``plain`` row's step time measured in the same run.
Outputs: a markdown table, ``.json`` (provenance + rows), ``.csv`` and a PNG Pareto plot of peak memory
against accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from edgetrain import __version__
from edgetrain.apply import apply_
from edgetrain.errors import ConfigError
from edgetrain.recipe import Recipe
from edgetrain.workload import Workload

CONTRACT = ("saved_bytes", "peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "step_seconds",
            "step_ratio", "accuracy", "estimate_bytes", "train_bytes", "estimate_train_bytes")
MiB = 2**20


@dataclasses.dataclass
class BenchSpec:
    """A benchmark: one workload, one training schedule, several recipes (``plain`` is always included first)."""

    work: str
    name: str
    workload: Workload
    train: dict[str, Any]
    recipes: list[Recipe]
    paper_claims: dict[str, str]
    measure_repeats: int = 5

    @classmethod
    def load(cls, path: str | Path) -> BenchSpec:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read bench config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: Any) -> BenchSpec:
        if not isinstance(d, dict):
            raise ConfigError("bench config must be a mapping")
        known = {"work", "name", "workload", "train", "recipes", "measure_repeats"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"bench config: unknown key(s) {unknown}; known: {sorted(known)}")
        recipes, claims = [], {}
        for entry in d.get("recipes") or []:
            entry = dict(entry)
            claim = entry.pop("paper_claim", None)
            r = Recipe.from_dict(entry)
            if claim:
                claims[r.name] = claim
            recipes.append(r)
        if not any(r.name == "plain" for r in recipes):
            recipes.insert(0, Recipe(name="plain"))
        names = [r.name for r in recipes]
        if len(set(names)) != len(names):
            raise ConfigError(f"bench config: recipe names must be unique, got {names}")
        recipes.sort(key=lambda r: r.name != "plain")  # plain first: the step-time reference
        return cls(work=str(d.get("work", "custom")), name=str(d.get("name", "bench")),
                   workload=Workload.from_dict(d.get("workload") or {}), train=dict(d.get("train") or {}),
                   recipes=recipes, paper_claims=claims, measure_repeats=int(d.get("measure_repeats", 5)))


def provenance(threads: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit, date, versions, threads and CPU: attached to every results file."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edgetrain": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": cpu,
        "command": " ".join(sys.argv),
        **(extra or {}),
    }


def _estimate(model, recipe: Recipe, wl: Workload, cfg, example) -> Any:  # noqa: ANN001
    """The cost model's prediction for ``recipe`` (``None`` when a technique has no cost model)."""
    from edgetrain.cost import estimate

    opt = "adamw" if cfg.optimizer == "adamw" else ("sgd_momentum" if cfg.momentum else "sgd")
    try:
        return estimate(model, recipe, batch_size=wl.batch_size, optimizer=opt, example=example)
    except ConfigError:
        return None


def run_bench(spec: BenchSpec, *, threads: int = 2, progress: bool = True) -> dict[str, Any]:
    """Run every recipe of ``spec``; returns ``{"provenance": ..., "rows": [...]}``."""
    from edgetrain.measure import measure
    from edgetrain.train import TrainConfig, build_optimizer, train

    torch.set_num_threads(threads)
    prov = provenance(threads)  # the code that runs is the code at the start, whatever is committed meanwhile
    wl = spec.workload
    train_data, eval_data = wl.load_data("train"), wl.load_data("test")
    batch = wl.example_batch(train_data)
    cfg = TrainConfig(**{"batch_size": wl.batch_size, "seed": wl.seed, **spec.train, "threads": threads})
    rows: list[dict[str, Any]] = []
    for i, recipe in enumerate(spec.recipes):
        if progress:
            print(f"[bench {i + 1}/{len(spec.recipes)}] {recipe.name}", file=sys.stderr, flush=True)
        model = wl.build_model(train_data.num_classes)
        est = _estimate(model, recipe, wl, cfg, batch[0])
        apply_(model, recipe, batch[0])
        m = measure(model, batch, optimizer=build_optimizer(model, cfg), warmup=1, repeats=spec.measure_repeats)
        t0 = time.perf_counter()
        # already applied above; an empty recipe with its name labels the progress bar
        result = train(model, train_data, eval_data, cfg, recipe=Recipe(name=recipe.name), progress=progress)
        row = {"name": recipe.name, "techniques": recipe.technique_names, **m.to_dict()}
        row.update(accuracy=result.accuracy, train_seconds=round(time.perf_counter() - t0, 2),
                   train_bytes=m.saved_bytes + 2 * m.grad_bytes + m.optimizer_bytes,
                   estimate_bytes=est and est.saved_bytes, estimate_train_bytes=est and est.train_bytes,
                   recipe=recipe.to_dict())
        if recipe.name in spec.paper_claims:
            row["paper_claim"] = spec.paper_claims[recipe.name]
        rows.append(row)
    plain = rows[0]
    for row in rows:
        row["step_ratio"] = round(row["step_seconds"] / plain["step_seconds"], 3)
        row["saved_ratio"] = round(row["saved_bytes"] / max(plain["saved_bytes"], 1), 4)
        row["peak_ratio"] = round(row["peak_bytes"] / max(plain["peak_bytes"], 1), 4)
    extra = {"work": spec.work, "name": spec.name, "workload": wl.to_dict(), "train": dataclasses.asdict(cfg),
             "train_size": len(train_data), "eval_size": len(eval_data), "data": train_data.name}
    prov.update(extra, finished=provenance(threads)["date"])
    return {"provenance": prov, "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table (memory in MiB, ratios to ``plain``; a paper column when any row has a
    ``paper_claim``)."""
    claims = any(r.get("paper_claim") for r in result["rows"])
    head = ("| recipe | saved MiB | saved ×plain | peak MiB | peak ×plain | trainable MiB | step s | step ratio "
            "| accuracy |" + (" paper claim |" if claims else "")
            + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if claims else ""))
    lines = [head]
    for r in result["rows"]:
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
        claim = f" {r.get('paper_claim') or ''} |" if claims else ""
        lines.append(
            f"| {r['name']} | {r['saved_bytes'] / MiB:.1f} | {r['saved_ratio']:.3f} | {r['peak_bytes'] / MiB:.1f} "
            f"| {r['peak_ratio']:.3f} | {r.get('trainable_param_bytes', 0) / MiB:.2f} | {r['step_seconds']:.3f} "
            f"| {r['step_ratio']:.2f} | {acc} |{claim}"
        )
    return "\n".join(lines)


def pareto_plot(result: dict[str, Any], path: Path) -> Path:
    """PNG: peak memory (x, log) against accuracy (y); the Pareto front is drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["peak_bytes"]):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    for r in rows:
        on = r in front
        ax.scatter(r["peak_bytes"] / MiB, 100 * r["accuracy"], c="C3" if on else "C0", zorder=3)
        ax.annotate(r["name"], (r["peak_bytes"] / MiB, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if front:
        ax.step([r["peak_bytes"] / MiB for r in front], [100 * r["accuracy"] for r in front], where="post",
                c="C3", alpha=0.5, label="Pareto front")
        ax.legend(loc="lower right")
    p = result["provenance"]
    ax.set(xscale="log", xlabel="peak training-step memory (MiB, measured)", ylabel="eval accuracy (%)",
           title=f"{p.get('work', '')} {p.get('name', '')}: memory vs accuracy")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_paths(out_dir: str | Path, stem: str, *, force: bool = False) -> list[Path]:
    """``stem.{json,csv,md,png}`` in ``out_dir``; an existing results file is an error unless ``force``."""
    paths = [Path(out_dir) / f"{stem}{ext}" for ext in (".json", ".csv", ".md", ".png")]
    if not force and paths[0].exists():
        raise ConfigError(f"{paths[0]} exists: results are not overwritten (choose another --name, or --force)")
    return paths


def write_results(result: dict[str, Any], out_dir: str | Path, stem: str, *, force: bool = False) -> list[Path]:
    """Write ``stem.json``, ``.csv``, ``.md`` and ``.png`` in ``out_dir``; refuses to overwrite unless ``force``."""
    paths = result_paths(out_dir, stem, force=force)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    cols = ["name", "techniques", *CONTRACT, "saved_ratio", "peak_ratio", "trainable_param_bytes", "paper_claim"]
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, "techniques": "+".join(r["techniques"])})
    paths[2].write_text(markdown_table(result) + "\n")
    pareto_plot(result, paths[3])
    return paths
