"""Training loop: learning, exact resume (in-process and after SIGKILL), NaN handling, bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import edgetrain as et
from edgetrain.checkpoint import load_checkpoint
from edgetrain.data import load_data
from edgetrain.models import create_model
from edgetrain.testing import tiny_model
from edgetrain.train import TrainConfig, evaluate, lr_at, train


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "train", normalize="dataset"), load_data("digits", "test", normalize="dataset")


def cfg(tmp_path=None, **kw):
    base = dict(steps=12, batch_size=16, lr=0.05, seed=3, threads=1)
    if tmp_path is not None:
        base["out_dir"] = str(tmp_path)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_small_cnn_learns_digits(digits):
    tr, te = digits
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=0.5)
    before = evaluate(model, te)
    res = train(model, tr, te, TrainConfig(steps=120, batch_size=32, lr=0.05, seed=0, threads=1), progress=False)
    assert res.accuracy > 0.85 > before + 0.5  # 120 steps (about 2.7 epochs) of SGD on 1,437 digits
    assert res.history[0]["loss"] > res.history[-1]["loss"]


def test_resume_after_interrupt_gives_identical_weights(tmp_path, digits):
    tr, _ = digits
    full = tiny_model(seed=1)
    train(full, tr, None, cfg(), progress=False)

    def stop_at_7(step, rec):
        if step == 7:
            raise KeyboardInterrupt

    first = tiny_model(seed=1)
    with pytest.raises(KeyboardInterrupt):
        train(first, tr, None, cfg(tmp_path, checkpoint_every=3), progress=False, callback=stop_at_7)
    torch.manual_seed(12345)  # whatever the RNG did in between must not matter
    resumed = tiny_model(seed=1)
    res = train(resumed, tr, None, cfg(tmp_path, checkpoint_every=3), resume=True, progress=False)
    assert res.steps == 12 and res.history[0]["step"] == 7  # continued from the checkpoint at step 6
    assert_same(weights(resumed), weights(full))
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == list(range(1, 13))  # lines after the checkpoint were dropped, then written again


def test_resume_after_sigkill_gives_identical_weights(tmp_path, digits):
    tr, _ = digits
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import time, torch
        from edgetrain.data import load_data
        from edgetrain.testing import tiny_model
        from edgetrain.train import TrainConfig, train
        tr = load_data("digits", "train", normalize="dataset")
        cfg = TrainConfig(steps=30, batch_size=16, lr=0.05, seed=3, threads=1, out_dir={str(out)!r},
                          checkpoint_every=1)
        train(tiny_model(seed=1), tr, None, cfg, progress=False, callback=lambda s, r: time.sleep(0.1))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the training subprocess ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines())
    assert done < 30
    resumed = tiny_model(seed=1)
    train(resumed, tr, None, TrainConfig(steps=30, batch_size=16, lr=0.05, seed=3, threads=1, out_dir=str(out),
                                         checkpoint_every=1), resume=True, progress=False)
    full = tiny_model(seed=1)
    train(full, tr, None, cfg(steps=30), progress=False)
    assert_same(weights(resumed), weights(full))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    tr, _ = digits
    model = tiny_model()
    saved = {}

    def poison_after_step_5(step, rec):
        if step == 5:  # the checkpoint of step 4 is on disk; step 6's forward will produce a NaN loss
            saved["bytes"] = (tmp_path / "checkpoint.pt").read_bytes()
            with torch.no_grad():
                model.classifier.weight.fill_(float("nan"))

    with pytest.raises(et.TrainingDiverged,
                       match=r"loss is nan at step 6 .*last good checkpoint: .*checkpoint.pt \(step 4\)") as e:
        train(model, tr, None, cfg(tmp_path, checkpoint_every=2), progress=False, callback=poison_after_step_5)
    assert "\n" not in str(e.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved["bytes"]  # untouched
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_diverging_lr_without_checkpoint_says_so(digits):
    tr, _ = digits
    with pytest.raises(et.TrainingDiverged, match="no checkpoint was written"):
        train(tiny_model(), tr, None, cfg(lr=1e30, schedule="constant"), progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, digits, damage):
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=2), progress=False)
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"garbage" * 10 if damage == "garbage" else p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(et.CheckpointError, match="checkpoint.pt: corrupt or truncated checkpoint") as e:
        train(tiny_model(), tr, None, cfg(tmp_path, steps=4), resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_resume_with_other_settings_is_refused(tmp_path, digits):
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=2), progress=False)
    with pytest.raises(et.CheckpointError, match=r"config differs in \['lr'\]"):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=4, lr=0.1), resume=True, progress=False)
    with pytest.raises(et.CheckpointError, match="recipe"):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=4), recipe=et.Freeze(), resume=True, progress=False)


def test_recipe_is_applied_and_recorded(tmp_path, digits):
    tr, te = digits
    model = tiny_model()
    res = train(model, tr, te, cfg(tmp_path, steps=3), recipe=et.Recipe([et.Freeze()], name="head"), progress=False)
    assert not model.features[0][0].weight.requires_grad and res.handle is not None
    assert json.loads((tmp_path / "recipe.json").read_text())["name"] == "head"
    res.handle.remove()
    assert model.features[0][0].weight.requires_grad


def test_config_validation():
    for kw, match in [({}, "exactly one of steps and epochs"), ({"steps": 0}, "steps"),
                      ({"steps": 3, "optimizer": "lion"}, "optimizer"), ({"steps": 3, "lr": -1}, "lr"),
                      ({"steps": 3, "schedule": "exp"}, "schedule"), ({"steps": 3, "batch_size": 0}, "batch_size")]:
        with pytest.raises(et.ConfigError, match=match):
            TrainConfig(**kw)


def test_schedules():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, c, 100) == pytest.approx(0.1) and lr_at(9, c, 100) == pytest.approx(1.0)
    assert lr_at(10, c, 100) == pytest.approx(1.0) and lr_at(99, c, 100) < 0.01
    s = TrainConfig(steps=100, lr=1.0, schedule="step")
    assert [lr_at(i, s, 100) for i in (0, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])


def test_evaluate_restores_modes(digits):
    _, te = digits
    model = tiny_model()
    model.train()
    model.features[0].eval()
    evaluate(model, te)
    assert model.training and not model.features[0].training
