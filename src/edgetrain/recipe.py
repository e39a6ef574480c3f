"""Recipe: an ordered list of technique configs with layer targets, as plain data.

A recipe written by hand and one returned by the planner are the same object. It round-trips through
JSON and YAML::

    name: classifier-only
    targets: null            # default targets for techniques that give none
    techniques:
      - type: freeze
        classifier: true
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from edgetrain.errors import ConfigError
from edgetrain.registry import config_from_dict, get
from edgetrain.technique import Technique, _as_patterns


@dataclasses.dataclass(frozen=True)
class Execution:
    """How each training step runs (:mod:`edgetrain.execution`); the defaults are an ordinary step.

    Args:
        micro_batches: micro-batches per optimizer step (gradient accumulation); saved activations and transient
            buffers scale with the micro-batch.
        fused_step: update each parameter in the backward as soon as its gradient is complete and free it
            (SGD/AdamW; not with gradient clipping).
        bn: BatchNorm statistics over micro-batches: ``micro`` (each micro-batch its own) or ``frozen`` (running
            statistics: exact against the full batch).
    """

    micro_batches: int = 1
    fused_step: bool = False
    bn: str = "micro"

    def __post_init__(self) -> None:
        from edgetrain.execution import BN_POLICIES

        if not isinstance(self.micro_batches, int) or isinstance(self.micro_batches, bool) or self.micro_batches < 1:
            raise ConfigError(f"Execution.micro_batches: must be an int >= 1, got {self.micro_batches!r}")
        if not isinstance(self.fused_step, bool):
            raise ConfigError(f"Execution.fused_step: must be true/false, got {self.fused_step!r}")
        if self.bn not in BN_POLICIES:
            raise ConfigError(f"Execution.bn: must be one of {list(BN_POLICIES)}, got {self.bn!r}")

    @property
    def default(self) -> bool:
        return self == Execution()

    @classmethod
    def from_dict(cls, d: Any) -> Execution:
        if not isinstance(d, dict):
            raise ConfigError(f"recipe: 'execution' must be a mapping, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"recipe execution: unknown key(s) {unknown}; known: micro_batches, fused_step, bn")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Ordered technique configs applied to a model by :func:`edgetrain.apply_`.

    Args:
        techniques: configs, applied in order. An empty recipe is plain training.
        name: short name used in benchmark rows and file names.
        targets: default glob targets for configs whose own ``targets`` is ``None``.
        blocks: globs naming the model's blocks (outermost matches), overriding the derived ones
            (:mod:`edgetrain.structure`; ``edgetrain inspect`` shows them).
        classifier: the classifier module, overriding the derived one.
        execution: how each step runs (:class:`Execution`: micro-batches, the fused optimizer step).
    """

    techniques: tuple[Technique, ...] = ()
    name: str = "plain"
    targets: tuple[str, ...] | None = None
    blocks: tuple[str, ...] | None = None
    classifier: str | None = None
    execution: Execution = Execution()

    def __post_init__(self) -> None:
        techs = self.techniques
        if isinstance(techs, Technique):
            techs = (techs,)
        techs = tuple(techs)
        for t in techs:
            if not isinstance(t, Technique):
                raise ConfigError(f"Recipe.techniques: expected technique configs, got {type(t).__name__}")
            get(t)  # unknown technique type -> ConfigError
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Recipe.name: expected a non-empty string, got {self.name!r}")
        object.__setattr__(self, "techniques", techs)
        object.__setattr__(self, "targets", _as_patterns(self.targets, "Recipe.targets"))
        object.__setattr__(self, "blocks", _as_patterns(self.blocks, "Recipe.blocks"))
        if self.classifier is not None and (not isinstance(self.classifier, str) or not self.classifier):
            raise ConfigError(f"Recipe.classifier: expected a module name, got {self.classifier!r}")
        if isinstance(self.execution, dict):
            object.__setattr__(self, "execution", Execution.from_dict(self.execution))
        if not isinstance(self.execution, Execution):
            raise ConfigError(f"Recipe.execution: expected an Execution, got {self.execution!r}")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "targets": list(self.targets) if self.targets is not None else None}
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        if self.classifier is not None:
            d["classifier"] = self.classifier
        if not self.execution.default:
            d["execution"] = dataclasses.asdict(self.execution)
        d["techniques"] = [t.to_dict() for t in self.techniques]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        if not isinstance(d, dict):
            raise ConfigError(f"recipe must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"name", "targets", "blocks", "classifier", "execution", "techniques"})
        if unknown:
            raise ConfigError(f"recipe: unknown key(s) {unknown}; known: name, targets, blocks, classifier, "
                              "execution, techniques")
        techs = d.get("techniques") or []
        if not isinstance(techs, list):
            raise ConfigError("recipe: 'techniques' must be a list")
        return cls(tuple(config_from_dict(t) for t in techs), name=d.get("name") or "plain", targets=d.get("targets"),
                   blocks=d.get("blocks"), classifier=d.get("classifier"),
                   execution=Execution.from_dict(d.get("execution") or {}))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe JSON is malformed: {e}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe YAML is malformed: {str(e).splitlines()[0]}") from None

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file (YAML or JSON by suffix); errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read recipe: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a recipe (not UTF-8 text: byte {e.start} is {e.object[e.start]:#04x})") \
                from None
        try:
            return cls.from_yaml(text) if path.suffix in (".yaml", ".yml") else cls.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @property
    def technique_names(self) -> list[str]:
        return [t.name for t in self.techniques]


def as_recipe(obj: Recipe | Technique | Sequence[Technique] | dict | str | Path | None) -> Recipe:
    """Coerce a recipe-like value (a Recipe, configs, a dict, or a file path) into a :class:`Recipe`."""
    if obj is None:
        return Recipe()
    if isinstance(obj, Recipe):
        return obj
    if isinstance(obj, Technique):
        return Recipe((obj,), name=obj.name)
    if isinstance(obj, dict):
        return Recipe.from_dict(obj)
    if isinstance(obj, (str, Path)):
        return Recipe.load(obj)
    return Recipe(tuple(obj), name="+".join(t.name for t in obj) or "plain")
