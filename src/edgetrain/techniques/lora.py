"""LoRA: low-rank adapters beside frozen linear and 2-d convolution layers.

Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022, arXiv:2106.09685. A frozen weight ``W``
(out x in) gets a trainable update ``(alpha / rank) * B @ A`` with ``A`` (rank x in) and ``B`` (out x rank); ``B``
starts at zero, so the adapted model computes what the original does until it trains (Hu et al. §4.1: "We use a random
Gaussian initialization for A and zero for B"; ``A`` here is Kaiming-uniform with a = sqrt(5), as PEFT's and
``nn.Linear``'s default). For a 2-d convolution, ``A`` is a convolution with the layer's kernel, stride, padding and
dilation to ``rank`` channels and ``B`` a 1x1 convolution back (as PEFT's ``Conv2d`` LoRA layer). Everything else in
the model is frozen, except the classifier (``classifier=True``, trained whole as PEFT's ``modules_to_save``).

Acts on the op: each call of a target's ``linear``/``conv2d`` with its weight computes the frozen op (through the
frozen no-save ops, so the frozen weight's gradient is never formed and its input is not kept for it) plus the
adapter branch on the same input. What is saved for backward is the adapter's own need: the layer's input for
``A``'s gradient (after dropout, when ``dropout > 0``) and ``A``'s ``rank``-channel output for ``B``'s.
:func:`merge` (shared with KronA, :mod:`edgetrain.techniques._adapter`) folds the adapters into the weights, ``W + (alpha / rank) * B @ A`` (for convolutions the composition of
the two kernels), so the deployed model has no extra layer; merged outputs equal unmerged ones to float rounding
(tests/techniques/test_lora.py). Grouped and depthwise convolutions are refused (their update is not a product of two
small kernels in this form).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.ops import Undo
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._adapter import KINDS, Adapter, Conv, default_targets, install, merge

__all__ = ["LoRA", "delta", "merge"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Technique):
    """Low-rank adapters on linear and 2-d convolution layers; the rest of the model frozen.

    Args:
        rank: the adapters' rank ``r``. More -> more trainable parameters and saved ``r``-channel activations.
        alpha: the update is scaled by ``alpha / rank`` (Hu et al. §4.1).
        dropout: dropout on the adapter branch's input (0: none, and nothing extra saved).
        classifier: train the classifier whole (the layer of the model's last linear op), without an adapter.
        targets: layers to adapt (globs); default every linear and non-grouped conv2d layer but the classifier.
    """

    name = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, LoRA, "rank",
              f"must be an int >= 1, got {self.rank!r}")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, LoRA, "alpha", f"must be > 0, got {self.alpha!r}")
        check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, LoRA, "dropout",
              f"must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.classifier, bool), LoRA, "classifier", f"must be true/false, got {self.classifier!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``A``'s and ``B``'s shapes for the layer's weight: (r, in[, kh, kw]) and (out, r[, 1, 1])."""
    w = layer.weight
    if w.dim() == 2:
        return (rank, w.shape[1]), (w.shape[0], rank)
    return (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)


def _delta(layer: nn.Module) -> Tensor:
    """``B @ A`` in the weight's shape (for a conv: B's 1x1 kernel composed with A's kernel)."""
    return (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view_as(layer.weight)


def delta(layer: nn.Module, scale: float) -> Tensor:
    """``scale * B @ A`` in the weight's shape."""
    return scale * _delta(layer)


def _branch(layer: nn.Module, x: Tensor, conv: Conv | None) -> Tensor:
    if conv is None:
        return F.linear(F.linear(x, layer.lora_A), layer.lora_B)  # (..., r) -> (..., out)
    low = F.conv2d(x, layer.lora_A, None, conv.stride, conv.padding, conv.dilation)  # (N, r, H', W')
    return F.conv2d(low, layer.lora_B)


def _apply(model: nn.Module, cfg: LoRA, targets: list[str], structure: Structure) -> Undo:
    def make(name: str, layer: nn.Module) -> tuple[dict[str, Tensor], Adapter]:
        a_shape, b_shape = _shapes(layer, cfg.rank)
        a = torch.empty(a_shape, dtype=layer.weight.dtype, device=layer.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(b_shape, dtype=a.dtype, device=a.device)
        return {"lora_A": a, "lora_B": b}, Adapter(("lora_A", "lora_B"), cfg.scale, cfg.dropout, _branch, _delta)

    return install(model, "LoRA", cfg.classifier, cfg.targets is not None, targets, structure, make)


register(
    TechniqueInfo(
        config=LoRA,
        apply=_apply,
        summary="low-rank adapters (alpha/r * B @ A) on frozen linear and conv2d layers; merge() folds them in",
        paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022, arXiv:2106.09685",
        reduces=frozenset({"grads", "optimizer"}),
        layer_kinds=KINDS,
        default_targets=default_targets,
        looks_for="linear or dense conv2d layers",
        limits="grouped/depthwise convs are skipped (refused when named); weights read inside "
               "nn.MultiheadAttention or transformers' Conv1D (addmm) are not reached",
        # Freeze-like techniques choose another trainable set; int8_frozen would quantise the adapted weights under
        # handler ordering not tested yet
        conflicts=frozenset({"freeze", "bias_only", "sparse_update", "mobiletl", "int8_frozen", "krona",
                             "krona_block"}),
        # exact, but the adapters are new parameters the generic reference cannot name:
        # tests/techniques/test_lora.py checks every gradient against plain PyTorch in float64
        exact=False,
        grad_tolerance=0.0,
        examples=(LoRA(rank=2), LoRA(rank=4, alpha=4.0, classifier=False)),
    )
)
