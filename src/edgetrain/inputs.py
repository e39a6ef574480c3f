"""Model inputs and batches of any shape: a tensor, a tuple of positional inputs, or a dict of keyword inputs.

A *batch* is what a data loader yields: ``(inputs, target)`` or just ``inputs`` (a model that computes its own
loss, e.g. a ``transformers`` model given ``labels``). *Inputs* are what the model is called with:
``model(x)`` for a tensor, ``model(*x)`` for a tuple or list, ``model(**x)`` for a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch; ``target`` is ``None`` for a bare tensor or dict."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    for t in tensors(inputs):
        if t.dim():
            return t.shape[0]
    raise ValueError("inputs hold no batched tensor")


def take(inputs: Any, n: int) -> Any:
    """The first ``n`` samples (tensors whose leading dim is the batch are sliced; others are kept).
    ``n`` larger than the batch repeats it."""
    size = batch_size(inputs)

    def cut(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.dim() or t.shape[0] != size:
            return t
        if n <= size:
            return t[:n].clone()
        reps = -(-n // size)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].clone()

    return map_tensors(inputs, cut)


def map_tensors(obj: Any, fn) -> Any:  # noqa: ANN001
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: map_tensors(v, fn) for k, v in obj.items()}) if type(obj) is dict else \
            {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and model outputs (``transformers`` ``ModelOutput`` is a
    dict), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors(v)]
    return []


def logits(out: Any) -> Tensor:
    """The prediction tensor of a model output: the tensor itself, ``.logits``, or the first tensor."""
    if isinstance(out, Tensor):
        return out
    lg = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(lg, Tensor):
        return lg
    ts = tensors(out)
    if not ts:
        raise ValueError(f"model output {type(out).__name__} holds no tensor")
    return ts[0]


def own_storage(obj: Any) -> Any:
    """Copies of tensors that are views into a larger storage (a batch sliced from a whole dataset), so that
    memory counts see the batch, not the dataset."""
    def own(t: Tensor) -> Tensor:
        return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

    return map_tensors(obj, own)


def example_for(model: nn.Module, n: int = 2, seed: int = 0) -> Tensor | None:
    """A seeded random input of ``model.default_input_size`` (a shape, or an image side with ``model.in_channels``;
    the built-in models carry both), else ``None``."""
    size = getattr(model, "default_input_size", None)
    if size is None:
        return None
    if isinstance(size, int):  # the built-in image models: a side length, with ``in_channels``
        size = (getattr(model, "in_channels", 3), size, size)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    return torch.randn((n, *size), generator=torch.Generator().manual_seed(seed), dtype=dtype)
