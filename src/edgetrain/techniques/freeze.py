"""Freeze: train only selected layers, the last k blocks and/or the classifier.

The standard transfer-learning baseline ("fine-tune the last layers", e.g. Yosinski et al., *How
transferable are features in deep neural networks?*, NeurIPS 2014, arXiv:1411.1792). Everything outside
the trainable set gets ``requires_grad=False`` and so no gradient, no gradient buffer and no optimizer
state. Frozen convs and BatchNorms get the no-save ops of :mod:`._frozen`: layers below the first
trainable one save nothing because nothing there requires grad; frozen layers between trainable ones save
only what the input gradient needs (stock PyTorch would save each conv's full input). Frozen BatchNorms
use their running statistics in train mode too. Blocks and the classifier are the model's as
:mod:`edgetrain.structure` derives them (``edgetrain inspect`` shows them).

Stored for backward: what the trainable layers store, plus, for frozen layers that gradients pass
through, the activation inputs of ReLU-like ops (full precision).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import freeze_ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class Freeze(Technique):
    """Train only a subset of the model.

    Args:
        targets: extra modules (globs) that stay trainable, with all their parameters.
        last_k_blocks: also keep the last ``k`` blocks trainable (the model's blocks: ``edgetrain inspect``).
            More blocks -> more saved activations, gradients and optimizer state.
        classifier: keep the final classifier trainable (the layer of the model's last linear op, or
            ``model.classifier_name``).
    """

    name = "freeze"
    last_k_blocks: int = 0
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.last_k_blocks, int) and self.last_k_blocks >= 0, Freeze, "last_k_blocks",
              f"must be an int >= 0, got {self.last_k_blocks!r}")
        check(isinstance(self.classifier, bool), Freeze, "classifier", f"must be true/false, got {self.classifier!r}")


def last_blocks(structure: Structure, k: int, what: str) -> list[str]:
    """The last ``k`` blocks, or a one-line error."""
    if k > len(structure.blocks):
        raise ConfigError(f"{what}: {k} > the model's {len(structure.blocks)} blocks ({structure.block_source})")
    return structure.blocks[len(structure.blocks) - k:]


def head(structure: Structure, what: str) -> list[str]:
    """``[classifier]``, or a one-line error when the model has none."""
    if structure.classifier is None:
        raise ConfigError(f"{what}: {structure.model} has no linear op to call a classifier; set classifier=false "
                          "or name it (recipe 'classifier:')")
    return [structure.classifier]


def trainable_roots(cfg: Freeze, targets: list[str], structure: Structure) -> list[str]:
    """Module names that stay trainable under ``cfg``."""
    roots = list(targets)
    if cfg.last_k_blocks:
        roots += last_blocks(structure, cfg.last_k_blocks, "Freeze.last_k_blocks")
    if cfg.classifier:
        roots += head(structure, "Freeze.classifier")
    if not roots:
        raise ConfigError("Freeze: nothing left to train (no targets, last_k_blocks=0, classifier=false)")
    return roots


def freeze_outside(model: nn.Module, roots: list[str], undo: Undo) -> None:
    """Freeze every parameter outside ``roots`` and give the frozen layers their no-save ops."""
    set_requires_grad([p for n, p in model.named_parameters() if not under(n.rpartition(".")[0], roots)], False,
                      undo)
    freeze_ops(model, lambda name: not under(name, roots), undo)


def _apply(model: nn.Module, cfg: Freeze, targets: list[str], structure: Structure) -> Undo:
    undo = Undo()
    freeze_outside(model, trainable_roots(cfg, targets, structure), undo)
    return undo


register(
    TechniqueInfo(
        config=Freeze,
        apply=_apply,
        summary="train only the last k blocks / selected layers / the classifier; frozen layers save nothing",
        paper="Yosinski et al., How transferable are features in deep neural networks?, NeurIPS 2014, arXiv:1411.1792",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        default_targets=lambda model, structure: [],
        looks_for="parameters to freeze",
        conflicts=frozenset({"bias_only"}),
        examples=(Freeze(), Freeze(last_k_blocks=2)),
    )
)
