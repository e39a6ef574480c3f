"""IDX files (the MNIST and Fashion-MNIST format) and the directories that hold them.

Format (Y. LeCun, "THE MNIST DATABASE", section "FILE FORMATS FOR THE MNIST DATABASE"): a 4-byte
big-endian magic number -- two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions -- then one big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from edgetrain.data.core import ImageData
from edgetrain.errors import DataError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W): LeCun's MNIST page
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,): LeCun's MNIST page
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # MNIST's file names, kept by Fashion-MNIST
# zalandoresearch/fashion-mnist README, "Labels": label i names class FASHION_CLASSES[i]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_ENV, MNIST_ENV = "EDGETRAIN_FASHION_MNIST", "EDGETRAIN_MNIST"
_READ_CHUNK = 1 << 24  # read the payload 16 MB at a time: a corrupt header cannot make us allocate terabytes
_WHAT = {IMAGES_MAGIC: "pixels", LABELS_MAGIC: "labels"}


def read_idx(path: str | Path, magic: int | None = None, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` compressed or raw) as a uint8 array of the shape its header gives.

    Args:
        path: the file.
        magic: the expected magic number (:data:`IMAGES_MAGIC`, :data:`LABELS_MAGIC`); ``None``
            accepts any unsigned-byte IDX file.
        limit: read only the first ``limit`` records (along the first dimension); the rest of the file is not read.

    Raises:
        DataError: missing file, bad gzip, bad magic, truncated or over-long payload (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            return _read_idx_stream(f, path, magic, limit)
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: bad gzip ({e})") from None
    except EOFError:
        raise DataError(f"{path}: bad gzip: the compressed stream ends early (truncated download?)") from None
    except zlib.error as e:
        raise DataError(f"{path}: bad gzip: corrupt compressed data ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_idx_stream(f: BinaryIO, path: Path, magic: int | None, limit: int | None = None) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated: {len(head)} bytes, shorter than an IDX header")
    found = int.from_bytes(head, "big")
    if head[:3] != b"\0\0\x08" or head[3] == 0 or (magic is not None and found != magic):
        expected = f"0x{magic:08x}" if magic is not None else "0x000008NN"
        hint = "; the file is gzip-compressed: name it .gz" if head[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: bad magic 0x{found:08x} (expected {expected}, an IDX file of "
                        f"{_WHAT.get(magic, 'unsigned bytes')}){hint}")
    ndim = head[3]
    dim_bytes = f.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated: header ends after {4 + len(dim_bytes)} of {4 + 4 * ndim} bytes")
    dims = tuple(int(d) for d in np.frombuffer(dim_bytes, dtype=">u4"))
    if limit is not None and dims and dims[0] > limit:
        dims = (limit, *dims[1:])
    else:
        limit = None  # the whole file: its length is checked
    expected_bytes = math.prod(dims)
    buf = bytearray()
    while len(buf) < expected_bytes:
        part = f.read(min(_READ_CHUNK, expected_bytes - len(buf)))
        if not part:
            break
        buf += part
    what = _WHAT.get(magic, "data")
    if len(buf) < expected_bytes:
        raise DataError(f"{path}: truncated: expected {expected_bytes} bytes of {what}, found {len(buf)}")
    if limit is None and f.read(1):
        raise DataError(f"{path}: too long: more than the {expected_bytes} bytes of {what} its header {dims} gives")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)  # writable: it views the bytearray


def find_idx_file(directory: Path, stem: str) -> Path:
    """``directory/stem.gz`` or ``directory/stem`` (also the ``train-images.idx3-ubyte`` spelling)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / stem}[.gz]: file not found")


def has_idx_files(directory: Path) -> bool:
    """Whether ``directory`` holds ``*-ubyte`` or ``*-ubyte.gz`` files."""
    return any(p.name.endswith(("-ubyte", "-ubyte.gz")) for p in directory.iterdir())


def load_idx_dir(directory: str | Path, split: str, classes: list[str] | None = None,
                 name: str | None = None, limit: int | None = None) -> ImageData:
    """One split of a directory of IDX files with MNIST's file names.

    Args:
        directory: holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``.
        split: ``"train"`` or ``"test"`` (``t10k`` files).
        classes: class names; ``None`` names them ``"0"`` .. ``str(max label)``.
        name: the :attr:`ImageData.name`; ``None`` gives ``"<directory>/<split>"``.
        limit: only the first ``limit`` samples are read.
    """
    directory = Path(directory)
    image_path, label_path = (find_idx_file(directory, stem) for stem in IDX_STEMS[split])
    images = read_idx(image_path, IMAGES_MAGIC, limit)  # (N, H, W) uint8
    labels = read_idx(label_path, LABELS_MAGIC, limit)  # (N,) uint8
    if len(labels) != len(images):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if len(images) == 0:
        raise DataError(f"{image_path}: holds no images")
    name = name or f"{directory}/{split}"
    if limit is not None and len(images) == limit and _records(image_path) > limit:
        name = f"{name}[:{limit}]"  # as load_data names a cut
    top = int(labels.max())
    classes = classes or [str(i) for i in range(top + 1)]
    if top >= len(classes):
        raise DataError(f"{label_path}: label {top} out of range for {len(classes)} classes")
    return ImageData(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),  # (N, 1, H, W)
                     list(classes), name)


def _records(path: Path) -> int:
    """The first dimension in an IDX header (read_idx has checked the header already)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "big")


def _idx_dir_from(env: str, fallbacks: tuple[Path, ...] = ()) -> Path | None:
    candidates = ([Path(os.environ[env])] if os.environ.get(env) else []) + list(fallbacks)
    for d in candidates:
        if any((d / (IDX_STEMS["train"][0] + sfx)).is_file() for sfx in (".gz", "")):
            return d
    return None


def _env_state(env: str) -> str:
    value = os.environ.get(env)
    return f"${env}={value} has no {IDX_STEMS['train'][0]}[.gz]" if value else f"${env} is unset"


def find_fashion_mnist() -> Path | None:
    """The directory holding Fashion-MNIST's IDX files, or ``None``.

    Searched in order: the directory in ``$EDGETRAIN_FASHION_MNIST``, then
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``). A directory
    counts when it holds ``train-images-idx3-ubyte[.gz]``.
    """
    return _idx_dir_from(FASHION_ENV, (DEBIAN_FASHION_MNIST,))


def load_fashion_mnist(split: str, limit: int | None = None) -> ImageData:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 uint8 images, 10 classes) from :func:`find_fashion_mnist`."""
    directory = find_fashion_mnist()
    if directory is None:
        raise DataError(f"Fashion-MNIST not found ({_env_state(FASHION_ENV)}; {DEBIAN_FASHION_MNIST} does not exist "
                        f"or is empty): run 'apt-get install dataset-fashion-mnist' or set {FASHION_ENV} to a "
                        f"directory holding train-images-idx3-ubyte.gz and the other three IDX files")
    return load_idx_dir(directory, split, FASHION_CLASSES, f"fashion-mnist/{split}", limit)


def load_mnist(split: str, limit: int | None = None) -> ImageData:
    """MNIST from the directory in ``$EDGETRAIN_MNIST`` (60,000 / 10,000 28x28 digits)."""
    directory = _idx_dir_from(MNIST_ENV)
    if directory is None:
        raise DataError(f"MNIST not found ({_env_state(MNIST_ENV)}): set {MNIST_ENV} to a directory holding "
                        f"train-images-idx3-ubyte.gz and the other three IDX files")
    return load_idx_dir(directory, split, DIGIT_CLASSES, f"mnist/{split}", limit)
