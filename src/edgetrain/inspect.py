"""What ``edgetrain inspect`` shows: a model's derived structure and, for a recipe, what each technique targets."""

from __future__ import annotations

from typing import Any

from torch import nn

from edgetrain.errors import EdgetrainError
from edgetrain.recipe import Recipe
from edgetrain.structure import Structure, analyze


def inspect_model(model: nn.Module, example: Any, recipe: Recipe | None = None) -> tuple[Structure, list[dict]]:
    """What ``edgetrain inspect`` shows: the model's :class:`~edgetrain.structure.Structure` on ``example`` (with
    the recipe's ``blocks``/``classifier`` overrides, as :func:`edgetrain.apply_` derives it) and, for each
    technique of ``recipe``, ``{"technique", "source", "targets"}`` (the resolved targets; ``source``: the
    technique's own ``targets``, the recipe's, or the ``default``) or ``{"technique", "source", "error"}`` (the one
    line :func:`edgetrain.apply_` would raise). The model is left unchanged."""
    from edgetrain.apply import resolve_targets

    structure = analyze(model, example, recipe.blocks if recipe else None, recipe.classifier if recipe else None)
    targets = []
    for cfg in recipe.techniques if recipe else []:
        source = "technique" if cfg.targets is not None else "recipe" if recipe.targets is not None else "default"
        try:
            targets.append({"technique": cfg.name, "source": source,
                            "targets": resolve_targets(model, cfg, recipe, structure)})
        except EdgetrainError as e:
            targets.append({"technique": cfg.name, "source": source, "error": str(e)})
    return structure, targets


def format_targets(recipe_name: str, targets: list[dict]) -> str:
    """The per-technique targets of :func:`inspect_model` as text (what a technique does with its targets is its
    own: layers it acts on, or for ``freeze`` the modules that stay trainable)."""
    lines = [f"recipe {recipe_name!r}:"]
    for t in targets:
        if "error" in t:
            lines.append(f"  {t['technique']}: error: {t['error']}")
        else:
            names, kind = t["targets"], {"technique": "", "recipe": "recipe ", "default": "default "}[t["source"]]
            if names:
                what = f"{len(names)} {kind}target{'s' * (len(names) != 1)}: {', '.join(names)}"
            else:
                what = f"no {kind}targets" + (" (it chooses what it acts on from its own settings)"
                                              if t["source"] == "default" else "")
            lines.append(f"  {t['technique']}: {what}")
    return "\n".join(lines)
