from __future__ import annotations

import collections
import contextlib
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

import edgetrain.data.idx as idx_module
from edgetrain.data import IMAGENET_MEAN, IMAGENET_STD, Transform, channel_stats, default_source, \
    find_fashion_mnist, load_data, read_idx
from edgetrain.errors import ConfigError, DataError

N, H = 20, 28
STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path, array, gz=True):
    array = np.asarray(array)
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_idx_dir(d, n=N, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    imgs, lbls = rng.integers(0, 256, (n, H, H)), rng.integers(0, 10, n)
    for img_stem, lbl_stem in STEMS.values():
        write_idx(d / (img_stem + (".gz" if gz else "")), imgs, gz)
        write_idx(d / (lbl_stem + (".gz" if gz else "")), lbls, gz)
    return imgs, lbls


@contextlib.contextmanager
def raises_one_line(exc, *fragments):
    """The block raises ``exc`` with a one-line message containing every fragment."""
    with pytest.raises(exc) as info:
        yield
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert str(fragment) in msg, (fragment, msg)


# ---------------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    imgs, lbls = make_idx_dir(tmp_path, gz=gz)
    d = load_data(tmp_path, "test", normalize="none")
    assert len(d) == N and d.images.dtype == torch.uint8 and d.images.shape == (N, 1, H, H)
    assert np.array_equal(d.images[:, 0].numpy(), imgs) and np.array_equal(d.labels.numpy(), lbls)
    assert d.labels.dtype == torch.int64 and d.name.endswith("test")
    x, y = d.batch(torch.tensor([4, 1]))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0], torch.from_numpy(imgs[[4, 1]]).float() / 255)
    assert y.tolist() == lbls[[4, 1]].tolist()


def test_idx_dotted_names_and_limit(tmp_path):
    imgs, lbls = make_idx_dir(tmp_path, gz=False)
    for stem in STEMS["train"]:
        (tmp_path / stem).rename(tmp_path / stem.replace("-idx", ".idx"))
    d = load_data(tmp_path, "train", limit=7, normalize="none")
    assert len(d) == 7 and np.array_equal(d.images[:, 0].numpy(), imgs[:7]) and d.labels.tolist() == lbls[:7].tolist()
    assert d.images.untyped_storage().nbytes() == 7 * H * H  # the rest was freed


def test_fashion_mnist_env_var_and_default(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.delenv("EDGETRAIN_FASHION_MNIST", raising=False)
    assert find_fashion_mnist() is None and default_source() == "digits"
    make_idx_dir(tmp_path)
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(tmp_path))
    assert find_fashion_mnist() == tmp_path and default_source() == "fashion-mnist"
    d = load_data(None, "test")
    assert d.name == "fashion-mnist/test" and d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"


def test_missing_fashion_mnist_and_mnist_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(tmp_path / "mine"))
    with raises_one_line(DataError, "Fashion-MNIST not found", tmp_path / "mine", tmp_path / "debian",
                         "apt-get install dataset-fashion-mnist", "EDGETRAIN_FASHION_MNIST"):
        load_data("fashion-mnist")
    monkeypatch.delenv("EDGETRAIN_MNIST", raising=False)
    with raises_one_line(DataError, "MNIST not found", "$EDGETRAIN_MNIST is unset"):
        load_data("mnist")
    make_idx_dir(tmp_path)
    monkeypatch.setenv("EDGETRAIN_MNIST", str(tmp_path))
    assert load_data("mnist", "train").name == "mnist/train"


def _gz_payload(p, cut):
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:cut]))


@pytest.mark.parametrize("target,mutate,fragments", [
    ("train-images-idx3-ubyte.gz", lambda p: _gz_payload(p, 16 + 500),
     ["truncated: expected 15680 bytes of pixels, found 500"]),
    ("train-images-idx3-ubyte.gz", lambda p: _gz_payload(p, 10), ["truncated: header ends after 10 of 16 bytes"]),
    ("train-labels-idx1-ubyte.gz", lambda p: _gz_payload(p, 8 + 3),
     ["truncated: expected 20 bytes of labels, found 3"]),
    ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:40]), ["bad gzip"]),
    ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.decompress(p.read_bytes())), ["bad gzip"]),
    ("train-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros(N)),
     ["bad magic 0x00000801 (expected 0x00000803"]),
    ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + b"\0" * 64)),
     ["bad magic 0x01020304"]),
    ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"xy")),
     ["too long"]),
    ("train-images-idx3-ubyte.gz", lambda p: p.unlink(), ["file not found"]),
    ("train-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(7)), ["7 labels for 20 images"]),
    ("train-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros((N, 2))), ["bad magic 0x00000802"]),
])
def test_malformed_idx_names_the_file(tmp_path, target, mutate, fragments):
    make_idx_dir(tmp_path)
    mutate(tmp_path / target)
    with raises_one_line(DataError, tmp_path / target.removesuffix(".gz"), *fragments):
        load_data(tmp_path, "train")


def test_raw_idx_errors(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 5, 5)), gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with raises_one_line(DataError, p, "truncated: expected 100 bytes of data, found 90"):
        read_idx(p)
    g = tmp_path / "g-ubyte"
    g.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x05"))
    with raises_one_line(DataError, g, "bad magic 0x1f8b", "gzip-compressed: name it .gz"):
        read_idx(g)
    assert read_idx(write_idx(tmp_path / "ok-ubyte", [[1, 2]], gz=False)).tolist() == [[1, 2]]


def test_label_out_of_range_for_fashion(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(N, 12))
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(tmp_path))
    with raises_one_line(DataError, "t10k-labels-idx1-ubyte.gz", "label 12 out of range for 10 classes"):
        load_data("fashion-mnist", "test")


# ---------------------------------------------------------------------------------------------------- npz
@pytest.mark.filterwarnings("ignore::edgetrain.data.DataWarning")  # no test split: tested below
@pytest.mark.parametrize("shape,perm", [((6, 10, 12), None), ((6, 10, 12, 3), (0, 3, 1, 2)),
                                        ((6, 3, 10, 12), (0, 1, 2, 3))])
def test_npz_layouts(tmp_path, shape, perm):
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(6) % 2, classes=np.array(["a", "b"]))
    d = load_data(tmp_path / "d.npz", "test", normalize="none")
    want = x[:, None] if perm is None else x.transpose(perm)
    assert np.array_equal(d.images.numpy(), want) and d.classes == ["a", "b"] and d.name == str(tmp_path / "d.npz")
    assert d.with_transform(Transform(16, 1)).batch(torch.arange(6))[0].shape == (6, 1, 16, 16)


def test_npz_float_and_split_keys(tmp_path):
    x = np.random.default_rng(0).random((5, 4, 4))
    np.savez(tmp_path / "k.npz", x_train=x, y_train=np.arange(5), x_test=x[:2] * 0, y_test=np.zeros(2, np.int32))
    tr, te = load_data(tmp_path / "k.npz", "train", normalize="none"), load_data(tmp_path / "k.npz", "test")
    assert tr.images.dtype == torch.float32 and torch.allclose(tr.batch(torch.arange(5))[0][:, 0],
                                                               torch.from_numpy(x).float())
    assert (len(tr), len(te), tr.num_classes) == (5, 2, 5) and te.name.endswith(":test")


@pytest.mark.parametrize("arrays,fragments", [
    (dict(a=np.zeros(3)), ["needs image array 'x'", "found ['a']"]),
    (dict(x=np.zeros((4, 5, 5)), y=np.zeros(3, int)), ["'y' holds 3 labels", "for 4 images"]),
    (dict(x=np.zeros((4, 5, 5)), y=np.array([0, 1, -1, 0])), ["non-negative integers"]),
    (dict(x=np.zeros((4, 5, 5)), y=np.zeros(4)), ["non-negative integers, got float64"]),
    (dict(x=np.full((2, 5, 5), 255.0), y=np.zeros(2, int)), ["must lie in [0, 1], found 255..255"]),
    (dict(x=np.zeros((2, 5)), y=np.zeros(2, int)), ["must be (N, H, W)"]),
    (dict(x=np.zeros((2, 5, 5)), y=np.array([0, 3]), classes=np.array(["a", "b"])), ["label 3 out of range"]),
])
def test_npz_errors(tmp_path, arrays, fragments):
    np.savez(tmp_path / "bad.npz", **arrays)
    with raises_one_line(DataError, tmp_path / "bad.npz", *fragments):
        load_data(tmp_path / "bad.npz")


def test_npz_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with raises_one_line(DataError, "junk.npz: not a readable .npz"):
        load_data(tmp_path / "junk.npz")
    with open(tmp_path / "one.npz", "wb") as f:
        np.save(f, np.zeros(3))
    with raises_one_line(DataError, "one.npz: holds a single .npy array"):
        load_data(tmp_path / "one.npz")


# ---------------------------------------------------------------------------------------------------- ImageFolder
def save_png(path, value, size=(12, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


@pytest.mark.filterwarnings("ignore::edgetrain.data.DataWarning")  # no test split: tested below
def test_image_folder_whole_dir(tmp_path):
    for c in ("cat", "dog"):
        for i in range(3):
            save_png(tmp_path / c / f"{i}.png", 40 * i + (c == "dog"))
    save_png(tmp_path / "dog" / "big.png", 7, size=(20, 16))  # another size: resized to the commonest 12x12
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    d = load_data(tmp_path, "test", image_size=8, channels=3)
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert d.images.shape == (7, 3, 12, 12) and d.images[4, :, 0, 0].tolist() == [41] * 3
    assert d.batch(torch.arange(7))[0].shape == (7, 3, 8, 8)


def test_image_folder_splits_share_classes_and_gray_stays_gray(tmp_path):
    for c in ("a", "b", "c"):
        save_png(tmp_path / "train" / c / "0.png", 10, mode="L")
    save_png(tmp_path / "test" / "c" / "0.png", 99, mode="L")
    te = load_data(tmp_path, "test", normalize="none")
    assert te.classes == ["a", "b", "c"] and te.labels.tolist() == [2] and te.images.shape == (1, 1, 12, 12)
    assert len(load_data(tmp_path, "train")) == 3
    (tmp_path / "test").rename(tmp_path / "val")
    with raises_one_line(DataError, tmp_path, "has no test/ subfolder (found train/)"):
        load_data(tmp_path, "test")


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with raises_one_line(DataError, tmp_path / "empty", "empty ImageFolder"):
        load_data(tmp_path / "empty")
    save_png(tmp_path / "f" / "a" / "ok.png", 1)
    (tmp_path / "f" / "a" / "broken.png").write_bytes(b"not a png")
    with raises_one_line(DataError, tmp_path / "f" / "a" / "broken.png", "unreadable image"):
        load_data(tmp_path / "f")


# ---------------------------------------------------------------------------------------------------- options
def test_unknown_source_split_and_options(tmp_path):
    with raises_one_line(DataError, "unknown data source", "fashion_mnist", "digits"):
        load_data("fashion_mnist")
    with raises_one_line(DataError, "unknown split 'val'"):
        load_data("digits", "val")
    (tmp_path / "a.txt").write_text("1,2")
    with raises_one_line(DataError, tmp_path / "a.txt", "unsupported data file"):
        load_data(tmp_path / "a.txt")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 2, 2)), gz=False)
    with raises_one_line(DataError, "an IDX file; pass the directory"):
        load_data(tmp_path / "train-images-idx3-ubyte")
    for kwargs, fragment in [(dict(normalize="zscore"), "normalize"), (dict(channels=2), "channels"),
                             (dict(image_size=0), "image_size"), (dict(limit=-1), "limit")]:
        with raises_one_line(ConfigError, fragment):
            load_data("digits", **kwargs)
    with raises_one_line(ConfigError, "Transform.mean/std"):
        Transform(mean=(0.5,))
    np.savez(tmp_path / "rgba.npz", x=np.zeros((2, 4, 4, 4), np.uint8), y=np.zeros(2, int))
    with raises_one_line(DataError, "rgba.npz", "cannot turn 4-channel images into 3 channels"):
        load_data(tmp_path / "rgba.npz", channels=3)
    with raises_one_line(DataError, "rgba.npz", "imagenet normalisation needs 1 or 3 channels"):
        load_data(tmp_path / "rgba.npz")


# ---------------------------------------------------------------------------------------------------- batches
def test_batches_are_deterministic_and_resumable():
    d = load_data("digits", "train")
    rng_state = torch.get_rng_state()
    full = list(d.batches(16, seed=3, epoch=1))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    again = list(d.batches(16, seed=3, epoch=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    other = list(d.batches(16, seed=3, epoch=2))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(full, other))
    tail = list(d.batches(16, seed=3, epoch=1, start=5))
    assert len(tail) == len(full) - 5 and all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], tail))
    assert len(full) == d.steps_per_epoch(16) == len(d) // 16
    seen = torch.cat([y for _, y in d.batches(16, shuffle=False, drop_last=False)])
    assert torch.equal(seen, d.labels) and d.steps_per_epoch(16, drop_last=False) == -(-len(d) // 16)
    with raises_one_line(DataError, "digits/train", "fewer than one batch of 5000"):
        d.steps_per_epoch(5000)
    with raises_one_line(ConfigError, "start"):
        next(d.batches(16, start=-1))


# ---------------------------------------------------------------------------------------------------- transform
def test_transform_shape_and_imagenet_normalisation(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.full((4, 28, 28), 128, np.uint8), y=np.zeros(4, int))
    d = load_data(tmp_path / "c.npz", image_size=64, channels=3)
    x, _ = d.batch(torch.arange(4))
    assert x.shape == (4, 3, 64, 64) and x.is_contiguous()
    want = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # (3,)
    assert torch.allclose(x.mean((0, 2, 3)), want, atol=1e-5) and x.std((0, 2, 3)).max() < 1e-5
    gray = load_data(tmp_path / "c.npz", channels=1).batch(torch.arange(1))[0]
    want_gray = (128 / 255 - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD)
    assert gray.shape == (1, 1, 28, 28) and torch.allclose(gray, torch.full_like(gray, want_gray), atol=1e-5)


def test_transform_gray_antialias_and_dataset_stats():
    rgb = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    rgb[:, 0], rgb[:, 1] = 255, 51  # gray = (1 + 0.2 + 0) / 3 = 0.4
    assert torch.allclose(Transform(channels=1)(rgb), torch.full((1, 1, 16, 16), 0.4))
    dots = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    dots[..., ::4, ::4] = 255  # one bright pixel per 4x4 block: plain bilinear sampling would miss every one
    small = Transform(image_size=8)(dots)
    assert small.shape == (1, 1, 8, 8) and small.min() > 0.03 and abs(small.mean() - 1 / 16) < 0.01
    d = load_data("digits", "train", channels=3, normalize="dataset")
    xs = d.batch(torch.arange(len(d)))[0]
    assert xs.mean((0, 2, 3)).abs().max() < 1e-4 and (xs.std((0, 2, 3)) - 1).abs().max() < 1e-3
    imgs = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(imgs, channels=1)
    g = (imgs.double() / 255).mean(1)
    assert len(mean) == 1 and abs(mean[0] - g.mean().item()) < 1e-6 and abs(std[0] - g.std(correction=0).item()) < 1e-6


# ---------------------------------------------------------------------------------------------------- digits, subset
def test_digits_split_is_fixed_stratified_partition():
    from sklearn.datasets import load_digits

    tr, te = load_data("digits", "train", normalize="none"), load_data("digits", "test", normalize="none")
    assert (len(tr), len(te)) == (1437, 360) and tr.name == "digits/train" and tr.images.max() == 1.0
    rows = lambda imgs: collections.Counter(map(tuple, (imgs.flatten(1) * 16).round().int().tolist()))  # noqa: E731
    all_rows = collections.Counter(map(tuple, load_digits().images.reshape(-1, 64).astype(int).tolist()))
    assert rows(tr.images) + rows(te.images) == all_rows  # together exactly the 1,797 images: a partition
    assert torch.bincount(te.labels).min() >= 35 and torch.equal(te.labels, load_data("digits", "test").labels)


def test_subset_is_fixed_per_seed():
    d = load_data("digits", "train")
    a, b, c = d.subset(100, seed=1), d.subset(100, seed=1), d.subset(100, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and len(a) == 100
    assert not torch.equal(a.images, c.images) and a.transform == d.transform
    with raises_one_line(DataError, "digits/train", "subset of 5000 from 1437"):
        d.subset(5000)
    assert "1437 x (1, 8, 8) float32" in repr(d)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    tr, te = load_data("fashion-mnist", "train"), load_data("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000) and tr.images.shape[1:] == (1, 28, 28)
    assert tr.images.dtype == torch.uint8 and (int(tr.labels.min()), int(tr.labels.max())) == (0, 9)
    assert torch.bincount(te.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------------- reliability
def test_a_source_without_a_test_split_warns(tmp_path):
    """Issue 11.8: data without a test split were evaluated on the training data without a warning."""
    from edgetrain.data import DataWarning

    np.savez(tmp_path / "d.npz", x=np.zeros((6, 4, 4), np.uint8), y=np.arange(6) % 2)
    with pytest.warns(DataWarning, match=r"d.npz: has no test split .*6 samples.*training accuracy"):
        load_data(tmp_path / "d.npz", "test")
    for c in ("a", "b"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "folder" / c / "0.png")
    with pytest.warns(DataWarning, match=r"folder: has no test split \(no train/ and test/ subfolders\)"):
        load_data(tmp_path / "folder", "test")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_data(tmp_path / "d.npz", "train")  # the training split itself: nothing to say
        np.savez(tmp_path / "k.npz", x_train=np.zeros((6, 4, 4), np.uint8), y_train=np.arange(6) % 2,
                 x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.arange(2))
        load_data(tmp_path / "k.npz", "test")  # a real test split
        (tmp_path / "idx").mkdir()
        make_idx_dir(tmp_path / "idx")
        load_data(tmp_path / "idx", "test")


def test_the_command_line_prints_the_warning_in_one_line(tmp_path, capsys):
    from edgetrain.cli import main

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (32, 8, 8)).astype(np.uint8),
             y=np.arange(32) % 4)
    assert main(["train", "--model", "small_cnn", "--data", str(tmp_path / "d.npz"), "--image-size", "8",
                 "--channels", "1", "--batch-size", "8", "--steps", "1", "--threads", "1", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if "warning" in ln] == [ln for ln in err if ln.startswith("edgetrain: warning: ")]
    assert len([ln for ln in err if "has no test split" in ln]) == 1


def test_a_limit_reads_only_the_first_idx_records(tmp_path):
    imgs, lbls = make_idx_dir(tmp_path, n=30)
    d = load_data(tmp_path, "train", limit=7, normalize="none")
    assert d.name.endswith("train[:7]") and np.array_equal(d.images[:, 0].numpy(), imgs[:7])
    assert load_data(tmp_path, "train", limit=30, normalize="none").name.endswith("/train")  # nothing cut


def test_a_huge_label_is_a_damaged_file_not_a_billion_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 2**40]))
    with raises_one_line(DataError, "implies more than 100,000 classes"):
        load_data(tmp_path / "d.npz", "train")


def test_smoke_mode_caps_the_samples(monkeypatch):
    monkeypatch.setenv("EDGETRAIN_SMOKE", "1")
    from edgetrain import smoke

    d = load_data("digits", "train")
    assert len(d) == smoke.SAMPLES and d.name == f"digits/train[:{smoke.SAMPLES}]"
