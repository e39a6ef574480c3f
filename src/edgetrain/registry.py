"""The technique registry: config type -> behaviour and capability metadata.

Each technique module ends with one :func:`register` call. Registering enrols the technique in the
shared conformance tests (``tests/test_conformance.py``) and makes it visible to recipes, the CLI
(``edgetrain ls``) and, later, the planner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.technique import Technique

#: What a technique may reduce. A technique lists the subset it really reduces (as measured).
REDUCIBLE = frozenset({"activations", "weights", "grads", "optimizer", "compute"})


@dataclasses.dataclass(frozen=True)
class TechniqueInfo:
    """Behaviour and capabilities of one technique.

    Args:
        config: the frozen dataclass config type (its ``name`` is the registry key).
        apply: ``apply(model, cfg, targets, structure) -> Undo``; ``targets`` are the resolved qualified module
            names (already filtered to ``layer_kinds``), ``structure`` what :mod:`edgetrain.structure` derived from
            the model's ops. Changes the model in place, acting on the ops it calls (:mod:`edgetrain.ops`).
        summary: one line for ``edgetrain ls``.
        paper: citation (title, venue, arXiv id).
        reduces: subset of :data:`REDUCIBLE`.
        layer_kinds: op kinds (``conv2d``, ``linear``, ``batch_norm``, ...) of the layers the technique acts on:
            glob targets are filtered to modules whose weight feeds such an op (a target set with none is an
            error); ``None``: any module (a scope, e.g. for compressing what it saves).
        default_targets: ``fn(model, structure) -> list[str]`` used when neither the config nor the recipe gives
            targets (default: every layer of ``layer_kinds``, or every module).
        looks_for: what it acts on, for the one-line error when it finds nothing in a model.
        limits: one line on the models it refuses or cannot reach (``edgetrain ls`` prints it).
        remove_tolerance: relative error of the parameters ``remove()`` gives back (0: bit for bit). A technique that
            stores weights in another form (int8 master weights, fp16) without keeping a copy of the originals
            states the rounding it leaves.
        forward_bound: ``fn(cfg) -> float``: the relative L2 change of the eval-mode output the technique may
            cause by design (0: lossless, checked to float rounding by :func:`edgetrain.apply_`).
        conflicts: names of techniques that cannot be combined with this one on the same module.
        step_hook: the handle has a per-step ``step(step)`` hook the training loop must call.
        loss_term: the handle adds a loss term (``handle.loss``).
        exact: gradients of the parameters it leaves trainable equal plain PyTorch's exactly (up to float
            rounding); lossy techniques set ``grad_tolerance`` instead.
        grad_tolerance: stated relative error bound for lossy techniques (conformance tests use it).
        grad_cosine: the lowest cosine between its gradients and plain PyTorch's (same trainable set) that it states
            for one training step of every model of the foreign zoo (:mod:`edgetrain.testing.zoo`, batch 4;
            ``tests/test_zoo.py`` holds it). Exact techniques: 1.0, held to a relative error of 1e-4 in float32.
        estimate: ``estimate(table, cfg, targets, model, structure)``: corrects the traced cost table where the
            trace cannot see the technique's effect (e.g. backward multiply-adds of a changed backward); ``None``
            when the trace sees everything (:mod:`edgetrain.cost`).
        traceable: what it saves is predicted by tracing a stand-in input (``False`` when it depends on the data).
        examples: configs the conformance suite applies to a tiny model.
        example_model: ``fn(dtype) -> nn.Module`` building the small seeded model (inputs like
            :func:`edgetrain.testing.tiny_batch`'s) the conformance suite applies the examples to; default
            :func:`edgetrain.testing.tiny_model`. For techniques that only apply to some networks (binary nets).
    """

    config: type[Technique]
    apply: Callable[[nn.Module, Any, list[str], Any], Any]
    summary: str
    paper: str
    reduces: frozenset[str]
    layer_kinds: frozenset[str] | None = None
    default_targets: Callable[[nn.Module, Any], list[str]] | None = None
    looks_for: str = "layers it supports"
    limits: str = ""
    forward_bound: Callable[[Any], float] = lambda cfg: 0.0
    remove_tolerance: float = 0.0
    conflicts: frozenset[str] = frozenset()
    step_hook: bool = False
    loss_term: bool = False
    exact: bool = True
    grad_tolerance: float = 0.0
    grad_cosine: float = 1.0
    estimate: Callable[..., Any] | None = None
    traceable: bool = True
    examples: tuple[Technique, ...] = ()
    example_model: Callable[[Any], nn.Module] | None = None

    @property
    def name(self) -> str:
        return self.config.name


_REGISTRY: dict[str, TechniqueInfo] = {}


def register(info: TechniqueInfo) -> TechniqueInfo:
    """Add a technique; validates the name and metadata at import time."""
    name = info.config.name
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"technique name must be a lower-case identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name].config is not info.config:
        raise ValueError(f"technique {name!r} is registered twice")
    if not info.reduces <= REDUCIBLE:
        raise ValueError(f"{name}: reduces {sorted(info.reduces - REDUCIBLE)} not in {sorted(REDUCIBLE)}")
    _REGISTRY[name] = info
    return info


def _ensure_loaded() -> None:
    import edgetrain.techniques  # noqa: F401  (importing registers every built-in technique)


def get(key: str | Technique | type[Technique]) -> TechniqueInfo:
    """The :class:`TechniqueInfo` of a name, a config or a config type; unknown -> ConfigError."""
    _ensure_loaded()
    name = key if isinstance(key, str) else key.name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown technique {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_techniques() -> list[TechniqueInfo]:
    """All registered techniques, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def config_from_dict(d: dict[str, Any]) -> Technique:
    """Inverse of ``Technique.to_dict``; unknown types or fields -> ConfigError naming them."""
    if not isinstance(d, dict) or "type" not in d:
        raise ConfigError(f"technique entry must be a mapping with a 'type' key, got {d!r}")
    fields = dict(d)
    cls = get(str(fields.pop("type"))).config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**fields)
    except TypeError as e:  # e.g. a list where a number belongs
        raise ConfigError(f"{cls.__name__}: {e}") from None
