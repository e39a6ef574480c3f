"""Datasets in user files: ``.npz`` arrays and ImageFolder directories."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from edgetrain.data.core import DataWarning, ImageData
from edgetrain.errors import DataError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA"}  # Pillow modes kept as one channel; everything else becomes RGB
MAX_CLASSES = 100_000  # more distinct labels than this are a damaged file, not a dataset (ImageNet-21k: 21,841)
FLOAT_TOLERANCE = 1e-3  # float images may stray this far outside [0, 1] (rounding) before we refuse them


def _same_as_training(path: Path, n: int | None, what: str) -> None:
    count = f" ({n} samples)" if n is not None else ""
    warnings.warn(f"{path}: has no test split (no {what}): the test split is the whole source{count}, the samples it "
                  "trains on, so the accuracy reported is training accuracy", DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------- npz
def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single .npy array, not an .npz archive of 'x' and 'y' arrays")
        with z:
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile and numpy raise OSError, ValueError, EOFError, BadZipFile,
        # zlib.error, NotImplementedError for unknown zip versions or methods, ...: whatever it is, it is not an .npz)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{path}: not a readable .npz file ({reason})") from None


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> tuple[str, np.ndarray] | None:
    return next(((k, arrays[k]) for k in keys if k in arrays), None)


def _npz_images(x: np.ndarray, path: Path, key: str) -> Tensor:
    if x.ndim == 3:
        x = x[:, None]  # (N, 1, H, W)
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif x.ndim != 4:
        raise DataError(f"{path}: '{key}' must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 and x.size:
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{path}: integer images in '{key}' must lie in 0..255, found {x.min()}..{x.max()}")
        x = x.astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
            raise DataError(f"{path}: float images in '{key}' must lie in [0, 1], found {lo:.4g}..{hi:.4g} "
                            f"(save uint8 0..255 or divide by the maximum)")
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: images in '{key}' have dtype {x.dtype}; expected uint8, integer or float")
    return torch.from_numpy(np.ascontiguousarray(x))  # (N, C, H, W) uint8 or float32


def load_npz(path: Path, split: str) -> ImageData:
    """Arrays from an ``.npz`` file.

    Images: ``x_<split>``, ``x`` or ``images``, shaped (N, H, W), (N, H, W, C) or (N, C, H, W),
    uint8 / integer 0..255 or float in [0, 1]. Labels: ``y_<split>``, ``y`` or ``labels``, (N,)
    non-negative integers. Optional ``classes`` (names). Without ``x_<split>`` keys every split is
    the whole file; with them (Keras' ``mnist.npz`` layout) each split is its own arrays.
    """
    arrays = _read_npz(path)
    x = _pick(arrays, (f"x_{split}", "x", "images"))
    y = _pick(arrays, (f"y_{split}", "y", "labels"))
    if x is None or y is None:
        raise DataError(f"{path}: needs image array 'x' (or 'images', 'x_{split}') and label array 'y' "
                        f"(or 'labels', 'y_{split}'); found {sorted(arrays) or 'no arrays'}")
    (x_key, x_arr), (y_key, labels) = x, y
    if labels.ndim != 1 or len(labels) != len(x_arr):
        raise DataError(f"{path}: '{y_key}' holds {len(labels) if labels.ndim else 0} labels (shape {labels.shape}) "
                        f"for {len(x_arr) if x_arr.ndim else 0} images in '{x_key}'")
    if len(labels) == 0:
        raise DataError(f"{path}: '{x_key}' holds no images")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{path}: labels in '{y_key}' must be non-negative integers, got {labels.dtype} "
                        f"from {labels.min()}")
    images = _npz_images(x_arr, path, x_key)
    top = int(labels.max())
    if "classes" not in arrays and top >= MAX_CLASSES:
        raise DataError(f"{path}: label {top} in '{y_key}' implies more than {MAX_CLASSES:,} classes (damaged labels?)")
    classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()] if "classes" in arrays else \
        [str(i) for i in range(top + 1)]
    if top >= len(classes):
        raise DataError(f"{path}: label {top} out of range for {len(classes)} classes")
    name = f"{path}:{split}" if x_key.endswith(f"_{split}") else str(path)
    if split == "test" and x_key != "x_test":
        _same_as_training(path, len(labels), "'x_test'/'y_test' arrays")
    return ImageData(images, torch.from_numpy(labels.astype(np.int64)), classes, name)


# ---------------------------------------------------------------------------------------------------- ImageFolder
def _class_dirs(directory: Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))  # (H, W) or (H, W, 3) uint8
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [""])[0][:160]
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {reason})") from None


def _stack(arrays: list[np.ndarray]) -> Tensor:
    """Stack images of any mode and size: gray promoted to RGB if any is colour, sizes set to the commonest."""
    from PIL import Image

    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    h, w = collections.Counter(a.shape[:2] for a in arrays).most_common(1)[0][0]
    arrays = [a if a.shape[:2] == (h, w) else np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))
              for a in arrays]
    x = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(x))


def load_image_folder(root: Path, split: str) -> ImageData:
    """An ImageFolder directory: one subdirectory per class holding image files (read with Pillow).

    If ``root`` has ``train/`` or ``test/`` subfolders, ``split`` picks one of them and the classes
    are the union of both (so labels agree between splits); otherwise ``root`` itself serves every
    split. Gray images stay one channel unless the folder mixes in colour ones; images of another
    size than the commonest are resized to it (bilinear).
    """
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:
        if split not in present:
            raise DataError(f"{root}: has no {split}/ subfolder (found {', '.join(s + '/' for s in present)})")
        base = root / split
        classes = sorted({c for s in present for c in _class_dirs(root / s)})
    else:
        base, classes = root, _class_dirs(root)
        if split == "test":
            _same_as_training(root, None, "train/ and test/ subfolders")
    files = [(f, label) for label, c in enumerate(classes) if (base / c).is_dir() for f in sorted((base / c).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise DataError(f"{base}: empty ImageFolder: no image files ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) "
                        f"in one-subdirectory-per-class layout <dir>/<class>/<image>")
    images = _stack([_read_image(f) for f, _ in files])  # (N, C, H, W) uint8
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)  # (N,)
    return ImageData(images, labels, classes, str(base))
