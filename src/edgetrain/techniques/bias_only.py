"""BiasOnly: update only biases (and the classifier), as in TinyTL.

Cai, Gan, Zhu, Han, *TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning*, NeurIPS
2020, arXiv:2007.11622. TinyTL observes that the weight gradient needs the layer's input activation but
the bias gradient does not (dL/db = sum of dL/dy), so freezing weights and training biases removes the
largest part of training memory. This file implements the bias-only part (not TinyTL's lite residual
modules).

What is stored for backward: frozen convs save nothing (:class:`._frozen.FrozenWeightConv`; stock PyTorch would save
each conv input), BatchNorms become the affine map ``x * s + t`` with frozen statistics and scale (nothing saved;
their ``beta`` trains), Linear layers with frozen weights save nothing (stock ``addmm``). The layers are those whose
ops read a bias (any conv, linear or norm op, whatever the module's class: :mod:`edgetrain.structure`). ReLU-like
activations still save their full fp32 output: TinyTL's 1-bit masks for them belong to the activation-compression
techniques."""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import NORM_OPS, Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import freeze_ops
from edgetrain.techniques.freeze import head

#: op kinds of layers that have a bias to train
BIASED = frozenset({"conv1d", "conv2d", "conv3d", "linear", "addmm", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"}) | NORM_OPS


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiasOnly(Technique):
    """Train biases only (plus the classifier).

    Args:
        targets: modules whose biases train (default: every conv/linear/norm layer that has a bias).
        classifier: train the final classifier's weight too (TinyTL does). Adds its weight gradient and the
            classifier input to saved activations (small).
    """

    name = "bias_only"
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.classifier, bool), BiasOnly, "classifier", f"must be true/false, got {self.classifier!r}")


def _apply(model: nn.Module, cfg: BiasOnly, targets: list[str], structure: Structure) -> Undo:
    params = dict(model.named_parameters())
    keep = {id(params[p]) for n in targets for p in structure.layers[n].params if p.rpartition(".")[2] == "bias"}
    roots = head(structure, "BiasOnly.classifier") if cfg.classifier else []
    keep |= {id(p) for n, p in params.items() if under(n.rpartition(".")[0], roots)}
    if not keep:
        raise ConfigError("BiasOnly: the targets have no biases and classifier=false: nothing would train")
    undo = Undo()
    set_requires_grad([p for p in model.parameters() if id(p) not in keep], False, undo)
    freeze_ops(model, lambda name: not under(name, roots), undo)
    return undo


register(
    TechniqueInfo(
        config=BiasOnly,
        apply=_apply,
        summary="TinyTL: train biases (+ classifier) only; frozen convs and BatchNorms save nothing",
        paper="Cai et al., TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning, "
        "NeurIPS 2020, arXiv:2007.11622",
        reduces=frozenset({"activations", "grads", "optimizer"}),
        layer_kinds=BIASED,
        looks_for="conv, linear or norm layers with a bias",
        conflicts=frozenset({"freeze"}),
        examples=(BiasOnly(), BiasOnly(classifier=False)),
    )
)
