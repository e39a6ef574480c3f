"""Your own non-image data: CSV/Parquet tables, WAV folders, .npy sensor windows; splits, normalisation, training a
model on them, and one-line errors for malformed files."""

from __future__ import annotations

import json
import re
import wave

import numpy as np
import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.data import load_data
from edgetrain.data.signals import read_wav
from edgetrain.errors import DataError
from edgetrain.train import TrainConfig


def _table(tmp_path, rows=60, split=False):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    lines = ["a,b,label" + (",split" if split else "")]
    for i in range(rows):
        c = ["cat", "dog", "eel"][i % 3]
        lines.append(f"{rng.normal() + 3 * (i % 3):.4f},{rng.normal():.4f},{c}" + (
            f",{'test' if i % 5 == 0 else 'train'}" if split else ""))
    p = tmp_path / "t.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_a_csv_table_loads_with_a_fixed_stratified_split_and_per_feature_normalisation(tmp_path):
    p = _table(tmp_path)
    tr, te = load_data(p, "train"), load_data(p, "test")
    assert tr.images.shape == (48, 2) and te.images.shape == (12, 2) and tr.classes == ["cat", "dog", "eel"]
    assert torch.equal(torch.bincount(te.labels), torch.tensor([4, 4, 4]))
    x, _ = tr.batch(torch.arange(len(tr)))
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)  # "auto": the split's own stats
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert torch.equal(load_data(p, "train").images, tr.images)  # the same split every time
    s = _table(tmp_path, split=True)
    assert len(load_data(s, "test")) == 12 and len(load_data(s, "train")) == 48


def test_a_parquet_table_equals_the_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = _table(tmp_path)
    pq.write_table(pcsv.read_csv(p), tmp_path / "t.parquet")
    a, b = load_data(p, "train"), load_data(tmp_path / "t.parquet", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and pa


def _wav(path, samples, rate, width=2, channels=1):  # noqa: ANN001, ANN202
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.repeat(np.asarray(samples, dtype=np.float64)[:, None], channels, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((a * 127 + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes((a * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes())


def test_a_wav_folder_is_resampled_and_framed(tmp_path):
    t = np.arange(8000) / 8000
    for k, (cls, f) in enumerate([("hum", 200.0), ("beep", 1000.0)]):
        for i in range(5):
            _wav(tmp_path / "train" / cls / f"{i}.wav", 0.5 * np.sin(2 * np.pi * f * t), 8000, channels=1 + i % 2)
            _wav(tmp_path / "test" / cls / f"{i}.wav", 0.5 * np.sin(2 * np.pi * f * t[:4000]), 16000)
    tr = load_data(tmp_path, "train", sample_rate=16000, seconds=0.5, normalize="none")
    te = load_data(tmp_path, "test", sample_rate=16000, seconds=0.5, normalize="none")
    assert tr.images.shape == (10, 1, 8000) and te.images.shape == (10, 1, 8000) and tr.classes == ["beep", "hum"]
    assert float(tr.images.abs().max()) == pytest.approx(0.5, abs=0.02)  # resampled 8 kHz -> 16 kHz, amplitude kept
    assert float(te.images[0, 0, 4000:].abs().max()) == 0  # 0.25 s at 16 kHz zero-padded to 0.5 s
    a, rate = read_wav(tmp_path / "train" / "hum" / "1.wav")  # stereo averaged to mono
    assert rate == 8000 and a.shape == (8000,)


def test_npy_sensor_windows_with_their_labels(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "imu.npy", rng.normal(size=(40, 3, 50)).astype(np.float32))
    np.save(tmp_path / "imu_labels.npy", np.arange(40) % 4)
    tr, te = load_data(tmp_path / "imu.npy", "train"), load_data(tmp_path / "imu.npy", "test")
    assert tr.images.shape == (32, 3, 50) and te.images.shape == (8, 3, 50) and tr.num_classes == 4
    np.save(tmp_path / "imu_test.npy", rng.normal(size=(6, 3, 50)))
    np.save(tmp_path / "imu_test_labels.npy", np.arange(6) % 4)
    assert len(load_data(tmp_path / "imu.npy", "test")) == 6 and len(load_data(tmp_path / "imu.npy", "train")) == 40


def test_training_a_user_model_on_a_table_and_on_windows(tmp_path):
    p = _table(tmp_path, rows=90)
    tr, te = load_data(p, "train"), load_data(p, "test")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    r = et.train(mlp, tr, te, TrainConfig(steps=60, batch_size=8, lr=0.1, threads=1), progress=False)
    assert r.accuracy > 0.8  # three well-separated clusters in feature a
    rng = np.random.default_rng(2)
    np.save(tmp_path / "w.npy", rng.normal(size=(48, 2, 32)).astype(np.float32))
    np.save(tmp_path / "w_labels.npy", np.arange(48) % 2)
    conv = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))
    m = et.measure(conv, next(iter(load_data(tmp_path / "w.npy", "train").batches(8))), recipe=et.ActNN(bits=2),
                   repeats=0)
    assert m.saved_bytes > 0


@pytest.mark.parametrize("content,match", [
    ("a,b\n1,2\n", "no label column 'label'"),
    ("a,label\n1,x\nfoo,y\n", r"row 3, column 'a': 'foo' is not a number"),
    ("a,label\n1,x\n2\n", "row 3 has 1 fields"),
    ("a,label\n", "no rows"),
    ("a,label,split\n1,x,train\n2,y,val\n", "holds 'val'"),
    ("a,label\nnan,x\n1,y\n", "not finite"),
])
def test_malformed_tables_are_one_line(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        load_data(p, "train")
    assert "\n" not in str(e.value)


def test_malformed_audio_windows_and_image_options_are_one_line(tmp_path):
    (tmp_path / "snd" / "a").mkdir(parents=True)
    (tmp_path / "snd" / "a" / "x.wav").write_bytes(b"RIFF0000WAVEjunk")
    np.save(tmp_path / "w.npy", np.zeros((4, 2, 3)))
    np.save(tmp_path / "v.npy", np.zeros((4, 2, 3)))
    np.save(tmp_path / "v_labels.npy", np.zeros(3, dtype=np.int64))
    cases = [((tmp_path / "snd",), "not a PCM WAV file"), ((tmp_path / "w.npy",), "w_labels.npy is missing"),
             ((tmp_path / "v.npy",), "needs 4 non-negative integer labels"),
             ((_table(tmp_path),), "apply to images only")]
    for i, (args, match) in enumerate(cases):
        kw = {"image_size": 32} if i == 3 else {}
        with pytest.raises(DataError, match=match) as e:
            load_data(*args, "train", **kw)
        assert "\n" not in str(e.value)


def test_review_findings_splits_share_classes_and_statistics_and_a_workload_loads_a_table(tmp_path):
    """WAV classes missing from one split keep their index; a table's test split uses the training statistics; a
    BOM'd CSV reads; too few rows to split is one line; a Workload (train, bench, CLI) takes a table."""
    t = np.arange(800) / 8000
    for cls in ("cat", "dog", "eel"):
        _wav(tmp_path / "snd" / "train" / cls / "0.wav", np.sin(2 * np.pi * 300 * t), 8000)
    for cls in ("cat", "eel"):
        _wav(tmp_path / "snd" / "test" / cls / "0.wav", np.sin(2 * np.pi * 300 * t), 8000)
    te = load_data(tmp_path / "snd", "test", sample_rate=8000, seconds=0.1)
    assert te.classes == ["cat", "dog", "eel"] and te.labels.tolist() == [0, 2]
    p = _table(tmp_path)
    assert load_data(p, "test").transform.mean == load_data(p, "train").transform.mean
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert torch.equal(load_data(bom, "train").images, load_data(p, "train").images)
    few = tmp_path / "few.csv"
    few.write_text("a,label\n" + "".join(f"{i},{i}\n" for i in range(10)) * 2)
    with pytest.raises(DataError, match="cannot make the 80/20 stratified split") as e:
        load_data(few, "train")
    assert "\n" not in str(e.value)
    wl = et.Workload(model="small_cnn", data=str(p))
    assert len(wl.load_data("train")) == 48 and wl.load_data("test").transform.mean == load_data(p).transform.mean


# ------------------------------------------------------------------------------------------- the command line
NETS = '''from torch import nn

def mlp(num_classes, features=2):
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, num_classes))

def audio(num_classes):
    return nn.Sequential(nn.Conv1d(1, 4, 9, stride=4), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def _cli(args, capsys):  # noqa: ANN001, ANN202
    from edgetrain.cli import main

    code = main([*args, "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_reads_a_tables_label_column_and_a_wav_folders_framing(tmp_path, capsys, monkeypatch):
    """--label-column, --sample-rate and --seconds reach the data (train, measure and plan on a user's models)."""
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path / "cache"))
    p = _table(tmp_path, rows=90)
    p.write_text(p.read_text().replace("a,b,label", "a,b,kind", 1))
    common = ["--model", "nets:mlp", "--data", str(p), "--batch-size", "8"]
    code, _, err = _cli(["train", *common, "--steps", "1", "--out", str(tmp_path / "r0"), "--no-progress"], capsys)
    assert code == 2 and "no label column 'label'" in err and "--label-column" in err
    code, out, err = _cli(["train", *common, "--label-column", "kind", "--steps", "60", "--lr", "0.1", "--out",
                           str(tmp_path / "r1"), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["accuracy"] > 0.8  # the three clusters of feature a, as in train()
    code, out, err = _cli(["plan", *common, "--label-column", "kind", "--budget", "64KiB", "--analysis-steps", "2"],
                          capsys)
    assert code == 0, err
    assert "predicted peak RAM" in out
    for i in range(4):
        t = np.arange(8000) / 8000
        _wav(tmp_path / "snd" / "hum" / f"{i}.wav", 0.5 * np.sin(2 * np.pi * 200 * t), 8000)
        _wav(tmp_path / "snd" / "beep" / f"{i}.wav", 0.5 * np.sin(2 * np.pi * 1000 * t), 8000)
    code, out, err = _cli(["measure", "--model", "nets:audio", "--data", str(tmp_path / "snd"), "--batch-size", "2",
                           "--sample-rate", "4000", "--seconds", "0.5", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["peak_split"]["batch"] == 2 * 1 * 2000 * 4 + 2 * 8  # (2, 1, 4 kHz x 0.5 s) fp32 + labels
    code, out, err = _cli(["measure", "--model", "nets:audio", "--data", str(tmp_path / "snd"), "--batch-size", "2",
                           "--sample-rate", "4000", "--seconds", "0.5"], capsys)
    assert code == 0 and "batch 2x1x2000," in out.splitlines()[0], out


@pytest.mark.parametrize("flags,match", [
    (["--data", "digits", "--label-column", "y"], "--label-column applies to a table, and digits is an image dataset"),
    (["--data", "TABLE", "--seconds", "2"], "--seconds applies to a WAV folder, and .*t.csv is a table"),
    (["--data", "TABLE", "--label-column", ""], "--label-column must name a column"),
])
def test_data_flags_on_the_wrong_data_are_one_line(tmp_path, capsys, flags, match):
    flags = [str(_table(tmp_path)) if f == "TABLE" else f for f in flags]
    code, _, err = _cli(["measure", "--model", "small_cnn", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
