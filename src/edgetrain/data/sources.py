"""Dataset names and paths to :class:`ImageData`: :func:`load_data`."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgetrain import smoke
from edgetrain.data.core import ImageData, Transform, channel_stats
from edgetrain.data.files import SPLITS, load_image_folder, load_npz
from edgetrain.data.signals import WAV_SUFFIXES, load_table, load_wav_folder, load_windows
from edgetrain.data.idx import DIGIT_CLASSES, find_fashion_mnist, has_idx_files, load_fashion_mnist, load_idx_dir, \
    load_mnist
from edgetrain.errors import ConfigError, DataError, EdgetrainError

# torchvision's ImageNet statistics (torchvision.models weights' transforms), the inputs its pretrained models expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MAX = 16.0  # sklearn load_digits: each pixel is an integer in 0..16 (UCI Optical Recognition of Digits)
DIGITS_TEST_FRACTION, DIGITS_SEED = 0.2, 0  # our fixed split: stratified 80/20 with seed 0 -> 1,437 / 360
NORMALIZE = ("auto", "imagenet", "dataset", "none")


def load_digits_split(split: str) -> ImageData:
    """scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as float32 in [0, 1] (pixels / 16).

    The set has no official split; ours is a stratified 80/20 ``train_test_split`` with
    ``random_state=0``: 1,437 train and 360 test images, each in the original order.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_TEST_FRACTION,
                                   random_state=DIGITS_SEED, stratify=digits.target)
    index = np.sort(train if split == "train" else test)
    images = torch.from_numpy((digits.images[index] / DIGITS_MAX).astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target[index].astype(np.int64))  # (N,)
    return ImageData(images, labels, list(DIGIT_CLASSES), f"digits/{split}")


NAMED: dict[str, Callable[[str], ImageData]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "digits": load_digits_split,
}


IDX_NAMED = ("fashion-mnist", "mnist")  # read from IDX files: a limit reads only that many samples


def default_source() -> str:
    """``"fashion-mnist"`` when :func:`find_fashion_mnist` finds its IDX files, else ``"digits"``."""
    return "fashion-mnist" if find_fashion_mnist() is not None else "digits"


def _has_wav(root: Path) -> bool:
    """A folder of class subfolders of WAV files (or its train/ subfolder is)."""
    base = root / "train" if (root / "train").is_dir() else root
    return any(f.suffix.lower() in WAV_SUFFIXES for d in base.iterdir() if d.is_dir() for f in d.iterdir())


def is_signal(source: str | Path | None) -> bool:
    """Whether ``source`` is a table, a WAV folder or sensor windows (not images), from its name alone."""
    if source is None or (isinstance(source, str) and source in NAMED):
        return False
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in (".csv", ".parquet", ".npy")
    return path.is_dir() and not has_idx_files(path) and _has_wav(path)


def data_kind(source: str | Path | None) -> str:
    """``table``, ``WAV folder``, ``series`` (a ``.npy`` of windows) or ``image dataset``, from the name alone."""
    if not is_signal(source):
        return "image dataset"
    path = Path(source)
    if path.is_dir():
        return "WAV folder"
    return "series" if path.suffix.lower() == ".npy" else "table"


def _load_raw(source: str | Path, split: str, limit: int | None = None, label: str = "label",
              audio: dict | None = None) -> ImageData:
    """The split; IDX sources read only ``limit`` samples (the others are cut by the caller)."""
    if isinstance(source, str) and source in NAMED:
        return NAMED[source](split, limit) if source in IDX_NAMED else NAMED[source](split)
    path = Path(source)
    if path.is_dir():
        if has_idx_files(path):
            return load_idx_dir(path, split, limit=limit)
        if _has_wav(path):
            return load_wav_folder(path, split, **(audio or {}))
        return load_image_folder(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return load_npz(path, split)
        if suffix in (".csv", ".parquet"):
            return load_table(path, split, label)
        if suffix == ".npy":
            return load_windows(path, split)
        if "-ubyte" in path.name:
            raise DataError(f"{path}: an IDX file; pass the directory holding the four IDX files instead")
        raise DataError(f"{path}: unsupported data file (expected .npz, .csv, .parquet or .npy, a directory of "
                        f"IDX files, an ImageFolder or a folder of WAV files)")
    raise DataError(f"unknown data source {str(source)!r}: neither a dataset name ({', '.join(NAMED)}) nor an "
                    f"existing file or directory")


def _check_options(split: str, image_size: int | None, channels: int | None, normalize: str,
                   limit: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected 'train' or 'test'")
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize: unknown {normalize!r}; expected one of {', '.join(NORMALIZE)}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels: must be 1, 3 or None, got {channels!r}")
    for what, v in (("image_size", image_size), ("limit", limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"{what}: must be a positive int or None, got {v!r}")


def _normalisation(data: ImageData, normalize: str, channels: int | None
                   ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    c = channels if channels is not None else data.images.shape[1]
    if normalize == "none":
        return None, None
    if normalize == "dataset":
        return channel_stats(data.images, channels)
    if c == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if c == 1:  # gray: the mean of the three channel statistics
        return (statistics.fmean(IMAGENET_MEAN),), (statistics.fmean(IMAGENET_STD),)
    raise DataError(f"{data.name}: imagenet normalisation needs 1 or 3 channels, the images have {c}; "
                    f"pass channels=1 or 3, or normalize='dataset'")


def load_data(source: str | Path | None = None, split: str = "train", *, image_size: int | None = None,
              channels: int | None = None, normalize: str = "auto", limit: int | None = None, label: str = "label",
              sample_rate: int = 16000, seconds: float = 1.0) -> ImageData:
    """Load one split of a dataset, with a per-batch transform to the model's input.

    Sources (a name wins over a same-named directory; write ``./digits`` for the directory):

    * ``None``: :func:`default_source` -- Fashion-MNIST if installed, else digits.
    * ``"fashion-mnist"``: IDX files in ``$EDGETRAIN_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``
      (Debian package ``dataset-fashion-mnist``); 60,000 train / 10,000 test 28x28 gray images.
    * ``"mnist"``: IDX files in ``$EDGETRAIN_MNIST``.
    * ``"digits"``: scikit-learn's bundled 8x8 digits, pixels / 16. No official split exists: ours is a
      deterministic stratified 80/20 split with seed 0 (1,437 train / 360 test).
    * a directory: its IDX files if it holds ``*-ubyte[.gz]`` files, else an ImageFolder (one
      subdirectory per class; ``train/`` and ``test/`` subfolders if present, else the whole
      directory for either split).
    * an ``.npz`` file: ``x``/``images`` and ``y``/``labels`` arrays (optional ``classes``); see
      :func:`edgetrain.data.files.load_npz`.
    * a ``.csv`` or ``.parquet`` table of numeric features with a ``label`` column; a folder of WAV files (one
      subfolder per class) resampled to ``sample_rate`` and framed to ``seconds``; a ``.npy`` array of sensor
      windows (N, C, T) with ``<stem>_labels.npy``: :mod:`edgetrain.data.signals`. Their samples are (N, F) or
      (N, C, T); ``image_size`` and ``channels`` apply to images only.

    Args:
        source: dataset name, directory or ``.npz`` path.
        split: ``"train"`` or ``"test"``.
        image_size: resize to ``image_size`` x ``image_size`` per batch; ``None`` keeps the source size.
        channels: 1 (grayscale) or 3 (gray replicated); ``None`` keeps the source channels.
        normalize: ``"auto"`` (``"imagenet"`` for images; for tables and series ``"dataset"`` with the training
            split's statistics for either split), ``"imagenet"``
            (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); their means for
            one channel), ``"dataset"`` (this split's own per-channel mean/std, after the channel
            conversion) or ``"none"`` (inputs in [0, 1]).
        limit: keep only the first ``limit`` samples in file order (no shuffle; a copy, so the rest
            is freed).
        label: a table's label column.
        sample_rate, seconds: a WAV folder's clips are resampled to ``sample_rate`` Hz and framed to ``seconds``.

    Raises:
        DataError: the data is missing or malformed, or the split or source is unknown.
        ConfigError: an option is invalid.
    """
    _check_options(split, image_size, channels, normalize, limit)
    limit = smoke.cap(limit, smoke.SAMPLES)  # EDGETRAIN_SMOKE: a few samples (edgetrain.smoke)
    data = _load_raw(default_source() if source is None else source, split, limit, label,
                     {"sample_rate": sample_rate, "seconds": seconds})
    if normalize == "auto":
        normalize = "imagenet" if data.images.ndim == 4 else "dataset"
        if normalize == "dataset" and split == "test":  # a table's or series' test split: the training statistics
            train = load_data(source, "train", normalize="dataset", limit=limit, label=label,
                              sample_rate=sample_rate, seconds=seconds)
            return data.with_transform(train.transform)
    if limit is not None and limit < len(data):
        data = dataclasses.replace(data, images=data.images[:limit].clone(), labels=data.labels[:limit].clone(),
                                   name=f"{data.name}[:{limit}]")
    if channels == 3 and data.images.ndim == 4 and data.images.shape[1] not in (1, 3):
        raise DataError(f"{data.name}: cannot turn {data.images.shape[1]}-channel images into 3 channels")
    mean, std = _normalisation(data, normalize, channels)
    return data.with_transform(Transform(image_size, channels, mean, std))


def load_t2() -> tuple[ImageData, ImageData]:
    """T2's data: Fashion-MNIST's train and test splits, one channel, both normalised with the training split's
    statistics. A missing dataset is one line naming the Debian package."""
    try:
        train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
        test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    except EdgetrainError as e:
        raise ConfigError(f"Fashion-MNIST is needed for T2 (Debian package dataset-fashion-mnist): {e}") from None
    test.transform = train.transform  # evaluate with the training split's statistics
    return train, test
