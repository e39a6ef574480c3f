"""Apply a :class:`~edgetrain.recipe.Recipe` to a model in place, check it, and undo it.

``apply_(model, recipe, example)``:

1. traces one forward of ``example`` (:mod:`edgetrain.structure`): the model's layers, activations, blocks and
   classifier as its ops show them, not as its module classes suggest;
2. resolves each technique's targets (globs over qualified module names, filtered to the op kinds the technique
   acts on) and calls its registered ``apply``; techniques act on the torch functions the targets call
   (:mod:`edgetrain.ops`), so subclasses with their own ``forward`` and functional activations are covered;
3. **checks** the result on ``example`` in eval mode: the output equals the model's own (lossless techniques) or
   stays within the technique's stated bound, and every technique did something (changed trainable flags or
   parameters, or handled at least one op); otherwise it undoes everything and raises one line.

The returned :class:`Applied` handle's ``remove()`` restores the model exactly (same parameters, flags and
forwards). Parameter names and the ``state_dict`` stay the model's own (checkpoints and pretrained weights keep
loading with ``strict=True``), except where a technique owns new parameters (documented on it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.inputs import call_model, example_for, take, tensors
from edgetrain.ops import Undo
from edgetrain.recipe import Recipe, as_recipe
from edgetrain.registry import get
from edgetrain.structure import Structure, analyze

__all__ = ["Applied", "Undo", "apply_", "patch_forward", "select", "set_requires_grad", "under"]


def patch_forward(module: nn.Module, forward: Callable[..., Any], undo: Undo) -> None:
    """Override ``module.forward`` on this instance only, wrapping (never re-implementing) what it computes;
    ``undo.remove()`` restores the class forward."""
    if "forward" in module.__dict__:
        raise ConfigError(f"{type(module).__name__} already has a patched forward (two techniques on one module)")
    module.forward = forward  # type: ignore[method-assign]
    undo.add(lambda: module.__dict__.pop("forward", None))


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool, undo: Undo) -> None:
    """Set ``requires_grad`` on parameters, remembering the old flags in ``undo`` (flips count as changes)."""
    params = list(params)
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    undo.changes += sum(o != flag for o in old)
    undo.add(lambda: [p.requires_grad_(o) for p, o in zip(params, old)])


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _examples(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def select(model: nn.Module, patterns: Iterable[str], kinds: frozenset[str] | None = None,
           structure: Structure | None = None) -> list[str]:
    """Qualified names of modules matching any glob in ``patterns`` (and, with ``kinds``, that are layers of one
    of those op kinds in ``structure``), in model order.

    A pattern that matches no module at all is an error (a typo must not silently train nothing).
    """
    names = module_names(model)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"target {pat!r} matches no module of {type(model).__name__}; names look like {_examples(names)}"
            )
        chosen.update(hits)
    if kinds is not None:
        layers = structure.layers if structure is not None else {}
        chosen = {n for n in chosen if n in layers and layers[n].kind in kinds}
    return [n for n in names if n in chosen]


def under(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


class Applied:
    """Handle returned by :func:`apply_`: ``remove()`` undoes everything; ``step(i)`` runs per-step hooks."""

    def __init__(self, model: nn.Module, recipe: Recipe, parts: list[tuple[str, Any]],
                 structure: Structure | None = None) -> None:
        self.model = model
        self.recipe = recipe
        self.parts = parts  # (technique name, removable handle)
        self.structure = structure

    def step(self, step: int) -> None:
        for _, part in self.parts:
            hook = getattr(part, "step", None)
            if hook is not None:
                hook(step)

    def remove(self) -> None:
        while self.parts:
            _, part = self.parts.pop()
            part.remove()

    def _stateful(self) -> dict[str, Any]:
        return {f"{i}:{name}": part for i, (name, part) in enumerate(self.parts)
                if callable(getattr(part, "state_dict", None))}

    def state_dict(self) -> dict[str, Any]:
        """What the applied techniques own beyond the model's parameters and buffers (RNG streams, noise pools,
        adaptive bounds, counters), keyed ``"<index>:<technique>"`` in recipe order: what a checkpoint must hold
        for a resumed run to continue exactly as an uninterrupted one.

        Protocol: a technique's handle (what its registered ``apply`` returns) that owns such state implements
        ``state_dict() -> dict`` (tensors and plain data only) and ``load_state_dict(d)``; handles without them
        own none."""
        return {key: part.state_dict() for key, part in self._stateful().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (for the same recipe, applied to the same model)."""
        from edgetrain.errors import CheckpointError

        own = self._stateful()
        if not isinstance(state, dict) or set(state) != set(own):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"technique state for {found} does not fit recipe {self.recipe.name!r} "
                                  f"(its stateful techniques: {sorted(own)})")
        for key, part in own.items():
            try:
                part.load_state_dict(state[key])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
                raise CheckpointError(f"technique {key}: saved state does not fit ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Applied(recipe={self.recipe.name!r}, techniques={[n for n, _ in self.parts]})"


def resolve_targets(model: nn.Module, cfg: Any, recipe: Recipe, structure: Structure) -> list[str]:
    """The module names a technique config acts on (its targets, the recipe's, or the technique default)."""
    info = get(cfg)
    patterns = cfg.targets if cfg.targets is not None else recipe.targets
    if patterns is not None:
        names = select(model, patterns, info.layer_kinds, structure)
        if not names:
            kinds = "/".join(sorted(info.layer_kinds or ()))
            raise ConfigError(f"{type(cfg).__name__}: targets {list(patterns)} select no {kinds} layer "
                              f"(`edgetrain inspect` shows what each module computes)")
        return names
    if info.default_targets is not None:
        return info.default_targets(model, structure)
    if info.layer_kinds is None:
        return module_names(model)
    return structure.layers_of(info.layer_kinds)


def _check_conflicts(recipe: Recipe) -> None:
    names = recipe.technique_names
    for n in names:
        clash = sorted(get(n).conflicts & set(names))
        if clash:
            raise ConfigError(f"recipe {recipe.name!r}: technique {n!r} conflicts with {clash}")


def _eval_output(model: nn.Module, inputs: Any, grad: bool) -> list[torch.Tensor]:
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            return [t.detach() for t in tensors(call_model(model, inputs)) if t.is_floating_point()]
    finally:
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(rng)


def _relative_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(out, ref))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / max(den, 1e-300)) ** 0.5


def _check(model: nn.Module, recipe: Recipe, parts: list[tuple[str, Any]], inputs: Any,
           ref: list[torch.Tensor]) -> None:
    out = _eval_output(model, inputs, grad=True)
    for cfg, (name, part) in zip(recipe.techniques, parts):
        if getattr(part, "changes", 1) + getattr(part, "hits", 1) == 0:
            raise ConfigError(f"{type(cfg).__name__}: found nothing to act on in {type(model).__name__} "
                              f"(it looks for {get(name).looks_for}); `edgetrain inspect` shows the model's layers")
    bound = max(get(cfg).forward_bound(cfg) for cfg in recipe.techniques)
    floor = 1e-9 if all(t.dtype == torch.float64 for t in ref) else 1e-4  # float rounding of reordered ops
    if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
        what = f"output shapes {[tuple(t.shape) for t in out]} instead of {[tuple(t.shape) for t in ref]}"
    elif not all(bool(torch.isfinite(t).all()) for t in out) and all(bool(torch.isfinite(t).all()) for t in ref):
        what = "non-finite outputs"
    else:
        err = _relative_error(out, ref)
        if err <= max(bound, floor):
            return
        what = f"relative error {err:.3g}"
    limit = "is lossless" if bound == 0 else (f"states a bound of {bound:g}" if bound < float("inf") else
                                            "may change its values by design, not its shapes")
    raise ConfigError(f"recipe {recipe.name!r} changes what {type(model).__name__} computes in eval mode ({what}) "
                      f"although {limit}; not applied")


def apply_(model: nn.Module, recipe: Any, example: Any = None, *, check: bool = True) -> Applied:
    """Apply a recipe (or a technique config, a list of them, a dict or a recipe file) to ``model`` in place.

    Args:
        model: any ``nn.Module``.
        recipe: what to apply.
        example: model inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs; a few samples
            are enough) to trace the model's structure on and to check the result with. Default: a random input
            of ``model.default_input_size`` (the built-in models have one); other models must pass it.
        check: verify on ``example`` that the eval-mode output is unchanged (or within the techniques' stated
            bound) and that every technique acted; raises :class:`~edgetrain.ConfigError` otherwise.

    Returns an :class:`Applied` handle; ``handle.remove()`` restores the model. If a technique fails to apply or
    the check fails, what was applied is removed again and the error propagates.
    """
    recipe = as_recipe(recipe)
    _check_conflicts(recipe)
    if not recipe.techniques:
        return Applied(model, recipe, [])
    if example is None:
        example = example_for(model)
    if example is None:
        raise ConfigError(f"apply_: pass example= (a few model inputs) for {type(model).__name__}: edgetrain traces "
                          "one forward to see which ops the model calls, and checks the result on it")
    inputs = take(example, 2)
    structure = analyze(model, inputs, recipe.blocks, recipe.classifier)
    ref = _eval_output(model, inputs, grad=False) if check else []
    parts: list[tuple[str, Any]] = []
    try:
        for cfg in recipe.techniques:
            info = get(cfg)
            targets = resolve_targets(model, cfg, recipe, structure)
            parts.append((info.name, info.apply(model, cfg, targets, structure)))
        if check:
            _check(model, recipe, parts, inputs, ref)
    except BaseException:
        Applied(model, recipe, parts).remove()
        raise
    return Applied(model, recipe, parts, structure)
