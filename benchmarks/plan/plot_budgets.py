"""Budget plot of a planner results file: predicted and measured trainable-state + activation bytes per plan
against its budget, and accuracy.

    python benchmarks/plan/plot_budgets.py benchmarks/results/t1-plan-<date>.json   # writes ...-budget.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KiB = 1024


def main() -> None:
    path = Path(sys.argv[1])
    rows = json.loads(path.read_text())["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):
        measured = r.get("train_bytes_at_plan_batch", r["train_bytes"]) / KiB
        predicted = r.get("predicted_train_bytes", r["estimate_train_bytes"]) / KiB
        ax.scatter(i, measured, c="C0", zorder=3, label="measured (meter)" if i == 0 else None)
        ax.scatter(i, predicted, marker="x", c="C1", s=60, zorder=4, label="predicted (cost model)" if i == 0 else None)
        if "budget_bytes" in r:
            ax.hlines(r["budget_bytes"] / KiB, i - 0.35, i + 0.35, colors="C3", label="budget" if "budget" not in
                      [h.get_label() for h in ax.collections] else None)
        ax2.bar(i, 100 * r["accuracy"], color="C2")
        ax2.text(i, 100 * r["accuracy"] + 0.2, f"{100 * r['accuracy']:.1f}", ha="center", fontsize=8)
    names = [r["name"] + (f"\n(batch {r['plan_batch']})" if r.get("plan_batch", 32) != 32 else "") for r in rows]
    for a in (ax, ax2):
        a.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="trainable weights + grads + optimizer + saved (KiB)",
           title="memory: budget, prediction, measurement")
    ax.legend(fontsize=8, loc="lower left")
    lo = min(100 * r["accuracy"] for r in rows)
    ax2.set(ylim=(lo - 3, 100 * max(r["accuracy"] for r in rows) + 1.5), ylabel="test accuracy (%)",
            title="accuracy after the T1 schedule")
    fig.tight_layout()
    out = path.with_name(path.stem + "-budget.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
