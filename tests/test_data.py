from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

import edgetrain as et
from edgetrain.data import find_fashion_mnist, load_data, read_idx


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_dir(tmp_path, n=20, gz=True):
    rng = np.random.default_rng(0)
    imgs, lbls = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    sfx = ".gz" if gz else ""
    for split, (i, l) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        write_idx(tmp_path / (i + sfx), imgs, gz)
        write_idx(tmp_path / (l + sfx), lbls, gz)
    return imgs, lbls


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    imgs, lbls = make_idx_dir(tmp_path, gz=gz)
    d = load_data(tmp_path, "train", normalize="none")
    assert len(d) == 20 and d.images.dtype == torch.uint8
    assert np.array_equal(d.images[:, 0].numpy(), imgs) and np.array_equal(d.labels.numpy(), lbls)
    x, y = d.batch(torch.arange(3))
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs[:3]).float() / 255)


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(tmp_path))
    d = load_data("fashion-mnist", "test")
    assert d.classes[0] == "T-shirt/top" and len(d) == 20


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.write_bytes(gzip.compress(p.read_bytes() and gzip.decompress(p.read_bytes())[:500])), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "bad or truncated gzip"),
    (lambda p: p.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + b"\x00" * 64)), "bad magic"),
    (lambda p: p.unlink(), "file not found"),
])
def test_malformed_idx_names_the_file(tmp_path, mutate, match):
    make_idx_dir(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    mutate(bad)
    with pytest.raises(et.DataError, match=match) as e:
        load_data(tmp_path, "train")
    assert "train-images-idx3-ubyte" in str(e.value) and "\n" not in str(e.value)


def test_label_count_mismatch_and_range(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7))
    with pytest.raises(et.DataError, match="7 labels for 20 images"):
        load_data(tmp_path, "train")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 12))
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(tmp_path))
    with pytest.raises(et.DataError, match="label 12 out of range for 10 classes"):
        load_data("fashion-mnist", "test")


def test_read_idx_truncated_raw_file(tmp_path):
    p = write_idx(tmp_path / "x-ubyte", np.zeros((4, 5, 5)), gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(et.DataError, match=r"truncated: expected 100 bytes of data for shape \(4, 5, 5\), found 90"):
        read_idx(p)


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "hwc.npz", x=rng.integers(0, 256, (6, 10, 10, 3)).astype(np.uint8), y=np.arange(6) % 2,
             classes=np.array(["a", "b"]))
    d = load_data(tmp_path / "hwc.npz", image_size=16, channels=1, normalize="none")
    assert d.images.shape == (6, 3, 10, 10) and d.classes == ["a", "b"]
    assert d.batch(torch.arange(6))[0].shape == (6, 1, 16, 16)
    np.savez(tmp_path / "nokeys.npz", a=np.zeros(3))
    with pytest.raises(et.DataError, match="nokeys.npz: needs arrays 'x'"):
        load_data(tmp_path / "nokeys.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((4, 5, 5)), y=np.zeros(3, dtype=int))
    with pytest.raises(et.DataError, match="len.npz: 3 labels"):
        load_data(tmp_path / "len.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(et.DataError, match="junk.npz: not a readable .npz"):
        load_data(tmp_path / "junk.npz")


def test_image_folder(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_data(tmp_path, image_size=8, channels=3)
    assert d.classes == ["cat", "dog"] and len(d) == 6 and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(et.DataError, match="broken.png: unreadable image"):
        load_data(tmp_path)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(et.DataError, match="no images found"):
        load_data(empty)


def test_unknown_source_split_and_options(tmp_path):
    with pytest.raises(et.DataError, match="no such file or directory"):
        load_data(tmp_path / "missing")
    with pytest.raises(et.DataError, match="unknown split 'val'"):
        load_data("digits", "val")
    with pytest.raises(et.DataError, match="unknown normalize"):
        load_data("digits", normalize="zscore")
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(et.DataError, match="unsupported data file"):
        load_data(tmp_path / "a.csv")


def test_batches_are_deterministic_and_resumable():
    d = load_data("digits", "train")
    full = list(d.batches(16, seed=3, epoch=1))
    again = list(d.batches(16, seed=3, epoch=1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full, again))
    other = list(d.batches(16, seed=3, epoch=2))
    assert not torch.equal(full[0][1], other[0][1]) or not torch.equal(full[0][0], other[0][0])
    tail = list(d.batches(16, seed=3, epoch=1, start=5))
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], tail))
    assert len(full) == d.steps_per_epoch(16) == len(d) // 16


def test_transform_shapes_and_normalisation():
    d = load_data("digits", "train", image_size=64, channels=3, normalize="imagenet")
    x, _ = d.batch(torch.arange(4))
    assert x.shape == (4, 3, 64, 64)
    const = d.with_transform(d.transform.__class__(64, 3, (0.5,), (0.25,), 16.0))
    const.images = torch.full_like(d.images[:2], 8.0)  # 8/16 = 0.5 everywhere -> normalised to 0
    assert torch.allclose(const.batch(torch.arange(2))[0], torch.zeros(2, 3, 64, 64), atol=1e-6)
    ds = load_data("digits", "train", normalize="dataset")
    xs = ds.batch(torch.arange(len(ds)))[0]
    assert abs(xs.mean().item()) < 1e-3 and abs(xs.std().item() - 1) < 1e-2


def test_digits_split_is_fixed_and_disjoint():
    tr, te = load_data("digits", "train"), load_data("digits", "test")
    assert (len(tr), len(te)) == (1437, 360)
    flat = lambda d: {tuple(r) for r in d.images.flatten(1).tolist()}  # noqa: E731
    assert len(flat(tr) & flat(te)) < 5  # digits has a handful of duplicate images across classes at most
    sub = tr.subset(100, seed=1)
    assert torch.equal(sub.labels, tr.subset(100, seed=1).labels) and len(sub) == 100


@pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    tr, te = load_data("fashion-mnist", "train"), load_data("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000)
    assert tr.images.shape[1:] == (1, 28, 28) and int(tr.labels.max()) == 9
    assert torch.bincount(te.labels).tolist() == [1000] * 10
