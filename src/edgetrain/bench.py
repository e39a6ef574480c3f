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
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from edgetrain import __version__, smoke
from edgetrain.apply import apply_
from edgetrain.execution import FusedStep
from edgetrain.errors import ConfigError, TrainingDiverged
from edgetrain.recipe import Recipe
from edgetrain.train import finite
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
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a bench config (not UTF-8 text)") from None
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
        if not isinstance(d.get("recipes") or [], list):
            raise ConfigError(f"bench config: 'recipes' must be a list, got {type(d['recipes']).__name__}")
        for entry in d.get("recipes") or []:
            if not isinstance(entry, dict):
                raise ConfigError(f"bench config: each recipe must be a mapping, got {entry!r:.60}")
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
        repeats = d.get("measure_repeats", 5)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"bench config: measure_repeats must be a positive int, got {repeats!r}")
        for key in ("workload", "train"):
            if not isinstance(d.get(key) or {}, dict):
                raise ConfigError(f"bench config: {key!r} must be a mapping, got {type(d[key]).__name__}")
        workload = smoke.workload(Workload.from_dict(d.get("workload") or {}))
        recipes = [smoke.recipe(r, workload.batch_size) for r in recipes]
        return cls(work=str(d.get("work", "custom")), name=str(d.get("name", "bench")), workload=workload,
                   train=dict(d.get("train") or {}), recipes=recipes, paper_claims=claims,
                   measure_repeats=smoke.cap(repeats, smoke.REPEATS))


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
        **({"smoke": True} if smoke.active() else {}),  # a smoke run (edgetrain.smoke): its numbers mean nothing
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


def bench_row(model: torch.nn.Module, recipe: Recipe, batch, cfg, train_data, eval_data, *,  # noqa: ANN001
              repeats: int, tag: str, progress: bool = True) -> dict[str, Any]:
    """Measure one training step of ``model`` (already changed by ``recipe``, or by anything else: a PEFT model)
    and train it with ``cfg``; returns the bench row (meter, accuracy, time). ``recipe`` gives the name and the
    execution (fused step, micro-batches)."""
    from edgetrain.measure import measure
    from edgetrain.train import build_optimizer, train

    ex = recipe.execution
    opt = build_optimizer(model, cfg)
    fused = FusedStep(opt) if ex.fused_step else None
    try:
        m = measure(model, batch, optimizer=fused or opt, warmup=1, repeats=repeats, micro=ex.micro_batches, bn=ex.bn)
    finally:
        if fused is not None:
            fused.remove()
    t0 = time.perf_counter()
    try:
        # already applied; an empty recipe with its name and execution labels the progress and runs the steps
        result = train(model, train_data, eval_data, cfg, recipe=Recipe(name=recipe.name, execution=ex),
                       progress=progress)
        accuracy, diverged = result.accuracy, None
    except TrainingDiverged as e:  # one recipe's divergence is a result, not the end of the bench
        accuracy, diverged = None, str(e)
        if progress:
            print(f"{tag}: diverged: {e}", file=sys.stderr, flush=True)
    if progress:
        print(f"{tag}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    row = {"name": recipe.name, "techniques": recipe.technique_names, **m.to_dict()}
    if diverged:
        row["diverged"] = diverged
    row.update(accuracy=accuracy, train_seconds=round(time.perf_counter() - t0, 2),
               train_bytes=m.saved_bytes + 2 * m.grad_bytes + m.optimizer_bytes, recipe=recipe.to_dict(),
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return row


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's step, saved and peak against the first row's (the bench runs plain first)."""
    plain = rows[0]
    for row in rows:
        row["step_ratio"] = round(row["step_seconds"] / plain["step_seconds"], 3)
        row["saved_ratio"] = round(row["saved_bytes"] / max(plain["saved_bytes"], 1), 4)
        row["peak_ratio"] = round(row["peak_bytes"] / max(plain["peak_bytes"], 1), 4)


def run_bench(spec: BenchSpec, *, threads: int = 2, progress: bool = True) -> dict[str, Any]:
    """Run every recipe of ``spec``; returns ``{"provenance": ..., "rows": [...]}``."""
    from edgetrain.train import TrainConfig

    torch.set_num_threads(threads)
    prov = provenance(threads)  # the code that runs is the code at the start, whatever is committed meanwhile
    wl = spec.workload
    train_data, eval_data = wl.load_data("train"), wl.load_data("test")
    batch = wl.example_batch(train_data)
    cfg = TrainConfig(**{"batch_size": wl.batch_size, "seed": wl.seed, **spec.train, "threads": threads})
    rows: list[dict[str, Any]] = []

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    for i, recipe in enumerate(spec.recipes):
        tag = f"[bench {i + 1}/{len(spec.recipes)}] {recipe.name}"
        say(f"{tag}: measuring one training step ({spec.measure_repeats} timed after a warm-up)")
        model = wl.build_model(train_data.num_classes)
        est = _estimate(model, recipe, wl, cfg, batch[0])
        apply_(model, recipe, batch[0])
        row = bench_row(model, recipe, batch, cfg, train_data, eval_data, repeats=spec.measure_repeats, tag=tag,
                        progress=progress)
        row.update(estimate_bytes=est and est.saved_bytes, estimate_train_bytes=est and est.train_bytes)
        if recipe.name in spec.paper_claims:
            row["paper_claim"] = spec.paper_claims[recipe.name]
        rows.append(row)
    ratios(rows)
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


def plain_number(v: float) -> str:
    """A tick label as a plain number (``60``, ``0.5``, ``2000``), never ``6x10^1``."""
    return f"{v:.10g}"


def plain_log_ticks(axis) -> None:  # noqa: ANN001  (a matplotlib Axis)
    """Plain-number labels on a log axis: every decade, and the 2x and 5x minor ticks when the axis spans less
    than about a decade and a half (else minor ticks stay unlabelled)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    axis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v)))
    if lo > 0 and hi / lo < 30:
        def minor(v: float, _: object) -> str:
            lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
            return plain_number(v) if lead in (2, 5) else ""

        axis.set_minor_formatter(FuncFormatter(minor))
    else:
        axis.set_minor_formatter(NullFormatter())


def _overlap(a, b) -> float:  # noqa: ANN001  (two matplotlib Bboxes)
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 8,  # noqa: ANN001
                 avoid: list[list[tuple[float, float]]] = ()) -> list:
    """Annotate ``points`` (data coordinates) with ``labels`` so that no two labels overlap, no label covers a point
    or a segment of the ``avoid`` polylines, and every label stays inside the axes: each label takes the first free
    position on rings of 8 offsets of growing radius around its point; positions away from the point get a thin
    leader line. Call it after the limits and the layout are final (it works in display coordinates)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = ax.transData.transform(points) if points else []
    r = 4 * fig.dpi / 72  # marker half-width in pixels (scatter's default 6-point markers)
    taken = [Bbox.from_bounds(x - r, y - r, 2 * r, 2 * r) for x, y in px]
    for line in avoid:
        d = ax.transData.transform(line)
        taken += [Bbox([[min(a[0], b[0]) - 1, min(a[1], b[1]) - 1], [max(a[0], b[0]) + 1, max(a[1], b[1]) + 1]])
                  for a, b in zip(d[:-1], d[1:])]
    frame = ax.get_window_extent(renderer)
    rings = [(radius, math.radians(a)) for radius in (5, 12, 20, 30, 42, 56, 72, 90)
             for a in (30, -30, 150, -150, 0, 180, 90, -90)]
    out = []
    for i in sorted(range(len(points)), key=lambda i: (px[i][0], px[i][1])):
        best = None
        for radius, angle in rings:
            dx, dy = radius * math.cos(angle), radius * math.sin(angle)
            ha = "center" if abs(dx) < 1e-6 else ("left" if dx > 0 else "right")
            va = "center" if abs(dy) < 1e-6 else ("bottom" if dy > 0 else "top")
            ann = ax.annotate(labels[i], points[i], xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=fontsize, zorder=5)
            box = ann.get_window_extent(renderer).padded(2)
            outside = box.width * box.height - _overlap(box, frame)
            cost = sum(_overlap(box, t) for t in taken) + outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box, radius)
            else:
                ann.remove()
            if cost == 0:
                break
        _, ann, box, radius = best
        if radius > 12:
            ann.remove()
            ann = ax.annotate(labels[i], points[i], xytext=ann.get_position(), textcoords="offset points",
                              ha=ann.get_ha(), va=ann.get_va(), fontsize=fontsize, zorder=5,
                              arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 3})
        taken.append(box)
        out.append(ann)
    return out


def pareto_figure(result: dict[str, Any]):  # noqa: ANN201  (a matplotlib Figure)
    """Peak memory (x, log, plain-number ticks) against accuracy (y); the Pareto front as a step line; labels
    placed without overlaps; the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["peak_bytes"]):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    xy = [(r["peak_bytes"] / MiB, 100 * r["accuracy"]) for r in rows]
    on = [r in front for r in rows]
    if any(on):
        ax.scatter(*zip(*[p for p, f in zip(xy, on) if f]), c="C3", zorder=3, label="on the Pareto front")
    if not all(on):
        ax.scatter(*zip(*[p for p, f in zip(xy, on) if not f]), c="C0", zorder=3, label="dominated")
    if front:
        ax.step([r["peak_bytes"] / MiB for r in front], [100 * r["accuracy"] for r in front], where="post",
                c="C3", alpha=0.5, label="Pareto front")
    p = result["provenance"]
    ax.set(xscale="log", xlabel="peak training-step memory (MiB, measured)", ylabel="eval accuracy (%)",
           title=f"{p.get('work', '')} {p.get('name', '')}: memory vs accuracy")
    ax.margins(x=0.12, y=0.12)
    ax.autoscale_view()
    plain_log_ticks(ax.xaxis)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    corners = [  # the step line's corners(front[0]["peak_bytes"] / MiB, 100 * front[0]["accuracy"])] + [
        (b["peak_bytes"] / MiB, 100 * y) for a, b in zip(front, front[1:]) for y in (a["accuracy"], b["accuracy"])
    ] if front else []
    place_labels(ax, xy, [r["name"] for r in rows], avoid=[corners] if len(corners) > 1 else [])
    return fig


def pareto_plot(result: dict[str, Any], path: Path) -> Path:
    """PNG of :func:`pareto_figure`."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(result)
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
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")  # strict: null, not NaN
    except OSError as e:
        raise ConfigError(f"--out {paths[0].parent}: cannot write results ({e.strerror or e})") from None
    cols = ["name", "techniques", *CONTRACT, "saved_ratio", "peak_ratio", "trainable_param_bytes", "paper_claim"]
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, "techniques": "+".join(r["techniques"])})
    paths[2].write_text(markdown_table(result) + "\n")
    pareto_plot(result, paths[3])
    return paths
