"""Per-layer densities for a global density: uniform, or Erdős–Rényi-Kernel (ERK).

ERK: Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets Winners", ICML 2020, arXiv
1911.11134, §3 ("Sparsity distribution"), after Mocanu et al. 2018's Erdős–Rényi for linear layers. A layer's
density is proportional to ``sum(shape) / prod(shape)`` of its weight ((out, in, kh, kw) for a conv: ``(out + in +
kh + kw) / (out * in * kh * kw)``; (out, in) for a linear: ``(out + in) / (out * in)``), scaled so that the total
number of nonzeros is ``density * total``; a layer whose scaled density would exceed 1 is made dense and the scale
is solved again over the rest (as the RigL paper describes; the loop is ours).
"""

from __future__ import annotations

import math

from edgetrain.errors import ConfigError

__all__ = ["DISTRIBUTIONS", "layer_densities"]

DISTRIBUTIONS = ("erk", "uniform")


def check_density(density: float, what: str = "density") -> float:
    """``density`` as a float in (0, 1], else a one-line ConfigError."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"{what}: must be a number in (0, 1] (the kept fraction of weights), got {density!r}")
    return float(density)


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, distribution: str = "erk") -> dict[str, float]:
    """Each layer's density so that ``sum(d_l * n_l) == density * sum(n_l)`` (up to rounding to whole weights).

    Args:
        shapes: layer name -> weight shape ((out, in) or (out, in, kh, kw)).
        density: the global kept fraction, in (0, 1].
        distribution: ``"erk"`` or ``"uniform"`` (every layer at ``density``).
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    if distribution == "uniform" or density == 1.0:
        return {n: density for n in shapes}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[n] for n in dense)  # nonzeros left for the sparse layers
        scale = budget / sum(raw[n] * numel[n] for n in shapes if n not in dense)
        over = {n for n in shapes if n not in dense and scale * raw[n] > 1}
        if not over:
            return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
        dense |= over
