"""Offline image datasets with one-line errors.

Sources (:func:`load_data`):

* ``"fashion-mnist"`` — IDX files from ``$EDGETRAIN_FASHION_MNIST`` or the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); 60,000 / 10,000 28x28 images.
* ``"mnist"`` — IDX files from ``$EDGETRAIN_MNIST``.
* ``"digits"`` — scikit-learn's bundled digits (1,797 8x8 images): the embedded default. It has no
  official split: a stratified 80/20 split with seed 0 (1,437 train / 360 test).
* a directory of IDX files (``train-images-idx3-ubyte[.gz]`` ...), an ImageFolder directory (one
  subdirectory per class; ``train/`` and ``test/`` subdirectories when present), or an ``.npz`` file
  with ``x``/``images`` and ``y``/``labels`` arrays (optional ``classes``).

Images stay raw (uint8 where the source is uint8) in memory and are resized, channel-adapted and
normalised per batch (:class:`Transform`), so 60,000 Fashion-MNIST images cost 47 MB, not gigabytes.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgetrain.errors import DataError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet statistics
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclasses.dataclass(frozen=True)
class Transform:
    """Per-batch transform: scale to [0, 1], channels, resize, normalise.

    Args:
        image_size: output size (square, bilinear with antialiasing); ``None`` keeps the source size.
        channels: 1 (mean of the channels) or 3 (replicate gray); ``None`` keeps the source channels.
        mean, std: per-channel normalisation after scaling (one value applies to every channel).
        scale: divisor taking raw values to [0, 1] (255 for uint8, 16 for digits).
    """

    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 255.0

    def __call__(self, raw: Tensor) -> Tensor:
        x = raw.float() / self.scale  # (B, C0, H0, W0)
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise DataError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=self.image_size < x.shape[-1])
        if self.mean is not None and self.std is not None:
            c = x.shape[1]
            mean = torch.tensor(_per_channel(self.mean, c)).view(1, c, 1, 1)
            std = torch.tensor(_per_channel(self.std, c)).view(1, c, 1, 1)
            x = (x - mean) / std
        return x.contiguous()  # (B, C, H, W) float32


def _per_channel(v: tuple[float, ...], c: int) -> list[float]:
    if len(v) == c:
        return list(v)
    if len(v) == 1:
        return list(v) * c
    return [float(np.mean(v))] * c  # e.g. ImageNet statistics on grayscale: their mean


@dataclasses.dataclass
class ImageData:
    """Images (raw), labels and a per-batch transform."""

    images: Tensor  # (N, C0, H0, W0) uint8 or float32, raw
    labels: Tensor  # (N,) int64
    classes: list[str]
    name: str
    transform: Transform = dataclasses.field(default_factory=Transform)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Transformed images and labels at ``index``: ``x`` (B, C, H, W) float32, ``y`` (B,) int64."""
        return self.transform(self.images[index]), self.labels[index]

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        if n == 0:
            raise DataError(f"{self.name}: {len(self)} samples are fewer than one batch of {batch_size}")
        return n

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, start: int = 0,
                drop_last: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of one epoch, starting at batch ``start``. The order depends only on ``(seed, epoch)``
        (a local generator), so a resumed run sees exactly the batches an uninterrupted one would."""
        n = self.steps_per_epoch(batch_size, drop_last)
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(len(self))
        for b in range(start, n):
            yield self.batch(order[b * batch_size:(b + 1) * batch_size])

    def subset(self, n: int, *, seed: int = 0) -> ImageData:
        """A fixed random subset of ``n`` samples (the same for the same seed)."""
        if not 0 < n <= len(self):
            raise DataError(f"{self.name}: subset of {n} from {len(self)} samples")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx], name=f"{self.name}[{n}]")

    def with_transform(self, transform: Transform) -> ImageData:
        return dataclasses.replace(self, transform=transform)

    def raw_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images scaled to [0, 1] (for ``normalize="dataset"``)."""
        x = self.images.float() / self.transform.scale  # (N, C0, H0, W0)
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-6).tolist())


# ---------------------------------------------------------------------------------------------------- IDX
def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({'bad or truncated gzip' if path.suffix == '.gz' else e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic 0x0000080N, big-endian int32 dims, uint8 payload) as an array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "too long"
        raise DataError(f"{path}: {what}: expected {expected} bytes of data for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / stem}[.gz]: file not found")


def load_idx_dir(directory: str | Path, split: str, classes: list[str] | None = None, name: str | None = None
                 ) -> ImageData:
    """A split of an IDX dataset directory (MNIST / Fashion-MNIST file names)."""
    directory = Path(directory)
    img_path, lbl_path = (_find_idx(directory, s) for s in IDX_FILES[_check_split(split)])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3 dimensions (N, H, W), found {images.ndim}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected 1 dimension (N,), found {labels.ndim}")
    if len(labels) != len(images):
        raise DataError(f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}")
    n_classes = len(classes) if classes else int(labels.max()) + 1
    if len(labels) and int(labels.max()) >= n_classes:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range for {n_classes} classes")
    return ImageData(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                     classes or [str(i) for i in range(n_classes)], name or f"{directory}/{split}")


# ---------------------------------------------------------------------------------------------------- sources
def _check_split(split: str) -> str:
    if split not in IDX_FILES:
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    return split


def find_fashion_mnist() -> Path | None:
    """The directory holding Fashion-MNIST's IDX files, or ``None``."""
    for d in (os.environ.get("EDGETRAIN_FASHION_MNIST"), DEBIAN_FASHION):
        if d and any((Path(d) / (IDX_FILES["train"][0] + s)).is_file() for s in (".gz", "")):
            return Path(d)
    return None


def default_source() -> str:
    """``"fashion-mnist"`` when its files are installed, else ``"digits"``."""
    return "fashion-mnist" if find_fashion_mnist() is not None else "digits"


def load_digits_split(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    idx = np.sort(train if _check_split(split) == "train" else test)
    images = torch.from_numpy(d.images[idx].astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8) values 0..16
    return ImageData(images, torch.from_numpy(d.target[idx].astype(np.int64)), [str(i) for i in range(10)],
                     f"digits/{split}", Transform(scale=16.0))


def load_npz(path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile_errors()) as e:
        raise DataError(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120]})") from None
    x = next((arrays[k] for k in ("x", "images") if k in arrays), None)
    y = next((arrays[k] for k in ("y", "labels") if k in arrays), None)
    if x is None or y is None:
        raise DataError(f"{path}: needs arrays 'x' (or 'images') and 'y' (or 'labels'); found {sorted(arrays)}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4:
        raise DataError(f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: {len(y)} labels (shape {y.shape}) for {len(x)} images")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: labels must be non-negative integers, got dtype {y.dtype}")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(int(y.max()) + 1)]
    if len(y) and int(y.max()) >= len(classes):
        raise DataError(f"{path}: label {int(y.max())} out of range for {len(classes)} classes")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    images = torch.from_numpy(np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32)))
    return ImageData(images, torch.from_numpy(y.astype(np.int64)), classes, str(path), Transform(scale=scale))


def zipfile_errors() -> type[Exception]:
    import zipfile

    return zipfile.BadZipFile


def load_image_folder(root: Path, split: str) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    base = root / split if (root / split).is_dir() else root
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and d.name not in ("train", "test"))
    files = [(f, i) for i, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{base}: no images found (expected one subdirectory per class holding image files)")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: unreadable image ({type(e).__name__})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # resize to the most common size so they stack
        h, w = max(shapes, key=lambda s: sum(a.shape == s for a in arrays))[:2]
        arrays = [a if a.shape[:2] == (h, w) else np.asarray(Image.fromarray(a).resize((w, h))) for a in arrays]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    labels = torch.tensor([i for _, i in files], dtype=torch.int64)
    return ImageData(images, labels, [d.name for d in class_dirs], f"{base}")


def _load_raw(source: str | Path, split: str) -> ImageData:
    _check_split(split)
    if source == "digits":
        return load_digits_split(split)
    if source == "fashion-mnist":
        d = find_fashion_mnist()
        if d is None:
            raise DataError(
                f"Fashion-MNIST not found in $EDGETRAIN_FASHION_MNIST or {DEBIAN_FASHION}; install it with "
                "'apt-get install dataset-fashion-mnist' or set EDGETRAIN_FASHION_MNIST=/dir/with/idx/files"
            )
        return load_idx_dir(d, split, FASHION_CLASSES, f"fashion-mnist/{split}")
    if source == "mnist":
        d = os.environ.get("EDGETRAIN_MNIST")
        if not d:
            raise DataError("MNIST not found: set EDGETRAIN_MNIST=/dir/with/idx/files")
        return load_idx_dir(d, split, [str(i) for i in range(10)], f"mnist/{split}")
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (and not a dataset name: fashion-mnist, mnist, digits)")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: unsupported data file (expected .npz, an IDX directory or an ImageFolder)")
        return load_npz(path)
    if any(path.glob("*-ubyte*")):
        return load_idx_dir(path, split)
    return load_image_folder(path, split)


def load_data(source: str | Path | None = None, split: str = "train", *, image_size: int | None = None,
              channels: int | None = None, normalize: str = "imagenet", limit: int | None = None) -> ImageData:
    """Load a dataset split with a per-batch transform to the model's input.

    Args:
        source: dataset name, directory or ``.npz`` path; ``None`` = :func:`default_source`.
        split: ``"train"`` or ``"test"``.
        image_size: resize to this square size (``None`` keeps the source size).
        channels: 1 or 3 (``None`` keeps the source channels).
        normalize: ``"imagenet"`` (torchvision's mean/std; for one channel, their mean), ``"dataset"`` (this
            split's own per-channel statistics) or ``"none"``.
        limit: keep only the first ``limit`` samples.
    """
    if normalize not in ("imagenet", "dataset", "none"):
        raise DataError(f"unknown normalize {normalize!r}; expected imagenet, dataset or none")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    data = _load_raw(source if source is not None else default_source(), split)
    if limit is not None:
        data = dataclasses.replace(data, images=data.images[:limit], labels=data.labels[:limit])
    mean = std = None
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "dataset":
        mean, std = data.raw_stats()
        if channels is not None and len(mean) != channels:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return data.with_transform(Transform(image_size, channels, mean, std, data.transform.scale))
