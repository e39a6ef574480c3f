"""Freeze: train only selected layers, the last k blocks and/or the classifier.

The standard transfer-learning baseline ("fine-tune the last layers", e.g. Yosinski et al., *How
transferable are features in deep neural networks?*, NeurIPS 2014, arXiv:1411.1792). Everything outside
the trainable set gets ``requires_grad=False`` and so no gradient, no gradient buffer and no optimizer
state. Frozen convs and BatchNorms get the no-save forwards of :mod:`._frozen`: layers below the first
trainable one save nothing because nothing there requires grad; frozen layers between trainable ones save
only what the input gradient needs (stock PyTorch would save each conv's full input). Frozen BatchNorms
use their running statistics in train mode too.

Stored for backward: what the trainable layers store, plus, for frozen layers that gradients pass
through, the activation inputs of ReLU-like ops (full precision).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.apply import Undo, blocks, classifier, set_requires_grad, under
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import patch_frozen


@dataclasses.dataclass(frozen=True, kw_only=True)
class Freeze(Technique):
    """Train only a subset of the model.

    Args:
        targets: extra modules (globs) that stay trainable, with all their parameters.
        last_k_blocks: also keep the last ``k`` blocks trainable (``model.block_names``; top-level children
            otherwise). More blocks -> more saved activations, gradients and optimizer state.
        classifier: keep the final classifier trainable (``model.classifier_name``; the last Linear otherwise).
    """

    name = "freeze"
    last_k_blocks: int = 0
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.last_k_blocks, int) and self.last_k_blocks >= 0, Freeze, "last_k_blocks",
              f"must be an int >= 0, got {self.last_k_blocks!r}")
        check(isinstance(self.classifier, bool), Freeze, "classifier", f"must be true/false, got {self.classifier!r}")


def trainable_roots(model: nn.Module, cfg: Freeze, targets: list[str]) -> list[str]:
    """Module names that stay trainable under ``cfg``."""
    roots = list(targets)
    if cfg.last_k_blocks:
        bl = blocks(model)
        if cfg.last_k_blocks > len(bl):
            raise ConfigError(f"Freeze.last_k_blocks: {cfg.last_k_blocks} > the model's {len(bl)} blocks")
        roots += bl[-cfg.last_k_blocks :]
    if cfg.classifier:
        roots.append(classifier(model))
    if not roots:
        raise ConfigError("Freeze: nothing left to train (no targets, last_k_blocks=0, classifier=false)")
    return roots


def _apply(model: nn.Module, cfg: Freeze, targets: list[str]) -> Undo:
    roots = trainable_roots(model, cfg, targets)
    undo = Undo()
    frozen = [p for n, p in model.named_parameters() if not under(n.rpartition(".")[0], roots)]
    set_requires_grad(frozen, False, undo)
    modules = [n for n, _ in model.named_modules() if n and not under(n, roots)]
    patch_frozen(model, modules, undo)
    return undo


def estimate(table, cfg, targets, model) -> None:  # noqa: ANN001
    """Cost model: nothing to add. The trace already sees the frozen ``requires_grad`` flags, and the no-save
    forwards of :mod:`._frozen` keep only frozen weights (parameters, not activations)."""


register(
    TechniqueInfo(
        config=Freeze,
        apply=_apply,
        summary="train only the last k blocks / selected layers / the classifier; frozen layers save nothing",
        paper="Yosinski et al., How transferable are features in deep neural networks?, NeurIPS 2014, arXiv:1411.1792",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        default_targets=lambda model: [],
        conflicts=frozenset({"bias_only"}),
        examples=(Freeze(), Freeze(last_k_blocks=2)),
        estimate=estimate,
    )
)
