"""Calibration of a classifier's probabilities: ECE, NLL, Brier score and the reliability diagram.

ECE (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017): the max softmax probability of each sample
is binned into ``bins`` equal-width confidence bins on [0, 1] (15 by default, spec algorithms_B §6.2);
``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. A confidence on a bin edge goes to the bin whose upper edge it
is (bins are (lo, hi], the first [0, hi]). NLL is the mean negative log-probability of the true class; Brier the mean
over samples of the squared L2 distance between the probability vector and the one-hot label. No temperature
scaling is applied (spec §6.4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per bin: ``count``, ``accuracy`` and ``confidence`` (0 for an empty bin) and the bins' ``edges``."""
    conf, pred = probs.max(1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = (torch.bucketize(conf.double(), edges[1:-1], right=False)).clamp(0, bins - 1)  # (lo, hi]
    count = torch.bincount(which, minlength=bins).double()
    acc = torch.bincount(which, weights=right, minlength=bins) / count.clamp_min(1)
    mean_conf = torch.bincount(which, weights=conf.double(), minlength=bins) / count.clamp_min(1)
    return {"edges": edges.tolist(), "count": count.tolist(), "accuracy": acc.tolist(), "confidence": mean_conf.tolist()}


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error (a fraction; x100 for percent)."""
    r = reliability(probs, labels, bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"])))


def metrics(probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, float]:
    """``accuracy``, ``ece``, ``nll`` and ``brier`` of ``probs`` (N, classes) against ``labels`` (N,)."""
    p = probs.double()
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).double()
    return {"accuracy": float((p.argmax(1) == labels).double().mean()), "ece": ece(p, labels, bins),
            "nll": float(-p.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()),
            "brier": float(((p - onehot) ** 2).sum(1).mean())}


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 256) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """Softmax probabilities and labels of every sample of ``data``, in eval mode (modes restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        ps, ys = [], []
        for x, y in data.batches(batch_size, shuffle=False, drop_last=False):
            ps.append(torch.softmax(model(x).double(), 1))
            ys.append(y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return torch.cat(ps), torch.cat(ys)


def reliability_plot(curves: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """A reliability diagram (accuracy per confidence bin, the diagonal is perfect calibration) of one or more
    models' :func:`reliability` data, with each model's ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--", label="perfect calibration")
    for name, r in curves.items():
        mids = [(a + b) / 2 for a, b in zip(r["edges"][:-1], r["edges"][1:])]
        keep = [i for i, c in enumerate(r["count"]) if c > 0]
        n = sum(r["count"])
        e = sum(r["count"][i] / n * abs(r["accuracy"][i] - r["confidence"][i]) for i in keep)
        ax.plot([mids[i] for i in keep], [r["accuracy"][i] for i in keep], marker="o", ms=3,
                label=f"{name} (ECE {100 * e:.2f}%)")
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
