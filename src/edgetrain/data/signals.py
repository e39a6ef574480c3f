"""Your own non-image data: feature tables (CSV, Parquet), folders of WAV files and ``.npy`` sensor windows.

Each loads one split as an :class:`~edgetrain.data.core.ImageData` whose samples are a table's (N, F) float32
features, or a series' (N, C, T) float32 values; :class:`~edgetrain.data.core.Transform` only normalises them
(per feature or channel). Splits: a table's ``split`` column (``train``/``test``), a folder's ``train/`` and
``test/`` subfolders, or ``<stem>_test.npy``; otherwise a fixed stratified 80/20 split with seed 0 (the digits
rule). Class names are the sorted distinct label values (a table's label column, a folder's class subfolders).
Malformed input is a one-line :class:`~edgetrain.errors.DataError` naming the file (and row or column).
"""

from __future__ import annotations

import csv
import math
import wave
from pathlib import Path

import numpy as np
import torch

from edgetrain.data.core import ImageData
from edgetrain.errors import DataError

TEST_FRACTION, SEED = 0.2, 0  # the fixed split when the source has none (as scikit-learn digits')
WAV_SUFFIXES = (".wav", ".wave")


def fixed_split(labels: np.ndarray, split: str, where: str) -> np.ndarray:
    """Indices of ``split`` in a stratified 80/20 split with seed 0 (unstratified when a class has one sample)."""
    from sklearn.model_selection import train_test_split

    if len(labels) < 2:
        raise DataError(f"{where}: {len(labels)} sample(s) cannot be split into train and test")
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    try:
        train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SEED,
                                       stratify=strat)
    except ValueError as e:  # e.g. fewer test samples than classes
        raise DataError(f"{where}: cannot make the 80/20 stratified split of {len(labels)} samples in "
                        f"{int((counts > 0).sum())} classes ({str(e).splitlines()[0]}); give a split of your own "
                        "(a 'split' column, train/ and test/ folders, <stem>_test.npy)") from None
    return np.sort(train if split == "train" else test)


def _classes(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Sorted class names (numerically when all are numbers) and each value's index."""
    names = sorted(set(values))
    try:
        names = sorted(names, key=float)
    except ValueError:
        pass
    at = {n: i for i, n in enumerate(names)}
    return names, np.array([at[v] for v in values], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ tables
def _table_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'edgetrain[data]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow raises its own error types)
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
        cols = table.column_names
        data = [table.column(c).to_pylist() for c in cols]
        return cols, [["" if v is None else str(v) for v in row] for row in zip(*data)]
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM (Excel's "CSV UTF-8") is not a column
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a CSV text file (not UTF-8)") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: empty table (a header row and one row per sample are needed)")
    return [c.strip() for c in rows[0]], rows[1:]


def load_table(path: Path, split: str, label: str = "label") -> ImageData:
    """A CSV (header row) or Parquet table: numeric feature columns, the ``label`` column (any values: the class
    names) and an optional ``split`` column."""
    header, rows = _table_rows(path)
    if label not in header:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(header[:8])}"
                        f"{', ...' if len(header) > 8 else ''}); name it with label= (--label-column in the CLI)")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in the header")
    if not rows:
        raise DataError(f"{path}: the table has a header but no rows")
    li, si = header.index(label), header.index("split") if "split" in header else None
    features = [i for i in range(len(header)) if i not in (li, si)]
    if not features:
        raise DataError(f"{path}: no feature column besides {label!r}")
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"{path}: row {r + 2} has {len(row)} fields, the header {len(header)}")
        for j, i in enumerate(features):
            try:
                x[r, j] = float(row[i])
            except ValueError:
                raise DataError(f"{path}: row {r + 2}, column {header[i]!r}: {row[i]!r} is not a number") from None
    if not np.isfinite(x).all():
        r, j = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}: row {r + 2}, column {header[features[j]]!r} is {x[r, j]} (not finite)")
    classes, y = _classes([row[li].strip() for row in rows])
    if si is not None:
        split_of = [row[si].strip().lower() for row in rows]
        bad = sorted(set(split_of) - {"train", "test"})
        if bad:
            raise DataError(f"{path}: column 'split' holds {bad[0]!r}; expected train or test")
        index = np.array([i for i, v in enumerate(split_of) if v == split], dtype=np.int64)
        if not len(index):
            raise DataError(f"{path}: no row has split={split}")
    else:
        index = fixed_split(y, split, str(path))
    return ImageData(torch.from_numpy(x[index]), torch.from_numpy(y[index]), classes, f"{path}:{split}")


# ------------------------------------------------------------------------------------------------------ audio
def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM WAV file (8-bit unsigned, 16/24/32-bit
    signed; channels averaged)."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise DataError(f"{path}: not a PCM WAV file ({e or 'truncated'})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if n == 0 or len(raw) < width * channels:
        raise DataError(f"{path}: the WAV file holds no samples")
    raw = raw[:len(raw) // (width * channels) * width * channels]
    if width == 1:
        a = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        a = np.frombuffer(raw, "<i2").astype(np.float32) / 2**15
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        a = (np.where(v >= 2**23, v - 2**24, v)).astype(np.float32) / 2**23
    elif width == 4:
        a = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise DataError(f"{path}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    return a.reshape(-1, channels).mean(1), rate


def frame(a: np.ndarray, rate: int, sample_rate: int, length: int) -> np.ndarray:
    """Resampled to ``sample_rate`` (polyphase, scipy) and cut or zero-padded at the end to ``length`` samples."""
    if rate != sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, sample_rate)
        a = resample_poly(a, sample_rate // g, rate // g).astype(np.float32)
    out = np.zeros(length, dtype=np.float32)
    out[:min(length, len(a))] = a[:length]
    return out


def load_wav_folder(root: Path, split: str, sample_rate: int = 16000, seconds: float = 1.0) -> ImageData:
    """One subfolder of WAV files per class (``train/`` and ``test/`` subfolders if present), each clip resampled
    to ``sample_rate`` and framed to ``seconds`` (cut or zero-padded): samples (N, 1, T) float32 in [-1, 1]."""
    if not isinstance(sample_rate, int) or sample_rate <= 0 or not seconds > 0:
        raise DataError(f"{root}: sample_rate must be a positive int and seconds > 0, got {sample_rate!r}, "
                        f"{seconds!r}")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if has_split else root

    def dirs(d: Path) -> set[str]:
        return {c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")}

    # the classes of both splits: a class missing from one split keeps its index in the other
    names = sorted(dirs(root / "train") | dirs(root / "test")) if has_split else sorted(dirs(base))
    files = [(c, f) for c in names if (base / c).is_dir() for f in sorted((base / c).iterdir())
             if f.suffix.lower() in WAV_SUFFIXES]
    if not files:
        raise DataError(f"{base}: no WAV files in class subfolders (expected {base}/<class>/*.wav)")
    length = round(sample_rate * seconds)
    x = np.stack([frame(*read_wav(f), sample_rate, length) for _, f in files])[:, None, :]  # (N, 1, T)
    y = np.array([names.index(c) for c, _ in files], dtype=np.int64)
    index = np.arange(len(y)) if has_split else fixed_split(y, split, str(root))
    return ImageData(torch.from_numpy(x[index]), torch.from_numpy(y[index]), names, f"{root}:{split}")


# ------------------------------------------------------------------------------------------------ sensor windows
def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array for {what} ({str(e).splitlines()[0][:120]})") from None


def load_windows(path: Path, split: str) -> ImageData:
    """Sensor windows: ``<stem>.npy`` (N, C, T) or (N, T) numbers and ``<stem>_labels.npy`` (N,) integer class
    labels beside it; ``<stem>_test.npy`` and ``<stem>_test_labels.npy`` are the test split when present."""
    stem = path.with_suffix("")
    test = Path(f"{stem}_test.npy")
    src = test if split == "test" and test.exists() else path
    labels_path = Path(f"{src.with_suffix('')}_labels.npy")
    if not labels_path.exists():
        raise DataError(f"{src}: its labels file {labels_path.name} is missing (one integer label per window)")
    x, y = _load_npy(src, "windows"), _load_npy(labels_path, "labels")
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{src}: windows must be a numeric (N, C, T) or (N, T) array, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{labels_path}: needs {len(x)} non-negative integer labels, got {y.dtype} {y.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{src}: window {int(np.argwhere(~np.isfinite(x))[0][0])} holds a non-finite value")
    index = np.arange(len(y)) if src == test or (split == "train" and test.exists()) else fixed_split(
        y, split, str(path))
    other = Path(f"{test.with_suffix('')}_labels.npy") if src != test else labels_path.with_name(
        f"{stem.name}_labels.npy")
    top = int(y.max()) if len(y) else -1
    if test.exists() and other.exists():  # both splits' labels: the same classes in either
        top = max(top, int(_load_npy(other, "labels").max(initial=-1)))
    classes = [str(i) for i in range(top + 1)]
    return ImageData(torch.from_numpy(np.ascontiguousarray(x[index])), torch.from_numpy(y[index].astype(np.int64)),
                     classes, f"{src}:{split}")
