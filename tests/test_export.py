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


class _Mystery(torch.autograd.Function):
    """An op written into ONNX as ``edgetrain_test::Mystery``, which onnxruntime does not implement."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 2

    @staticmethod
    def symbolic(g, x):  # noqa: ANN001, ANN205
        return g.op("edgetrain_test::Mystery", x)


class _Fft(torch.nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return torch.fft.fft(x.flatten(1)).real[:, :10]  # aten::fft_fft has no ONNX form (opset 20)


def test_onnx_that_cannot_be_written_or_loaded_is_one_line_naming_the_op(tmp_path):
    pytest.importorskip("onnxruntime")
    from edgetrain.data import load_data
    from edgetrain.errors import ConfigError
    from edgetrain.export import _onnx

    data = load_data("digits", "test", channels=1, limit=16)
    mystery = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    mystery.register_forward_pre_hook(lambda _m, args: (_Mystery.apply(args[0]),))
    with pytest.raises(ConfigError, match=r"onnxruntime cannot load .*m\.onnx \(it does not implement op 'Mystery' "
                       r"\(domain edgetrain_test\)\); the file is kept") as e:
        _onnx(mystery, data, tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError, match=r"cannot be written as ONNX \(Exporting the operator 'aten::fft_fft' to ONNX") as e:
        _onnx(_Fft().eval(), data, tmp_path / "f.onnx")
    assert "\n" not in str(e.value)


def test_executorch_training_program_steps_as_pytorch_does(tmp_path, capsys):
    """A sparse-update run's training program: one step in ExecuTorch's runtime (loss, gradients, SGD) against the
    same step in PyTorch, on what the plan trains (a half-channel weight slice, biases, the classifier)."""
    pytest.importorskip("executorch")
    run = _run(tmp_path, "run", "name: sparse\ntechniques:\n  - {type: sparse_update, bias_last_k: 1, "
                                "weights: {'features.2.0': 0.5}}\n")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "out"), "--threads", "1", "--no-onnx",
                 "--training-program"]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["executorch"]["prediction_agreement"] == 1.0 and (tmp_path / "out" / "model.pte").stat().st_size > 0
    t = info["executorch_training"]
    conv = et.models.create_model("small_cnn", num_classes=10, in_channels=1).features[2][0]
    assert t["trainable"]["net.features.2.0.parametrizations.weight.original"] == [
        conv.out_channels, conv.in_channels // 2, *conv.kernel_size]  # the slice, not the whole weight
    assert set(t["trainable"]) == {"net.features.2.0.parametrizations.weight.original", "net.features.2.1.bias",
                                   "net.classifier.weight", "net.classifier.bias"}
    assert abs(t["loss_executorch"] - t["loss_pytorch"]) <= 1e-5 * abs(t["loss_pytorch"])
    assert t["max_abs_gradient_difference"] <= 1e-5 and t["max_abs_parameter_difference_after_step"] <= 1e-6
    assert t["max_abs_parameter_change"] > 1e-4  # the step did something: the comparison is not of zeros
    lora = _run(tmp_path, "lora", "name: lora\ntechniques:\n  - {type: lora, rank: 2}\n")
    assert main(["export", "--run", str(lora), "--out", str(tmp_path / "l"), "--no-onnx", "--training-program"]) == 2
    err = capsys.readouterr().err
    assert "needs a sparse-update plan's run" in err and len(err.strip().splitlines()) == 1


def test_missing_executorch_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    run = _run(tmp_path, "plain")
    monkeypatch.setitem(sys.modules, "executorch", None)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "o"), "--no-onnx"]) == 2
    assert "pip install 'edgetrain[export]' (or --no-pte)" in capsys.readouterr().err
