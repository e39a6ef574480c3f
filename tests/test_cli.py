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


def test_train_writes_checkpoint_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *T3, "--steps", "6", "--checkpoint-every", "3", "--out", str(out), "--no-progress"]
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
