"""Logic Shrinkage: learned fan-in pruning of LUT inputs (saliency, global ranking, shrinkage map, LUT statistics).

Wang, Zhang, Cheung, Constantinides, Davis, *Logic Shrinkage: Learned FPGA Netlist Sparsity for Efficient Neural
Network Inference*, FPGA 2022, arXiv:2112.02346; spec ``algorithms_B`` section 9.2 steps 3-5. Facts from the public
code ``awai54st/Logic-Shrinkage`` (``MNIST-SVHN-CIFAR10/training-software/logic_shrinkage.py``); the code is ours.

* **Saliency** of input ``k`` of a LUT: ``sum |c_p - c_q|`` over the address pairs ``(p, q)`` that differ only in
  bit ``k`` (weight ``2**(K-1-k)``), summed over the residual levels: how much the LUT output can change when input
  ``k`` flips. Inputs of pruned LUTs score -1 (public code).
* **Global ranking within a layer** to an input sparsity ``delta``: of the ``K * n_alive`` inputs of the layer's
  unpruned LUTs, the ``round(delta * K * n_alive)`` least salient are removed (public code: rank below
  ``K * n_pruned + (max_rank - K * n_pruned) * delta``, the same up to one input).
* **Removal** forgets input ``k`` by averaging the table over bit ``k``: ``c <- c @ M_k`` with
  ``M_k = I_{2^k} kron (1/2 [[1,1],[1,1]] kron I_{2^(K-1-k)})``; the composite map is the product over removed
  inputs (the ``M_k`` commute). A LUT whose K inputs are all removed is pruned (node mask 0).

Our choices (differences from the public code): the saliency is computed on the *shrunk* latent table (the public
code reads the raw latent table), and inputs removed at an earlier stage are ranked first, so removal is monotone
across the staged schedule (the public code recomputes the mask from scratch at each stage, which can in principle
restore an input). The averaging is applied as a masked mean per bit (cheap for ``in * out`` LUTs) rather than a
batched ``(2**K x 2**K)`` matmul per LUT; :func:`shrinkage_map` gives the matrix, and the tests check they agree.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor

from edgetrain.errors import ConfigError
from edgetrain.lut.layer import LUTLayer, check_k

__all__ = ["average_out", "check_delta", "layer_stats", "saliency", "select_removals", "shrink_", "shrinkage_map"]


def check_delta(delta: object) -> float:
    """``delta`` as a float if it is a number in ``[0, 1)``; else a one-line :class:`ConfigError`."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1 \
            or not math.isfinite(delta):
        raise ConfigError(f"Logic Shrinkage delta: must be a number in [0, 1) (the fraction of LUT inputs removed), "
                          f"got {delta!r}")
    return float(delta)


def shrinkage_map(k: int, removed: Tensor | list[bool]) -> Tensor:
    """The ``(2**K, 2**K)`` float64 matrix ``prod_{k removed} M_k`` that averages a table row over removed inputs.

    Args:
        k: inputs per LUT.
        removed: ``K`` booleans, input ``i`` removed or not (input 0 is the anchor, the address's top bit).
    """
    k = check_k(k)
    removed = torch.as_tensor(removed, dtype=torch.bool)
    if tuple(removed.shape) != (k,):
        raise ConfigError(f"shrinkage_map: removed has shape {tuple(removed.shape)}, expected ({k},)")
    half = torch.full((2, 2), 0.5, dtype=torch.float64)
    out = torch.eye(2 ** k, dtype=torch.float64)
    for i in range(k):
        if removed[i]:
            m = torch.kron(torch.eye(2 ** i, dtype=torch.float64),
                           torch.kron(half, torch.eye(2 ** (k - 1 - i), dtype=torch.float64)))
            out = out @ m
    return out


def _bit_view(table: Tensor, bit: int, k: int) -> Tensor:
    """``table (L, 2**K, *rest)`` viewed as ``(L, 2**bit, 2, 2**(K-1-bit), *rest)``: dim 2 is input ``bit``."""
    return table.reshape(table.shape[0], 2 ** bit, 2, 2 ** (k - 1 - bit), *table.shape[2:])


def average_out(table: Tensor, removed: Tensor) -> Tensor:
    """``table`` with each LUT's removed inputs averaged out (``c @ shrinkage_map`` per LUT), differentiably.

    Args:
        table: ``(levels, 2**K, *luts)`` coefficients.
        removed: ``(K, *luts)`` booleans.
    """
    k = removed.shape[0]
    if table.shape[1] != 2 ** k or tuple(table.shape[2:]) != tuple(removed.shape[1:]):
        raise ConfigError(f"average_out: table {tuple(table.shape)} does not match removed {tuple(removed.shape)} "
                          "(expected table (levels, 2**K, *luts) and removed (K, *luts))")
    if not bool(removed.any()):
        return table
    for bit in range(k):
        if not bool(removed[bit].any()):
            continue
        v = _bit_view(table, bit, k)
        mean = v.mean(dim=2, keepdim=True).expand_as(v)
        table = torch.where(removed[bit], mean, v).reshape(table.shape)
    return table


def saliency(table: Tensor) -> Tensor:
    """Per-input saliency ``(K, *luts)`` of ``table (levels, 2**K, *luts)``: sum over the levels and over the
    address pairs differing only in bit ``k`` of ``|c_p - c_q|``."""
    p = table.shape[1]
    k = p.bit_length() - 1
    if p < 2 or 2 ** k != p:
        raise ConfigError(f"saliency: table dim 1 must be 2**K entries, got {p}")
    out = []
    for bit in range(k):
        v = _bit_view(table, bit, k)
        out.append((v[:, :, 0] - v[:, :, 1]).abs().sum(dim=(0, 1, 2)))
    return torch.stack(out)


def select_removals(scores: Tensor, alive: Tensor, already: Tensor, delta: float) -> Tensor:
    """The inputs to remove in one layer: ``(K, *luts)`` bool.

    Of the ``K * alive.sum()`` inputs of alive LUTs, the ``round(delta * K * n_alive)`` lowest-ranked are removed:
    inputs in ``already`` first (removal is monotone), then by ascending ``scores`` (ties: lower flat index first).
    Inputs of dead LUTs are never selected. ``already`` inputs beyond the quota stay removed.
    """
    delta = check_delta(delta)
    k = scores.shape[0]
    alive_in = alive.unsqueeze(0).expand_as(scores)
    n_quota = round(delta * k * int(alive.sum()))
    key = torch.where(already, torch.full_like(scores, -1.0), scores.clamp_min(0)).double()
    key = torch.where(alive_in, key, torch.full_like(key, math.inf)).flatten()
    order = torch.sort(key, stable=True).indices[:n_quota]
    chosen = torch.zeros(key.numel(), dtype=torch.bool)
    chosen[order] = True
    return (chosen.view_as(scores) | already) & alive_in


@torch.no_grad()
def shrink_(layer: LUTLayer, delta: float) -> dict:
    """Shrink ``layer`` in place to input sparsity ``delta``; LUTs left with no input are pruned. Returns stats."""
    if not isinstance(layer, LUTLayer):
        raise ConfigError(f"shrink_: expected an edgetrain.lut.LUTLayer, got {type(layer).__name__}")
    delta = check_delta(delta)
    alive = layer.node_mask > 0
    scores = saliency(layer.shrunk_table())
    removed = select_removals(scores, alive, layer.removed & alive, delta)
    layer.removed.copy_(removed | layer.removed)
    layer.node_mask.mul_((~layer.removed.all(dim=0)).to(layer.node_mask.dtype))
    return layer_stats(layer)


def layer_stats(layer: LUTLayer) -> dict:
    """LUT count, learned-K histogram and parameter count ``sum 2**K_i * levels`` of one layer's unpruned LUTs;
    ``anchor_kept``: LUTs still reading their anchor; ``k1_anchor_only``: 1-input LUTs whose input is the anchor (a
    LUT of the BNN's own connection alone)."""
    alive = layer.node_mask > 0
    k_i = layer.lut_inputs().sum(dim=0)[alive]  # inputs per alive LUT
    hist = Counter(int(v) for v in k_i.tolist())
    single = k_i == 1
    anchor = layer.lut_inputs()[0][alive]  # the anchor (the BNN's own connection) still read
    return {"luts": int(alive.sum()), "k_hist": {str(k): hist.get(k, 0) for k in range(layer.k + 1)},
            "params": int(((2 ** k_i) * layer.levels).sum()), "inputs": int(k_i.sum()),
            "anchor_kept": int(anchor.sum()), "k1_anchor_only": int((single & anchor).sum()),
            "input_sparsity": 1 - float(k_i.sum()) / max(1, layer.k * int(alive.sum()))}
