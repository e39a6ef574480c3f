"""A workload: model + data + batch, built the same way by ``train``, ``measure``, ``bench``, ``plan``,
``estimate`` and ``inspect`` (the last two need only the model and its input shape, not the data).

The standard works of DESIGN.md are workloads: T1 is ``Workload(model="mobilenet_v2", pretrained=True,
data="fashion-mnist", image_size=64, channels=3, batch_size=32)``; T3 is the same on ``data="digits"``.
A user's model is ``Workload(model="mypkg.nets:make_net", model_args={"width": 0.5}, weights="net.safetensors")``
(see :mod:`edgetrain.models.foreign`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.models.pretrained import WEIGHTS

#: Workload.data_args: each key and the kind of data it applies to (edgetrain.data.sources.data_kind)
DATA_ARGS = {"label": "table", "sample_rate": "WAV folder", "seconds": "WAV folder"}
FLAGS = {"label": "--label-column", "sample_rate": "--sample-rate", "seconds": "--seconds"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to train on what.

    Args:
        model: a name from :func:`edgetrain.models.list_models`, ``timm:<name>`` or ``package.module:factory``.
        model_args: keyword arguments of the model factory (``width_mult``, timm's ``in_chans``, your own).
        weights: a ``.safetensors`` or ``.pt``/``.pth`` state dict loaded strictly into the model as built
            (with the data's ``num_classes``).
        pretrained: start from the ImageNet weights (``mobilenet_v2`` only); the head is replaced by a
            fresh ``num_classes``-way Linear. ``None`` (the default): on for ``mobilenet_v2`` without ``weights``.
        data: ``None`` (Fashion-MNIST if installed, else scikit-learn digits), a dataset name or a path.
        image_size, channels: the model input (data are resized / channel-replicated to it).
        batch_size: training batch size (also the batch the meter measures).
        train_subset, eval_subset: fixed random subsets (``None``: everything) to bound run time.
        seed: model initialisation, head initialisation and subset choice.
        data_args: how a table or a WAV folder is read (:func:`edgetrain.data.load_data`): ``label`` (a
            ``.csv``/``.parquet`` table's label column), ``sample_rate`` and ``seconds`` (a WAV folder's framing).
    """

    model: str = "mobilenet_v2"
    pretrained: bool | None = None
    data: str | None = None
    image_size: int = 64
    channels: int = 3
    batch_size: int = 32
    train_subset: int | None = None
    eval_subset: int | None = None
    seed: int = 0
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    data_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_data_args()
        if not isinstance(self.model_args, dict) or not all(isinstance(k, str) for k in self.model_args):
            raise ConfigError(f"Workload.model_args: must be a mapping of argument names, got {self.model_args!r}")
        reserved = sorted({"num_classes", "in_channels", "image_size"} & set(self.model_args))
        if reserved:
            raise ConfigError(f"Workload.model_args: {', '.join(reserved)} {'is' if len(reserved) == 1 else 'are'} set "
                              "from the data and the workload (--channels, --image-size, the data's classes), not "
                              "as a model argument")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ConfigError(f"Workload.weights: must be a file name or null, got {self.weights!r}")
        if self.pretrained is None:  # frozen: resolve the default in place
            object.__setattr__(self, "pretrained", self.model == "mobilenet_v2" and self.weights is None)
        if self.pretrained and self.model not in WEIGHTS:
            raise ConfigError(f"model {self.model!r}: pretrained weights exist only for "
                              f"{', '.join(sorted(WEIGHTS))}; pass --weights FILE")
        if self.pretrained and self.weights is not None:
            raise ConfigError(f"Workload: pretrained and weights {self.weights!r} exclude each other "
                              "(--weights replaces the ImageNet weights; add --no-pretrained)")
        for f in ("image_size", "channels", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"Workload.{f}: must be a positive int, got {getattr(self, f)!r}")
        for f in ("train_subset", "eval_subset"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"Workload.{f}: must be a positive int or null, got {v!r}")

    def _check_data_args(self) -> None:
        from edgetrain.data.sources import data_kind

        if not isinstance(self.data_args, dict):
            raise ConfigError(f"Workload.data_args: must be a mapping, got {self.data_args!r}")
        unknown = sorted(set(self.data_args) - set(DATA_ARGS))
        if unknown:
            raise ConfigError(f"Workload.data_args: unknown key(s) {unknown}; known: {', '.join(DATA_ARGS)}")
        if not self.data_args:
            return  # nothing to check against the data (and no look at the file system)
        kind = data_kind(self.data)
        for key in self.data_args:
            if kind != DATA_ARGS[key]:
                raise ConfigError(f"{FLAGS[key]} applies to a {DATA_ARGS[key]}, and {self.data or 'the default data'} "
                                  f"is {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
        if "label" in self.data_args and not (isinstance(self.data_args["label"], str) and self.data_args["label"]):
            raise ConfigError(f"--label-column must name a column, got {self.data_args['label']!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"workload: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def images(self) -> bool:
        """Whether the data are images (else a table or series: image_size and channels do not apply)."""
        from edgetrain.data.sources import is_signal

        return not is_signal(self.data)

    def load_data(self, split: str):
        """The train or test split, resized and normalised for the model (subset applied)."""
        from edgetrain.data import load_data

        if not self.images():  # a table or series (edgetrain.data.signals): no image options, training statistics
            data = load_data(self.data, split, **self.data_args)
            n = self.train_subset if split == "train" else self.eval_subset
            return data.subset(n, seed=self.seed) if n is not None and n < len(data) else data
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
        """A fresh model, seeded: the same weights every call; ``weights`` loaded strictly."""
        from edgetrain.models import create_model, load_pretrained, load_weights

        torch.manual_seed(self.seed)
        if self.pretrained:
            return load_pretrained(self.model, num_classes=num_classes, **self.model_args)
        model = create_model(self.model, num_classes=num_classes, in_channels=self.channels,
                             image_size=self.image_size, **self.model_args)
        if self.weights is not None:
            load_weights(model, self.weights)
        return model

    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(channels, image_size, image_size)`` for images (no data are loaded); a table's
        ``(features,)`` or a series' ``(channels, length)``, read from the training split."""
        if self.images():
            return (self.channels, self.image_size, self.image_size)
        return tuple(self.load_data("train").images.shape[1:])

    def example_input(self, zeros: bool = False) -> Tensor:
        """Two samples of the model input, ``(2, *input_shape())``: seeded normal noise, or zeros (all the cost
        model needs is the shape)."""
        shape = (2, *self.input_shape())
        if zeros:
            return torch.zeros(shape)
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed))

    def example_batch(self, data) -> tuple[Tensor, Tensor]:
        """The first training batch of epoch 0 (what ``measure`` measures)."""
        return next(iter(data.batches(self.batch_size, shuffle=True, seed=self.seed, epoch=0)))
