"""Offline image datasets with one-line errors.

Sources (:func:`load_data`): ``"fashion-mnist"`` (Debian package ``dataset-fashion-mnist`` or
``$EDGETRAIN_FASHION_MNIST``), ``"mnist"`` (``$EDGETRAIN_MNIST``), ``"digits"`` (scikit-learn's
bundled 8x8 digits, the default when Fashion-MNIST is absent), a directory of IDX files, an
ImageFolder directory, or an ``.npz`` file. Nothing is downloaded.

Images stay raw (uint8 where the source is uint8) in memory; :class:`Transform` resizes, converts
channels and normalises each batch, so Fashion-MNIST's 60,000 training images cost 47 MB.
"""

from __future__ import annotations

from edgetrain.data.core import DataWarning, ImageData, Transform, channel_stats
from edgetrain.data.files import load_image_folder, load_npz
from edgetrain.data.idx import (
    DEBIAN_FASHION_MNIST,
    FASHION_CLASSES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    find_fashion_mnist,
    load_idx_dir,
    read_idx,
)
from edgetrain.data.sources import IMAGENET_MEAN, IMAGENET_STD, default_source, load_data, load_t2

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DataWarning",
    "FASHION_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "ImageData",
    "Transform",
    "channel_stats",
    "default_source",
    "find_fashion_mnist",
    "load_data",
    "load_t2",
    "load_idx_dir",
    "load_image_folder",
    "load_npz",
    "read_idx",
]
