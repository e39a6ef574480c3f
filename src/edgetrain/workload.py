"""A workload: model + data + batch, built the same way by ``train``, ``measure`` and ``bench``.

The standard works of DESIGN.md are workloads: T1 is ``Workload(model="mobilenet_v2", pretrained=True,
data="fashion-mnist", image_size=64, channels=3, batch_size=32)``; T3 is the same on ``data="digits"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to train on what.

    Args:
        model: a name from :func:`edgetrain.models.list_models`.
        pretrained: start from the ImageNet weights (``mobilenet_v2`` only); the head is replaced by a
            fresh ``num_classes``-way Linear.
        data: ``None`` (Fashion-MNIST if installed, else scikit-learn digits), a dataset name or a path.
        image_size, channels: the model input (data are resized / channel-replicated to it).
        batch_size: training batch size (also the batch the meter measures).
        train_subset, eval_subset: fixed random subsets (``None``: everything) to bound run time.
        seed: model initialisation, head initialisation and subset choice.
    """

    model: str = "mobilenet_v2"
    pretrained: bool = True
    data: str | None = None
    image_size: int = 64
    channels: int = 3
    batch_size: int = 32
    train_subset: int | None = None
    eval_subset: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("image_size", "channels", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"Workload.{f}: must be a positive int, got {getattr(self, f)!r}")
        for f in ("train_subset", "eval_subset"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"Workload.{f}: must be a positive int or null, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"workload: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_data(self, split: str):
        """The train or test split, resized and normalised for the model (subset applied)."""
        from edgetrain.data import load_data

        normalize = "imagenet" if self.pretrained else "dataset"
        data = load_data(self.data, split, image_size=self.image_size, channels=self.channels, normalize=normalize)
        if normalize == "dataset" and split != "train":  # evaluate with the training split's statistics
            t = load_data(self.data, "train", image_size=self.image_size, channels=self.channels,
                          normalize=normalize).transform
            data = data.with_transform(dataclasses.replace(data.transform, mean=t.mean, std=t.std))
        n = self.train_subset if split == "train" else self.eval_subset
        if n is not None and n < len(data):
            data = data.subset(n, seed=self.seed)
        return data

    def build_model(self, num_classes: int) -> nn.Module:
        """A fresh model, seeded: the same weights every call."""
        from edgetrain.models import create_model, load_pretrained

        torch.manual_seed(self.seed)
        if self.pretrained:
            return load_pretrained(self.model, num_classes=num_classes)
        return create_model(self.model, num_classes=num_classes, in_channels=self.channels)

    def example_batch(self, data) -> tuple[Tensor, Tensor]:
        """The first training batch of epoch 0 (what ``measure`` measures)."""
        return next(iter(data.batches(self.batch_size, shuffle=True, seed=self.seed, epoch=0)))
