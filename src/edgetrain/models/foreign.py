"""Models edgetrain did not write: a user's factory (``package.module:factory``) and timm models by name.

``--model`` in the CLI and :func:`build` accept:

* a built-in name (``mobilenet_v2``, ...; :func:`edgetrain.models.list_models`);
* ``timm:<name>`` (e.g. ``timm:tf_efficientnet_b0``): ``timm.create_model(name, pretrained=False, ...)``; nothing is
  downloaded (give weights with ``--weights``);
* ``package.module:factory`` (e.g. ``mypkg.nets:make_net``): the factory is imported and called with the model
  arguments (``--model-arg key=value``, values parsed as YAML scalars) plus ``num_classes`` when it accepts it.

timm needs torchvision's pure-Python parts. PyPI's torchvision wheels are built against the CUDA build of torch;
beside the CPU build their native ops do not load and ``import torchvision`` fails while registering fake kernels
for ``torchvision::nms``/``qnms`` ("operator torchvision::nms does not exist", measured with torchvision 0.28 and
torch 2.13 CPU). :func:`import_timm` then declares those two op schemas (no kernels: detection ops stay unavailable)
so that the import succeeds.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

import torch
import yaml
from torch import nn

from edgetrain.errors import ConfigError

_TORCHVISION_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBS: list[Any] = []  # the declared schemas live as long as their Library object


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work when its native ops cannot load (see the module docstring): declare the
    two op schemas its import registers fake kernels for. A no-op when torchvision imports, or is absent."""
    import importlib.util

    if _LIBS or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported modules of the failed attempt
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_OPS:
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined
    _LIBS.append(lib)


def import_timm():  # noqa: ANN201
    """``import timm`` (after :func:`ensure_torchvision`)."""
    ensure_torchvision()
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"timm models need the timm package ({e}); `pip install timm` (and torchvision)") from None
    return timm


def parse_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["width=0.5", "act=relu"]`` -> ``{"width": 0.5, "act": "relu"}`` (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg {pair!r}: expected key=value")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def is_foreign(name: str) -> bool:
    return ":" in name


def build(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A model from ``timm:<name>`` or ``package.module:factory`` (see the module docstring)."""
    source, _, target = name.partition(":")
    if not target:
        raise ConfigError(f"model {name!r}: expected timm:<name> or package.module:factory")
    if source == "timm":
        timm = import_timm()
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        try:
            return timm.create_model(target, pretrained=False, **kwargs)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ConfigError(f"timm model {target!r}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"timm model {target!r}: {e}") from None
    try:
        factory = getattr(importlib.import_module(source), target)
    except ImportError as e:
        raise ConfigError(f"model {name!r}: cannot import {source!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"model {name!r}: {source!r} has no {target!r}") from None
    if not callable(factory):
        raise ConfigError(f"model {name!r}: {target!r} is not callable")
    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs.setdefault("num_classes", num_classes)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _accepts(fn: Any, arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
