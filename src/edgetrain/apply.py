"""Apply a :class:`~edgetrain.recipe.Recipe` to a model in place, and undo it.

``apply_(model, recipe)`` resolves each technique's layer targets (glob patterns over qualified module
names), calls the technique's registered ``apply`` and returns an :class:`Applied` handle whose
``remove()`` restores the model exactly (same parameters, same ``requires_grad`` flags, same forwards).

Techniques change modules through :func:`patch_forward` (an instance-level ``forward`` override), so
parameter names and the ``state_dict`` stay identical to the original model's: checkpoints and
pretrained weights keep loading with ``strict=True``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.recipe import Recipe, as_recipe
from edgetrain.registry import get


class Undo:
    """A removable change: a list of callbacks run in reverse order by :meth:`remove`."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def patch_forward(module: nn.Module, forward: Callable[..., Any], undo: Undo) -> None:
    """Override ``module.forward`` on this instance only; ``undo.remove()`` restores the class forward."""
    if "forward" in module.__dict__:
        raise ConfigError(f"{type(module).__name__} already has a patched forward (two techniques on one module)")
    module.forward = forward  # type: ignore[method-assign]
    undo.add(lambda: module.__dict__.pop("forward", None))


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool, undo: Undo) -> None:
    """Set ``requires_grad`` on parameters, remembering the old flags in ``undo``."""
    params = list(params)
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    undo.add(lambda: [p.requires_grad_(o) for p, o in zip(params, old)])


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _examples(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def select(model: nn.Module, patterns: Iterable[str], types: tuple[type[nn.Module], ...] = (nn.Module,)) -> list[str]:
    """Qualified names of modules matching any glob in ``patterns`` and of one of ``types``, in model order.

    A pattern that matches no module at all is an error (a typo must not silently train nothing).
    """
    names = module_names(model)
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"target {pat!r} matches no module of {type(model).__name__}; names look like {_examples(names)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen and isinstance(modules[n], types)]


def blocks(model: nn.Module) -> list[str]:
    """The model's sequential blocks in forward order: ``model.block_names`` if set, else top-level children."""
    names = getattr(model, "block_names", None)
    if names:
        return list(names)
    return [n for n, _ in model.named_children()]


def classifier(model: nn.Module) -> str:
    """The final classifier: ``model.classifier_name`` if set, else the last ``nn.Linear`` in module order."""
    name = getattr(model, "classifier_name", None)
    if name:
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear and no 'classifier_name'; give targets explicitly")
    return linears[-1]


def under(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


class Applied:
    """Handle returned by :func:`apply_`: ``remove()`` undoes everything; ``step(i)`` runs per-step hooks."""

    def __init__(self, model: nn.Module, recipe: Recipe, parts: list[tuple[str, Any]]) -> None:
        self.model = model
        self.recipe = recipe
        self.parts = parts  # (technique name, removable handle)

    def step(self, step: int) -> None:
        for _, part in self.parts:
            hook = getattr(part, "step", None)
            if hook is not None:
                hook(step)

    def remove(self) -> None:
        while self.parts:
            _, part = self.parts.pop()
            part.remove()

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Applied(recipe={self.recipe.name!r}, techniques={[n for n, _ in self.parts]})"


def resolve_targets(model: nn.Module, cfg: Any, recipe: Recipe) -> list[str]:
    """The module names a technique config acts on (its targets, the recipe's, or the technique default)."""
    info = get(cfg)
    patterns = cfg.targets if cfg.targets is not None else recipe.targets
    if patterns is not None:
        names = select(model, patterns, info.layer_types)
        if not names:
            kinds = "/".join(t.__name__ for t in info.layer_types)
            raise ConfigError(f"{type(cfg).__name__}: targets {list(patterns)} select no {kinds} module")
        return names
    if info.default_targets is not None:
        return info.default_targets(model)
    modules = dict(model.named_modules())
    return [n for n in module_names(model) if isinstance(modules[n], info.layer_types)]


def _check_conflicts(recipe: Recipe) -> None:
    names = recipe.technique_names
    for n in names:
        clash = sorted(get(n).conflicts & set(names))
        if clash:
            raise ConfigError(f"recipe {recipe.name!r}: technique {n!r} conflicts with {clash}")


def apply_(model: nn.Module, recipe: Any) -> Applied:
    """Apply a recipe (or a technique config, a list of them, a dict or a recipe file) to ``model`` in place.

    Returns an :class:`Applied` handle; ``handle.remove()`` restores the model. If a technique fails to
    apply, the ones applied before it are removed again and the error propagates.
    """
    recipe = as_recipe(recipe)
    _check_conflicts(recipe)
    parts: list[tuple[str, Any]] = []
    try:
        for cfg in recipe.techniques:
            info = get(cfg)
            parts.append((info.name, info.apply(model, cfg, resolve_targets(model, cfg, recipe))))
    except BaseException:
        Applied(model, recipe, parts).remove()
        raise
    return Applied(model, recipe, parts)
