"""The model zoo: every model carries ``block_names`` (its sequential blocks, in forward order),
``classifier_name`` (the final Linear) and ``default_input_size``.

:func:`create_model` also builds models edgetrain did not write: ``timm:<name>`` and ``package.module:factory``
(:mod:`edgetrain.models.foreign`); :func:`load_weights` loads a ``.safetensors`` or ``.pt``/``.pth`` file into any
model strictly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from edgetrain.errors import ConfigError, WeightsError
from edgetrain.models import foreign
from edgetrain.models.mobilenet_v2 import MobileNetV2, mcunet_tiny
from edgetrain.models.pretrained import load_into, load_state_dict, read_weights, weights_path
from edgetrain.models.resnet import ResNet18
from edgetrain.models.small import SmallCNN
from edgetrain.models.transformer import TinyTransformer

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mcunet_tiny": mcunet_tiny,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
    "small_cnn": SmallCNN,
    "tiny_transformer": TinyTransformer,
}


def list_models() -> list[str]:
    return sorted(_FACTORIES)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int | None = None,
                 **kwargs) -> nn.Module:
    """A freshly initialised model (seed torch yourself for reproducible weights).

    Args:
        name: one of :func:`list_models`, ``timm:<name>`` or ``package.module:factory``.
        num_classes: classifier outputs.
        in_channels: input channels (built-in models only: give a foreign model its own argument, e.g. timm's
            ``in_chans``, in ``kwargs``).
        image_size: input size; only models that depend on it (``tiny_transformer``) use it.
        **kwargs: model options (``width_mult`` for MobileNetV2, ``small_input`` for ResNet-18, the factory's or
            timm's arguments for foreign models).
    """
    if foreign.is_foreign(name):
        return foreign.build(name, num_classes, **kwargs)
    if name not in _FACTORIES:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}, timm:<name> or "
                          "package.module:factory")
    if name == "tiny_transformer" and image_size is not None:
        kwargs["image_size"] = image_size
    try:
        return _FACTORIES[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from None


def load_pretrained(name: str = "mobilenet_v2", *, path: str | Path | None = None, num_classes: int | None = None,
                    **kwargs) -> nn.Module:
    """A model with its ImageNet weights loaded strictly; ``num_classes`` other than 1000 gets a fresh head
    (initialised from torch's current RNG)."""
    if name not in ("mobilenet_v2",):
        raise WeightsError(f"no pretrained weights for {name!r}; available: mobilenet_v2")
    model = create_model(name, num_classes=1000, in_channels=3, **kwargs)
    load_into(model, load_state_dict(name, path), str(weights_path(name, path)))
    if num_classes is not None and num_classes != 1000:
        old = model.classifier[1]
        model.classifier[1] = nn.Linear(old.in_features, num_classes)
        nn.init.normal_(model.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(model.classifier[1].bias)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the state dict in ``path`` (``.safetensors``, ``.pt``, ``.pth``) into ``model`` strictly; a missing,
    unreadable or mismatching file gives a one-line :class:`~edgetrain.WeightsError`."""
    load_into(model, read_weights(path), str(path))
    return model


__all__ = ["MobileNetV2", "ResNet18", "SmallCNN", "TinyTransformer", "create_model", "list_models",
           "load_pretrained", "load_weights", "mcunet_tiny", "weights_path"]
