"""edgetrain export: the plain model equals the trained one (adapters merged, sparse slices written back), the
safetensors file loads into a fresh model, onnxruntime's predictions equal PyTorch's, and bad runs are one line."""

from __future__ import annotations

import json

import pytest
import torch

import edgetrain as et
from edgetrain.cli import main
from edgetrain.export import plain_model

TRAIN = ["train", "--model", "small_cnn", "--data", "digits", "--image-size", "8", "--channels", "1", "--steps", "6",
         "--lr", "0.2", "--threads", "1", "--no-progress"]


def _run(tmp_path, name, recipe=None):  # noqa: ANN001, ANN202
    args = [*TRAIN, "--out", str(tmp_path / name)]
    if recipe:
        (tmp_path / f"{name}.yaml").write_text(recipe)
        args += ["--recipe", str(tmp_path / f"{name}.yaml")]
    assert main(args) == 0
    return tmp_path / name


@pytest.mark.parametrize("recipe", [
    "name: lora\ntechniques:\n  - {type: lora, rank: 2}\n",
    "name: sparse\ntechniques:\n  - {type: sparse_update, bias_last_k: 1, weights: {'features.2.0': 0.5}}\n",
    "name: krona\ntechniques:\n  - {type: krona}\n"], ids=["lora", "sparse", "krona"])
def test_the_exported_model_computes_what_the_trained_one_does(tmp_path, recipe):
    from safetensors.torch import load_file

    from edgetrain.models import create_model

    run = _run(tmp_path, "run", recipe)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["onnx"]["prediction_agreement"] == 1.0 and info["onnx"]["folded_batchnorms"] == 3
    # the trained model, with its techniques applied, against the exported plain weights in a fresh model
    wl = json.loads((run / "workload.json").read_text())
    trained = create_model("small_cnn", num_classes=wl["num_classes"], in_channels=1)
    applied = et.apply_(trained, et.Recipe.load(run / "recipe.json"), torch.randn(2, 1, 8, 8))
    trained.load_state_dict(et.checkpoint.load_checkpoint(run / "checkpoint.pt")["model"])
    fresh = create_model("small_cnn", num_classes=wl["num_classes"], in_channels=1)
    fresh.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        a, b = trained.eval()(x), fresh.eval()(x)
    applied.remove()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    before = et.Workload.from_dict(wl["workload"]).build_model(wl["num_classes"])  # the run's seeded start
    assert not torch.equal(fresh.features[2][0].weight, before.features[2][0].weight)  # training is in the weights


def test_bad_runs_and_existing_exports_are_one_line(tmp_path, capsys):
    run = _run(tmp_path, "lite", "name: lite\ntechniques:\n  - {type: lite_residual}\n")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "are not part of the plain model" in capsys.readouterr().err
    plain = _run(tmp_path, "plain")
    assert main(["export", "--run", str(plain), "--out", str(tmp_path / "p"), "--no-onnx"]) == 0
    assert main(["export", "--run", str(plain), "--out", str(tmp_path / "p"), "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "holds an export already" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "q")]) == 2
    assert "no workload.json" in capsys.readouterr().err
    model, _, info = plain_model(plain)
    assert info["techniques_removed"] == [] and not model.training
