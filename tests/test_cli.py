"""The command line, end to end on T3-sized work (digits, small_cnn, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgetrain.cli import main

T3 = ["--model", "small_cnn", "--data", "digits", "--image-size", "8", "--channels", "1", "--batch-size", "16",
      "--threads", "1"]
CONTRACT = ["saved_bytes", "peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "step_seconds"]


def test_ls_lists_every_registered_technique(capsys):
    import edgetrain as et

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for info in et.list_techniques():
        assert info.name in out
    assert main(["ls", "--json"]) == 0
    assert {d["name"] for d in json.loads(capsys.readouterr().out)} == {i.name for i in et.list_techniques()}


def test_measure_json_prints_every_contract_field_measured(capsys, tmp_path):
    assert main(["measure", *T3, "--repeats", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    for f in CONTRACT:
        assert plain[f] > 0, f
    (tmp_path / "r.yaml").write_text("name: head\ntechniques:\n  - type: freeze\n")
    assert main(["measure", *T3, "--repeats", "2", "--json", "--recipe", str(tmp_path / "r.yaml")]) == 0
    head = json.loads(capsys.readouterr().out)
    assert head["recipe"] == "head"
    assert head["saved_bytes"] < plain["saved_bytes"]
    assert head["grad_bytes"] < plain["grad_bytes"]
    assert head["optimizer_bytes"] < plain["optimizer_bytes"]


def test_measure_runs_the_recipes_execution(capsys, tmp_path):
    """`measure --recipe` runs the recipe's micro-batches, as `train` does: what a step saves is one micro-batch's."""
    (tmp_path / "r.yaml").write_text("name: plain\ntechniques: []\n")
    (tmp_path / "m.yaml").write_text("name: micro\ntechniques: []\nexecution: {micro_batches: 4, fused_step: true}\n")
    got = {}
    for name in ("r", "m"):
        assert main(["measure", *T3, "--repeats", "1", "--json", "--recipe", str(tmp_path / f"{name}.yaml")]) == 0
        got[name] = json.loads(capsys.readouterr().out)
    assert got["m"]["saved_bytes"] <= 0.3 * got["r"]["saved_bytes"]  # a quarter of the batch, plus fixed parts


def test_train_writes_checkpoint_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *T3, "--steps", "6", "--checkpoint-every", "3", "--out", str(out), "--no-progress",
            "--schedule", "constant"]  # a constant schedule may change --steps on resume (a cosine one may not)
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()
    assert main(args[:args.index("--steps") + 1] + ["8"] + args[args.index("--steps") + 2:] + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 8


@pytest.mark.parametrize("content,match", [
    ("techniques: [{type: warp_drive}]", "unknown technique 'warp_drive'"),
    ("techniques: [{type: freeze, targets: [nonexistent.*]}]", "matches no module"),
])
def test_bad_recipe_is_one_line_error_exit_2(tmp_path, capsys, content, match):
    (tmp_path / "r.yaml").write_text(content)
    assert main(["measure", *T3, "--recipe", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgetrain: error:") and match in err and "\n" not in err


def test_corrupt_checkpoint_on_resume_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", *T3, "--steps", "2", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt" in err and "\n" not in err


def test_bench_writes_table_json_csv_and_plot(tmp_path, capsys):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        "work: T3\nname: tiny\nworkload: {model: small_cnn, pretrained: false, data: digits, image_size: 8,"
        " channels: 1, batch_size: 16, eval_subset: 100}\ntrain: {steps: 4, lr: 0.05}\nmeasure_repeats: 2\n"
        "recipes:\n  - {name: head, techniques: [{type: freeze}]}\n  - {name: ckpt, techniques: [{type: checkpoint}]}\n"
    )
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| plain |" in table and "| head |" in table and "| ckpt |" in table
    result = json.loads((tmp_path / "t3-tiny.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["plain", "head", "ckpt"]
    assert result["rows"][0]["step_ratio"] == 1.0
    for key in ("commit", "date", "torch", "threads", "cpu"):
        assert key in result["provenance"]
    for r in result["rows"]:
        for f in CONTRACT + ["accuracy", "step_ratio"]:
            assert r[f] is not None, (r["name"], f)
        # the cost model's prediction sits beside the measurement, within the planner's 10%
        assert abs(r["estimate_bytes"] - r["saved_bytes"]) <= 0.10 * r["saved_bytes"], r["name"]
        assert abs(r["estimate_train_bytes"] - r["train_bytes"]) <= 0.10 * r["train_bytes"], r["name"]
    assert (tmp_path / "t3-tiny.png").stat().st_size > 1000
    assert (tmp_path / "t3-tiny.csv").read_text().count("\n") == 4
    # results are never overwritten silently
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err


def test_python_dash_m_works_like_the_command():
    out = subprocess.run([sys.executable, "-m", "edgetrain", "ls"], capture_output=True, text=True, check=True)
    assert "freeze" in out.stdout


# ---------------------------------------------------------------------------------------------- issue 11
def strict(text):
    def refuse(c):
        raise AssertionError(f"{c} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_plan_prints_its_table_and_writes_the_recipe(tmp_path, capsys, monkeypatch):
    """Issue 11.1: every `edgetrain plan` that printed its table crashed (format_plan rebound the batch size)."""
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path / "cache"))
    args = ["plan", *T3, "--analysis-steps", "3", "--no-progress"]
    assert main([*args, "--budget", "8MB", "-o", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "predicted peak RAM:" in out and "scheme:" in out and f"wrote {tmp_path / 'plan.json'}" in out
    assert json.loads((tmp_path / "plan.json").read_text())["techniques"][0]["type"] == "sparse_update"
    assert main([*args, "--budget", "8MB", "--json"]) == 0
    assert strict(capsys.readouterr().out)["budget"] == 8_000_000
    code = main([*args, "--budget", "256KB", "--device", "mcu"])
    out, err = capsys.readouterr()
    assert (code == 0 and "predicted peak RAM:" in out) or (code == 2 and "infeasible" in err
                                                            and "\n" not in err.strip())
    assert main(["train", *T3, "--recipe", str(tmp_path / "plan.json"), "--steps", "2", "--out",
                 str(tmp_path / "run")]) == 0


def test_plan_refuses_a_recipe_and_has_no_eval_subset(tmp_path, capsys):
    """Issue 11.7: `plan --recipe` was accepted and ignored, even an invalid file."""
    assert main(["plan", *T3, "--budget", "8MB", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgetrain: error: plan takes no --recipe") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["plan", *T3, "--budget", "8MB", "--eval-subset", "100"])
    assert e.value.code == 2 and "unrecognized arguments: --eval-subset" in capsys.readouterr().err


def test_the_analysis_cache_ignores_what_the_analysis_does_not_use(tmp_path):
    """Issue 11.7: --eval-subset (unused by the analysis) was part of the cache key: changing it restarted it."""
    import dataclasses

    from edgetrain.plan import analyze
    from edgetrain.workload import Workload

    wl = Workload(model="small_cnn", data="digits", image_size=8, channels=1, pretrained=False)
    a = analyze(wl, steps=2, ks=[0, 1], weight_last=1, threads=1, progress=False, cache=tmp_path)
    b = analyze(dataclasses.replace(wl, eval_subset=50, batch_size=8), steps=2, ks=[0, 1], weight_last=1, threads=1,
                progress=False, cache=tmp_path)
    assert a.meta["cache"] == b.meta["cache"] and a.to_dict()["bias"] == b.to_dict()["bias"]
    c = analyze(dataclasses.replace(wl, train_subset=500), steps=2, ks=[0, 1], weight_last=1, threads=1,
                progress=False, cache=tmp_path)
    assert c.meta["cache"] != a.meta["cache"]  # what it trains on is in the key


def test_train_into_an_existing_out_needs_resume_or_force(tmp_path, capsys):
    """Issue 11.2: `edgetrain train` into an existing --out silently overwrote it (metrics of both runs mixed)."""
    out = tmp_path / "run"
    args = ["train", *T3, "--steps", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds" in err and "--resume" in err and "--force" in err and "\n" not in err
    assert (out / "metrics.jsonl").read_text() == before
    assert main([*args, "--resume"]) == 0  # finished: resumed at its end
    summary = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and isinstance(summary["final_loss"], float)  # not NaN (issue 11.8)
    assert main([*args[:-3], "--steps", "2", "--out", str(out), "--force", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # 2 steps + the final evaluation
    with pytest.raises(SystemExit):
        main([*args, "--resume", "--force"])  # mutually exclusive


def test_bench_shows_its_phases_and_keeps_a_diverged_recipe_as_a_row(tmp_path, capsys):
    """Issue 11.8: the bench showed nothing during a 40 s evaluation; a diverged recipe is a row, not the end."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        "work: T3\nname: wild\nworkload: {model: small_cnn, pretrained: false, data: digits, image_size: 8,"
        " channels: 1, batch_size: 16, eval_subset: 50}\ntrain: {steps: 30, lr: 1000000.0}\nmeasure_repeats: 1\n"
        "recipes:\n  - {name: head, techniques: [{type: freeze}]}\n"
    )
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "measuring one training step" in err and "evaluating on 50 samples" in err
    result = strict((tmp_path / "t3-wild.json").read_text())
    plain = result["rows"][0]
    assert plain["accuracy"] is None and "at step" in plain["diverged"]
    assert "| plain |" in out and "n/a" in out


def test_train_measure_plan_and_estimate_take_the_same_optimizer_names():
    """A user's `--optimizer sgd --momentum 0.9` means the same in every verb (plan used to call it sgd_momentum and
    read `sgd` as no momentum); the cost model's name follows from the two."""
    from edgetrain.cli import build_parser
    from edgetrain.cli._common import cost_optimizer

    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices  # verb -> its parser
    for verb in ("train", "measure", "plan", "estimate"):
        opt = next(a for a in actions[verb]._actions if "--optimizer" in a.option_strings)
        mom = next(a for a in actions[verb]._actions if "--momentum" in a.option_strings)
        assert tuple(opt.choices) == ("sgd", "adamw") and opt.default == "sgd" and mom.default == 0.9, verb
    assert cost_optimizer(parser.parse_args(["plan"])) == "sgd_momentum"
    assert cost_optimizer(parser.parse_args(["estimate", "--momentum", "0"])) == "sgd"
    assert cost_optimizer(parser.parse_args(["estimate", "--optimizer", "adamw"])) == "adamw"
