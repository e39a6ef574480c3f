"""Fuzz corpus of the loaders: valid files, mutated (bytes replaced, deleted, inserted, truncated), must either load
cleanly or raise an edgetrain error (:class:`edgetrain.errors.EdgetrainError`, one line): never another exception.

Bounded and deterministic (hypothesis, ``derandomize=True``); the number of cases per loader is in ``CASES``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import edgetrain as et
from edgetrain.bench import BenchSpec
from edgetrain.checkpoint import MAGIC, TRAILER, load_checkpoint, save_checkpoint
from edgetrain.cli._common import recipe as cli_recipe
from edgetrain.data import load_data, read_idx
from edgetrain.errors import EdgetrainError
from edgetrain.recipe import Recipe
from edgetrain.techniques import ActNN, SparseUpdate
from edgetrain.testing import tiny_model

CASES = 150


def fuzz(n: int = CASES):  # noqa: ANN201
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: a mutation: (kind, position as a fraction of the length, payload byte, run length)
MUTATION = st.tuples(st.sampled_from(["replace", "delete", "insert", "truncate"]), st.floats(0, 1, exclude_max=True),
                     st.integers(0, 255), st.integers(1, 16))
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def mutate(data: bytes, mutations) -> bytes:  # noqa: ANN001
    b = bytearray(data)
    for kind, where, byte, run in mutations:
        pos = int(where * len(b)) if b else 0
        if kind == "replace" and b:
            b[pos:pos + run] = bytes([byte]) * len(b[pos:pos + run])
        elif kind == "delete" and b:
            del b[pos:pos + run]
        elif kind == "insert":
            b[pos:pos] = bytes([byte]) * run
        else:
            del b[pos:]
    return bytes(b)


def loads_or_edgetrain_error(fn):  # noqa: ANN001, ANN201
    """``fn()``'s value, or ``None`` when it raised an EdgetrainError with a one-line message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except EdgetrainError as e:
        assert "\n" not in str(e), str(e)
        return None


_ROOT = Path(tempfile.mkdtemp(prefix="edgetrain-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _clean_scratch():
    yield
    shutil.rmtree(_ROOT, ignore_errors=True)


def scratch() -> Path:
    """A fresh directory per example (hypothesis examples cannot take function-scoped fixtures)."""
    return Path(tempfile.mkdtemp(dir=_ROOT))


# ---------------------------------------------------------------------------------------------------- IDX
def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 5, 5)).astype(np.uint8)
LABELS = (np.arange(6) % 3).astype(np.uint8)
IDX_FILES = {"train-images-idx3-ubyte": idx_bytes(IMAGES), "train-labels-idx1-ubyte": idx_bytes(LABELS),
             "t10k-images-idx3-ubyte": idx_bytes(IMAGES[:4]), "t10k-labels-idx1-ubyte": idx_bytes(LABELS[:4])}


@fuzz()
@given(victim=st.sampled_from(sorted(IDX_FILES)), gz=st.booleans(), split=st.sampled_from(["train", "test"]),
       mutations=MUTATIONS)
def test_idx_directories(victim, gz, split, mutations):
    d = scratch()
    for name, data in IDX_FILES.items():
        data = gzip.compress(data, mtime=0) if gz else data
        (d / (name + (".gz" if gz else ""))).write_bytes(mutate(data, mutations) if name == victim else data)
    data = loads_or_edgetrain_error(lambda: load_data(d, split, image_size=4, channels=3))
    if data is not None:
        x, y = data.batch(torch.arange(min(2, len(data))))
        assert x.shape[1:] == (3, 4, 4) and torch.isfinite(x).all()
    loads_or_edgetrain_error(lambda: read_idx(d / (victim + (".gz" if gz else ""))))


# ---------------------------------------------------------------------------------------------------- npz
def npz_bytes(layout: str) -> bytes:
    buf = io.BytesIO()
    if layout == "plain":
        np.savez(buf, x=IMAGES, y=LABELS.astype(np.int64))
    elif layout == "keras":
        np.savez(buf, x_train=IMAGES, y_train=LABELS, x_test=IMAGES[:3], y_test=LABELS[:3],
                 classes=np.array(["a", "b", "c"]))
    elif layout == "float":
        np.savez_compressed(buf, images=(IMAGES / 255).astype(np.float32), labels=LABELS.astype(np.int32))
    else:
        np.savez(buf, x=np.repeat(IMAGES[..., None], 3, -1), y=LABELS)
    return buf.getvalue()


@fuzz()
@given(layout=st.sampled_from(["plain", "keras", "float", "hwc"]), split=st.sampled_from(["train", "test"]),
       channels=st.sampled_from([1, 3, None]), normalize=st.sampled_from(["imagenet", "dataset", "none"]),
       mutations=MUTATIONS)
def test_npz_files(layout, split, channels, normalize, mutations):
    p = scratch() / "data.npz"
    p.write_bytes(mutate(npz_bytes(layout), mutations))
    data = loads_or_edgetrain_error(lambda: load_data(p, split, image_size=4, channels=channels, normalize=normalize))
    if data is not None:
        data.batch(torch.arange(min(2, len(data))))


# ---------------------------------------------------------------------------------------------------- ImageFolder
def png_bytes(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(IMAGES[i]).convert("RGB" if i % 2 else "L").save(buf, format=fmt)
    return buf.getvalue()


@fuzz(60)
@given(fmt=st.sampled_from(["PNG", "BMP", "GIF"]), which=st.integers(0, 5), split_dirs=st.booleans(),
       mutations=MUTATIONS)
def test_image_folders(fmt, which, split_dirs, mutations):
    root = scratch()
    base = root / "train" if split_dirs else root
    for i in range(6):
        cls = base / ("a" if i < 3 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        data = png_bytes(i, fmt)
        (cls / f"{i}.{fmt.lower()}").write_bytes(mutate(data, mutations) if i == which else data)
    data = loads_or_edgetrain_error(lambda: load_data(root, "train", image_size=4))
    if data is not None:
        data.batch(torch.arange(2))


# ---------------------------------------------------------------------------------------------------- checkpoint
def checkpoint_bytes() -> bytes:
    p = scratch() / "checkpoint.pt"
    m = tiny_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    save_checkpoint(p, {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 3, "config": {"lr": 0.1},
                        "rng": {"torch": torch.get_rng_state()}, "recipe": {"name": "plain"}, "fingerprint": {},
                        "techniques": {}})
    return p.read_bytes()


CHECKPOINT = checkpoint_bytes()


@fuzz(200)
@given(mutations=MUTATIONS)
def test_checkpoints_mutated_after_writing_never_load(mutations):
    """Any change to the file is detected (checksum): it loads only if the mutation changed nothing."""
    data = mutate(CHECKPOINT, mutations)
    p = scratch() / "checkpoint.pt"
    p.write_bytes(data)
    loaded = loads_or_edgetrain_error(lambda: load_checkpoint(p))
    assert loaded is None or data == CHECKPOINT


@fuzz(200)
@given(mutations=MUTATIONS)
def test_checkpoints_with_a_valid_checksum_over_damaged_content(mutations):
    """A file that passes the checksum (written so by another program) but holds damaged zip or pickle data: the
    parser and the layout checks turn whatever it is into one line."""
    body = mutate(CHECKPOINT[:-TRAILER - 22], mutations) + CHECKPOINT[-TRAILER - 22:-TRAILER]
    p = scratch() / "checkpoint.pt"
    p.write_bytes(body + MAGIC + hashlib.sha256(body).hexdigest().encode())
    loads_or_edgetrain_error(lambda: load_checkpoint(p))


@fuzz(40)
@given(mutations=MUTATIONS)
def test_resuming_from_a_damaged_checkpoint_is_an_edgetrain_error(mutations):
    out = scratch()
    data = load_data("digits", "train", normalize="dataset", limit=64)
    cfg = et.TrainConfig(steps=2, batch_size=16, threads=1, out_dir=str(out))
    if not (out / "checkpoint.pt").exists():
        et.train(tiny_model(), data, None, cfg, progress=False)
    ck = out / "checkpoint.pt"
    ck.write_bytes(mutate(ck.read_bytes(), mutations))
    loads_or_edgetrain_error(lambda: et.train(tiny_model(), data, None, cfg, resume=True, progress=False))


# ---------------------------------------------------------------------------------------------------- recipe
RECIPE = Recipe([ActNN(bits=4), et.Freeze(last_k_blocks=2, targets=["features.*"]),
                 SparseUpdate(bias_last_k=2, weights={"features.2.0": 0.5})], name="r")


@fuzz(300)
@given(fmt=st.sampled_from(["yaml", "json"]), mutations=MUTATIONS)
def test_recipe_files_as_the_command_line_reads_them(fmt, mutations):
    text = (RECIPE.to_yaml() if fmt == "yaml" else RECIPE.to_json()).encode()
    p = scratch() / f"recipe.{fmt}"
    p.write_bytes(mutate(text, mutations))
    loads_or_edgetrain_error(lambda: cli_recipe(argparse.Namespace(recipe=str(p))))


def test_a_binary_recipe_file_is_an_edgetrain_error_in_the_library(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: r\ntechniques: [\xff\xfe]\n")
    loads_or_edgetrain_error(lambda: Recipe.load(p))


# ---------------------------------------------------------------------------------------------------- bench config
BENCH = Path(__file__).parents[1] / "benchmarks" / "t3.yaml"


@fuzz(200)
@given(mutations=MUTATIONS)
def test_bench_configs(mutations):
    p = scratch() / "bench.yaml"
    p.write_bytes(mutate(BENCH.read_bytes(), mutations))
    loads_or_edgetrain_error(lambda: BenchSpec.load(p))
