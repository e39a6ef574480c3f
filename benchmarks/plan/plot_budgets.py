"""Budget plot of a planner results file: predicted and measured peak of the training step per plan against its
budget, and accuracy.

    python benchmarks/plan/plot_budgets.py benchmarks/results/t1-plan-<date>.json   # writes ...-budget.png

``--out FILE`` writes the PNG elsewhere. Memory ticks are plain numbers (KiB); legends sit outside the axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgetrain.bench import plain_log_ticks  # noqa: E402

KiB = 1024


def figure(rows: list[dict]):  # noqa: ANN201  (a matplotlib Figure)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    for i, r in enumerate(rows):
        measured = r.get("peak_bytes_at_plan_batch", r["peak_bytes"]) / KiB
        predicted = r.get("predicted_peak_bytes")
        ax.scatter(i, measured, c="C0", zorder=3, label="measured (meter)" if i == 0 else None)
        if predicted is not None:
            first = not any(h.get_label() == "predicted" for h in ax.collections)
            ax.scatter(i, predicted / KiB, marker="x", c="C1", s=60, zorder=4, label="predicted" if first else None)
        if "budget_bytes" in r:
            first = not any(h.get_label() == "budget" for h in ax.collections)
            ax.hlines(r["budget_bytes"] / KiB, i - 0.35, i + 0.35, colors="C3", label="budget" if first else None)
        acc = r.get("accuracy")
        if acc is not None:
            ax2.bar(i, 100 * acc, color="C2")
            ax2.text(i, 100 * acc + 0.2, f"{100 * acc:.1f}", ha="center", fontsize=8)
    names = [r["name"] + (f"\n(batch {r['plan_batch']})" if r.get("plan_batch", 32) != 32 else "") for r in rows]
    for a in (ax, ax2):
        a.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="peak of the training step (KiB)",
           title="memory: budget, prediction, measurement")
    ax.autoscale_view()
    plain_log_ticks(ax.yaxis)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    accs = [100 * r["accuracy"] for r in rows if r.get("accuracy") is not None]
    if accs:
        ax2.set(ylim=(min(accs) - 3, max(accs) + 1.5))
    ax2.set(ylabel="test accuracy (%)", title="accuracy after the T1 schedule")
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a t1_budgets.py results file")
    p.add_argument("--out", default=None, help="the PNG (default: <results>-budget.png beside the results file)")
    args = p.parse_args()
    path = Path(args.results)
    rows = json.loads(path.read_text())["rows"]
    fig = figure(rows)
    out = Path(args.out) if args.out else path.with_name(path.stem + "-budget.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
