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
    with pytest.raises(et.CheckpointError, match=r"the schedule differs .*schedule.lr: 0.05 in the checkpoint, 0.1 "):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=2, lr=0.1), resume=True, progress=False)
    with pytest.raises(et.CheckpointError, match=r"the recipe differs .*recipe.name: 'plain' in the checkpoint, "
                                                 r"'freeze' now"):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=2), recipe=et.Freeze(), resume=True, progress=False)


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


# ---------------------------------------------------------------------------------------------- a run is never mixed
def metric_lines(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_existing_run_is_refused_without_resume_or_force(tmp_path, digits):
    """Issue 11.2: training into an existing out_dir silently replaced its checkpoint and mixed metrics.jsonl."""
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=3), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(et.ConfigError, match=r"already holds checkpoint.pt, config.json, metrics.jsonl.*--resume.*"
                                             r"--force") as e:
        train(tiny_model(), tr, None, cfg(tmp_path, steps=5), progress=False)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched
    (tmp_path / "notes.txt").write_text("mine")
    res = train(tiny_model(), tr, None, cfg(tmp_path, steps=5), force=True, progress=False)
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2, 3, 4, 5]  # the old run's lines are gone
    assert res.steps == 5 and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --force deletes run files only
    with pytest.raises(et.ConfigError, match="not both"):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=5), resume=True, force=True, progress=False)


def test_a_file_or_an_unwritable_out_dir_is_one_line(tmp_path, digits):
    tr, _ = digits
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(et.ConfigError, match="exists and is not a directory"):
        train(tiny_model(), tr, None, cfg(f, steps=1), progress=False)
    with pytest.raises(et.ConfigError, match="cannot write there"):
        train(tiny_model(), tr, None, cfg(f / "sub", steps=1), progress=False)  # a path through a file


def test_a_second_process_cannot_write_the_same_run(tmp_path, digits):
    from edgetrain.checkpoint import RunDir

    tr, _ = digits
    held = RunDir(tmp_path)
    held.open()
    try:
        with pytest.raises(et.ConfigError, match="another edgetrain run is writing there"):
            train(tiny_model(), tr, None, cfg(tmp_path, steps=1), progress=False)
    finally:
        held.close()
    train(tiny_model(), tr, None, cfg(tmp_path, steps=1), progress=False)  # released: fine


@pytest.mark.parametrize("change,match", [
    ({"steps": 14}, r"the schedule differs .*schedule.total_steps: 12 in the checkpoint, 14 now.*cosine"),
    ({"batch_size": 8}, r"schedule.batch_size: 16 in the checkpoint, 8 now"),
    ({"seed": 4}, r"schedule.seed: 3 in the checkpoint, 4 now"),
])
def test_resume_refuses_another_schedule(tmp_path, digits, change, match):
    tr, _ = digits
    stop = {"at": 4}

    def interrupt(step, rec):
        if step == stop["at"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), tr, None, cfg(tmp_path, checkpoint_every=2), progress=False, callback=interrupt)
    with pytest.raises(et.CheckpointError, match=match) as e:
        train(tiny_model(), tr, None, cfg(tmp_path, checkpoint_every=2, **change), resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_a_constant_schedule_may_change_the_step_count_on_resume(tmp_path, digits):
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=4, schedule="constant"), progress=False)
    res = train(tiny_model(), tr, None, cfg(tmp_path, steps=6, schedule="constant"), resume=True, progress=False)
    assert res.steps == 6 and [r["step"] for r in metric_lines(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_data(tmp_path, digits):
    """Issue 11.5: resume accepted another --train-subset or another .npz without a word."""
    tr, te = digits
    train(tiny_model(), tr, te, cfg(tmp_path, steps=2), progress=False)
    with pytest.raises(et.CheckpointError, match=r"the training data differs .*train_data.name: 'digits/train' in "
                                                 r"the checkpoint, 'digits/train\[subset 500, seed 0\]' now"):
        train(tiny_model(), tr.subset(500), te, cfg(tmp_path, steps=2), resume=True, progress=False)
    with pytest.raises(et.CheckpointError, match=r"the evaluation data differs .*eval_data.name"):
        train(tiny_model(), tr, te.subset(100), cfg(tmp_path, steps=2), resume=True, progress=False)
    same_name = type(tr)(tr.images.flip(0), tr.labels.flip(0), tr.classes, tr.name, tr.transform)
    with pytest.raises(et.CheckpointError, match=r"train_data.sha256"):  # same name and size, other content
        train(tiny_model(), same_name, te, cfg(tmp_path, steps=2), resume=True, progress=False)
    with pytest.raises(et.CheckpointError, match=r"the model differs .*model.initial_weights.*--weights"):
        train(tiny_model(seed=5), tr, te, cfg(tmp_path, steps=2), resume=True, progress=False)


def test_resume_refuses_another_npz(tmp_path, digits):
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("a.npz", "b.npz"):
        np.savez(tmp_path / name, x=rng.integers(0, 256, (64, 8, 8)).astype(np.uint8), y=rng.integers(0, 10, 64))
    out = tmp_path / "run"
    a, b = load_data(tmp_path / "a.npz", "train"), load_data(tmp_path / "b.npz", "train")
    train(tiny_model(), a, None, cfg(out, steps=2), progress=False)
    with pytest.raises(et.CheckpointError, match=r"the training data differs .*train_data.name: '.*a.npz' in the "
                                                 r"checkpoint, '.*b.npz' now"):
        train(tiny_model(), b, None, cfg(out, steps=2), resume=True, progress=False)


def test_resume_of_a_finished_run_reports_its_loss_and_keeps_one_final_evaluation(tmp_path, digits):
    tr, te = digits
    first = train(tiny_model(), tr, te, cfg(tmp_path, steps=3), progress=False)
    again = train(tiny_model(), tr, te, cfg(tmp_path, steps=3), resume=True, progress=False)
    assert again.steps == 3 and again.final_loss == first.final_loss and again.accuracy == first.accuracy
    finals = [r for r in metric_lines(tmp_path) if r.get("final")]
    assert len(finals) == 1 and finals[0]["eval_accuracy"] == first.accuracy


def test_resume_without_a_checkpoint_drops_the_lines_of_the_killed_run(tmp_path, digits):
    tr, _ = digits
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-line
    train(tiny_model(), tr, None, cfg(tmp_path, steps=2), resume=True, progress=False)
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2]


def test_a_cut_metrics_line_is_dropped_on_resume(tmp_path, digits):
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=4, checkpoint_every=2), progress=False)
    m = tmp_path / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 5, "lo')
    train(tiny_model(), tr, None, cfg(tmp_path, steps=4, checkpoint_every=2), resume=True, progress=False)
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2, 3, 4]


def test_stale_temporary_files_are_removed_when_the_next_run_starts(tmp_path, digits, capsys):
    """Issue 11.6: zero-byte .checkpoint.pt.*.tmp files were left behind by kills during a write."""
    tr, _ = digits
    train(tiny_model(), tr, None, cfg(tmp_path, steps=2), progress=False)
    stale = [tmp_path / ".checkpoint.pt.k1ll3d.tmp", tmp_path / ".metrics.jsonl.x.tmp", tmp_path / ".config.json.y.tmp"]
    for p in stale:
        p.write_bytes(b"")
    (tmp_path / ".other.tmp").write_bytes(b"")  # not ours: stays
    train(tiny_model(), tr, None, cfg(tmp_path, steps=2), resume=True, progress=False)
    assert not any(p.exists() for p in stale) and (tmp_path / ".other.tmp").exists()
    assert "removed 3 incomplete temporary file(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- divergence
def test_a_diverging_buffer_stops_the_run_where_it_happens(tmp_path, digits):
    """Issue 11.4: with lr 1e6 training ended with exit 0, BatchNorm running_var = inf and chance accuracy."""
    tr, _ = digits
    with pytest.raises(et.TrainingDiverged, match=r"(parameter|buffer) \S+ became (inf|nan) at step \d+ \(lr") as e:
        train(tiny_model(), tr, None, cfg(tmp_path, steps=60, lr=1e6, checkpoint_every=1), progress=False)
    assert "\n" not in str(e.value) and "last good checkpoint" in str(e.value)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_no_checkpoint_holds_a_non_finite_tensor(tmp_path, digits):
    """Issue 11.4: with lr 1e20 and a checkpoint every step, the 'last good checkpoint' held non-finite tensors."""
    from edgetrain.run import _state_tensors

    tr, _ = digits
    seen = []

    def snapshot(step, rec):
        if (tmp_path / "checkpoint.pt").exists():
            seen.append(load_checkpoint(tmp_path / "checkpoint.pt"))

    with pytest.raises(et.TrainingDiverged, match=r"at step \d+ \(lr .*last good checkpoint"):
        train(tiny_model(), tr, None, cfg(tmp_path, steps=20, lr=1e20, checkpoint_every=1), progress=False,
              callback=snapshot)
    seen.append(load_checkpoint(tmp_path / "checkpoint.pt"))
    for ck in seen:
        for name, t in [*ck["model"].items(), *_state_tensors(ck["optimizer"]["state"], "opt")]:
            assert not t.is_floating_point() or torch.isfinite(t).all(), (ck["step"], name)


def test_a_non_finite_gradient_is_named_before_the_update(tmp_path, digits):
    tr, _ = digits
    model = tiny_model()
    hook = {}

    def poison(step, rec):
        if step == 2:
            hook["h"] = model.classifier.weight.register_hook(lambda g: g * float("inf"))

    before = {}

    def remember(step, rec):
        poison(step, rec)
        before.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(et.TrainingDiverged, match=r"the gradient of classifier.weight is (inf|nan) at step 3 .*"
                                                  r"stopped before the update. last good checkpoint: .*\(step 2\)"):
        train(model, tr, None, cfg(tmp_path, checkpoint_every=1), progress=False, callback=remember)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "running" not in k and "num_batches" not in k)


# ---------------------------------------------------------------------------------------------- progress output
def test_progress_without_a_terminal_is_lines_not_redraws(digits, capsys, monkeypatch):
    """Issue 11.8: tqdm redrew every step into non-terminal output (648 carriage returns on one line)."""
    import edgetrain.run as train_module

    tr, te = digits
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)  # every step gets its line
    train(tiny_model(), tr, te, cfg(steps=5, eval_every=2), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert sum("step " in ln and "/5 (" in ln for ln in lines) == 5
    assert any("evaluating on 360 samples at step 2" in ln for ln in lines)
    assert any(ln.endswith("evaluating on 360 samples") for ln in lines)  # the final evaluation is visible
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 3600.0)
    train(tiny_model(), tr, None, cfg(steps=5), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "5/5 (100%)" in lines[-1]  # the start, then the last step (not one per step)


def test_a_model_that_cannot_take_the_data_is_one_line(digits):
    tr, _ = digits
    model = create_model("small_cnn", num_classes=10, in_channels=3)
    with pytest.raises(et.ConfigError, match=r"SmallCNN cannot run on the training batches \(input \(16, 1, 8, 8\)\)"
                                             r": .*channels") as e:
        train(model, tr, None, cfg(steps=1), progress=False)
    assert "\n" not in str(e.value)


def test_a_buffer_non_finite_by_design_is_not_divergence(tmp_path, digits):
    """A -inf mask buffer (causal attention) is state, not divergence: only what starts finite is watched."""
    tr, _ = digits
    model = tiny_model()
    model.register_buffer("mask", torch.full((4,), float("-inf")))
    res = train(model, tr, None, cfg(tmp_path, steps=3, checkpoint_every=1), progress=False)
    assert res.steps == 3 and torch.isinf(load_checkpoint(tmp_path / "checkpoint.pt")["model"]["mask"]).all()


def test_the_technique_state_protocol(digits):
    """Applied.state_dict collects what technique handles own, keyed index:name; a mismatch is one line."""
    from edgetrain.techniques import ActNN

    tr, _ = digits
    x = next(iter(tr.batches(16)))[0]
    handle = et.apply_(tiny_model(), et.Recipe([et.Freeze(last_k_blocks=2), ActNN()], name="r"), x)
    state = handle.state_dict()
    assert list(state) == ["1:actnn"] and len(state["1:actnn"]["codecs"]) == 2  # 2-bit codec and the 8-bit one
    handle.load_state_dict(state)
    with pytest.raises(et.CheckpointError, match=r"technique state for \['0:actnn'\] does not fit recipe 'r'"):
        handle.load_state_dict({"0:actnn": state["1:actnn"]})
    with pytest.raises(et.CheckpointError, match="technique 1:actnn: saved state does not fit"):
        handle.load_state_dict({"1:actnn": {"codecs": []}})


def test_nonfinite_finds_nan_and_inf_and_ignores_overflowing_sums():
    from edgetrain.run import nonfinite

    assert nonfinite([("big", torch.full((10,), 3e38))]) is None  # finite; its float32 sum overflows
    assert nonfinite([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")]))]) == ("b", "nan")
    assert nonfinite([("h", torch.tensor([float("inf"), 1.0], dtype=torch.float16))]) == ("h", "inf")
    assert nonfinite([("h", torch.full((100_000,), 60_000.0, dtype=torch.float16))]) is None
    assert nonfinite([("d", torch.tensor([1e300], dtype=torch.float64)), ("i", torch.arange(3))]) is None
    assert nonfinite([("g", None), ("e", torch.empty(0))]) is None


def _train_with(execution, digits, **kw):
    tr, _ = digits
    model = tiny_model(seed=2)
    recipe = et.Recipe([et.Freeze()], name="head", execution=execution)
    res = train(model, tr, None, cfg(steps=4, **kw), recipe=recipe, progress=False)
    return model, res


def test_the_recipes_fused_step_trains_bit_for_bit_like_the_ordinary_step(digits):
    plain, _ = _train_with(et.Execution(), digits)
    fused, res = _train_with(et.Execution(fused_step=True), digits)
    assert_same(weights(plain), weights(fused))
    w = fused.classifier.weight
    loss = w.sum()
    loss.backward()  # the run's hooks are gone: a later backward leaves a gradient and no update
    assert w.grad is not None


def test_the_recipes_micro_batches_run_and_their_loss_is_the_batchs(digits):
    plain, a = _train_with(et.Execution(bn="frozen"), digits)
    micro, b = _train_with(et.Execution(micro_batches=4, bn="frozen"), digits)
    assert abs(a.history[0]["loss"] - b.history[0]["loss"]) < 1e-5  # same first batch, same weights
    for (n, p), q in zip(plain.named_parameters(), micro.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_execution_settings_the_run_cannot_honour_are_one_line(digits):
    with pytest.raises(et.ConfigError, match="max_grad_norm"):
        _train_with(et.Execution(fused_step=True), digits, max_grad_norm=1.0)
    with pytest.raises(et.ConfigError, match="more than the batch size"):
        _train_with(et.Execution(micro_batches=32), digits)
