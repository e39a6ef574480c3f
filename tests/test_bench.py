"""Bench output and the benchmark scripts of issue 11: Pareto plots (labels that do not overlap, the legend off the
points, plain tick numbers), train_t2's short runs, t1_budgets' refusal of existing results."""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.text import Text  # noqa: E402

from edgetrain.bench import pareto_figure, plain_number  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLAIN = re.compile(r"^(|-?[0-9]+(\.[0-9]+)?)$")  # a plain number (or an unlabelled tick)


def overlap(a, b) -> bool:  # noqa: ANN001
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def tick_labels(axis) -> list[str]:  # noqa: ANN001
    return [t.get_text().replace("\u2212", "-") for t in axis.get_ticklabels(which="both") if t.get_visible()]


@pytest.mark.parametrize("name", ["t1-gf-2026-11-27", "t1-core-2026-11-24", "t1-compress-2026-11-24"])
def test_pareto_labels_do_not_overlap_and_the_legend_is_off_the_points(name):
    """Issue 11.8: t1-gf-2026-11-27.png had its legend over points, overlapping labels and ticks reading 6x10^1."""
    result = json.loads((RESULTS / f"{name}.json").read_text())
    fig = pareto_figure(result)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, not its leader line
    assert len(labels) == sum(r.get("accuracy") is not None for r in result["rows"])
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not overlap(a, b), (a, b)
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in labels)
    points = ax.transData.transform([(r["peak_bytes"] / 2**20, 100 * r["accuracy"]) for r in result["rows"]
                                     if r.get("accuracy") is not None])
    for box in labels:
        assert not any(box.x0 < x < box.x1 and box.y0 < y < box.y1 for x, y in points)
    legend = ax.get_legend().get_window_extent(renderer)
    assert not overlap(legend, frame)  # outside the axes: over no point, no label
    ticks = tick_labels(ax.xaxis)
    assert all(PLAIN.match(t) for t in ticks) and any(ticks), ticks


def test_plain_numbers():
    assert [plain_number(v) for v in (60.0, 0.5, 2000.0, 1e6, 59.999999999999)] == ["60", "0.5", "2000", "1000000",
                                                                                    "60"]


def _script(path: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, list(sys.path)
    sys.argv, sys.path[0:0] = [path, *args], [str((ROOT / path).parent)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / path), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved
    return code, out.getvalue(), err.getvalue()


def test_plot_budgets_writes_where_asked_with_plain_ticks_and_the_legend_outside(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "plan"))
    try:
        import plot_budgets
    finally:
        sys.path.pop(0)
    rows = json.loads((RESULTS / "t1-plan-2026-11-27.json").read_text())["rows"]
    fig = plot_budgets.figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert not overlap(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    assert all(PLAIN.match(t) for t in tick_labels(ax.yaxis))
    code, out, _ = _script("benchmarks/plan/plot_budgets.py", str(RESULTS / "t1-plan-2026-11-27.json"), "--out",
                           str(tmp_path / "b.png"))
    assert code == 0 and (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs Fashion-MNIST")
def test_train_t2_runs_fewer_steps_than_its_curve_interval(tmp_path):
    """Issue 11.1: `train_t2.py --steps 5` failed in plot (an empty loss curve: not enough values to unpack)."""
    code, _, err = _script("benchmarks/approx/train_t2.py", "--steps", "5", "--batch-size", "16", "--models",
                           "lenet5", "--multipliers", "fp32", "--eval-subset", "16", "--eval-every", "100",
                           "--out", str(tmp_path / "t2"))
    assert code == 0, err
    rows = json.loads((tmp_path / "t2.json").read_text(), parse_constant=lambda c: pytest.fail(c))["rows"]
    assert rows[0]["loss_curve"][-1][0] == 5 and (tmp_path / "t2.png").stat().st_size > 1000


def test_t1_budgets_refuses_existing_results_in_one_line_and_has_force(tmp_path):
    """Issue 11.1: t1_budgets.py refused an existing name with a traceback and had no --force."""
    (tmp_path / "t1-x.json").write_text("{}")
    code, _, err = _script("benchmarks/plan/t1_budgets.py", "--out", str(tmp_path), "--name", "x", "--threads", "1")
    assert code == 2 and err.strip().startswith("edgetrain: error:") and "exists" in err and "\n" not in err.strip()
    assert "--force" in (ROOT / "benchmarks" / "plan" / "t1_budgets.py").read_text()
