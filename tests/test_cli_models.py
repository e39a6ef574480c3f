"""The command line takes the user's model: ``--model package.module:factory`` / ``timm:<name>``, ``--model-arg``,
``--weights``, and ``edgetrain inspect`` shows what edgetrain derives from it (T3-sized: digits, 8x8, tiny nets)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch

from edgetrain.cli import main
from edgetrain.workload import Workload

NETS = textwrap.dedent('''
    """A user's models, imported by name as et_user_nets:tiny."""
    from torch import nn


    def tiny(num_classes=10, width=4, act="relu", in_ch=3):
        acts = {"relu": nn.ReLU(), "gelu": nn.GELU()}
        return nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), acts[act],
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
''')
MODEL = ["--model", "et_user_nets:tiny", "--image-size", "8", "--threads", "1"]
T3 = [*MODEL, "--data", "digits", "--batch-size", "16"]


@pytest.fixture(scope="module", autouse=True)
def user_nets(tmp_path_factory):
    """``et_user_nets`` importable from a temporary directory for this module's tests."""
    root = tmp_path_factory.mktemp("user")
    (root / "et_user_nets.py").write_text(NETS)
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))
    sys.modules.pop("et_user_nets", None)


def tiny(width: int = 4, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    import et_user_nets

    torch.manual_seed(seed)
    return et_user_nets.tiny(num_classes=num_classes, width=width)


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgetrain: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_inspect_json_shows_the_structure_and_model_args_reach_the_factory(capsys):
    assert main(["inspect", *MODEL, "--model-arg", "width=6", "--model-arg", "act=gelu", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == "Sequential" and s["classifier"] == "5"
    layers = {lay["name"]: lay for lay in s["layers"]}
    assert [layers[n]["kind"] for n in ("0", "1", "5")] == ["conv2d", "batch_norm", "linear"]
    assert layers["0"]["out_shape"] == [2, 6, 8, 8]  # width=6 reached the factory, as an int
    assert layers["5"]["out_shape"] == [2, 10] and layers["5"]["params"] == ["5.weight", "5.bias"]
    assert s["activations"] == {"2": ["gelu"]}  # act=gelu reached it, as a string
    assert s["opaque"] == {} and s["unused"] == [] and "block_source" in s and "targets" not in s


def test_inspect_lists_each_techniques_targets_or_its_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("name: mix\ntechniques:\n  - {type: sparse_update, bias_last_k: 1}\n"
                                     "  - {type: freeze, targets: [nonexistent.*]}\n")
    assert main(["inspect", *MODEL, "--recipe", str(tmp_path / "r.yaml"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["recipe"] == "mix" and [t["technique"] for t in s["targets"]] == ["sparse_update", "freeze"]
    assert s["targets"][0]["source"] == "default" and s["targets"][0]["targets"] == []  # it picks the last k biases
    assert s["targets"][1]["source"] == "technique" and "matches no module" in s["targets"][1]["error"]
    assert main(["inspect", *MODEL, "--recipe", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert "classifier" in out and "conv2d" in out and "recipe 'mix':" in out and "freeze: error:" in out


def test_measure_and_estimate_json_on_a_user_model(capsys):
    param_bytes = 4 * sum(p.numel() for p in tiny(width=6).parameters())
    assert main(["measure", *T3, "--model-arg", "width=6", "--repeats", "1", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["param_bytes"] == param_bytes and m["saved_bytes"] > 0 and m["step_seconds"] > 0
    # the model has no default_input_size: estimate traces the zeros example of --channels/--image-size
    assert main(["estimate", *MODEL, "--model-arg", "width=6", "--batch-size", "4", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["input_shape"] == [3, 8, 8] and e["batch_size"] == 4
    assert e["totals"]["param_bytes"] == param_bytes and e["totals"]["saved_bytes"] > 0


def test_train_a_user_model_and_load_its_checkpoint_as_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *T3, "--steps", "2", "--eval-subset", "50", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2 and 0.0 <= res["accuracy"] <= 1.0
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    model = Workload(model="et_user_nets:tiny", weights=str(out / "checkpoint.pt")).build_model(10)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the "model" key is read


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth-wrapped"])
def test_weights_round_trip(tmp_path, capsys, fmt):
    state = tiny(width=6, seed=123).state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    wl = Workload(model="et_user_nets:tiny", model_args={"width": 6}, weights=str(path))
    assert not wl.pretrained
    model = wl.build_model(10)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert main(["inspect", *MODEL, "--model-arg", "width=6", "--weights", str(path)]) == 0
    assert main(["measure", *T3, "--model-arg", "width=6", "--weights", str(path), "--repeats", "1"]) == 0


def test_mismatching_weights_are_one_line_naming_the_keys(tmp_path, capsys):
    state = tiny(width=6).state_dict()
    state["extra.weight"] = state.pop("5.bias")
    torch.save(state, tmp_path / "keys.pt")
    assert main(["inspect", *MODEL, "--model-arg", "width=6", "--weights", str(tmp_path / "keys.pt")]) == 2
    one_line_error(capsys, "keys.pt: does not match Sequential", "missing 1 key (5.bias)",
                   "unexpected 1 key (extra.weight)")
    from safetensors.torch import save_file

    save_file(tiny(width=5).state_dict(), str(tmp_path / "shape.safetensors"))
    assert main(["measure", *T3, "--model-arg", "width=6", "--weights", str(tmp_path / "shape.safetensors")]) == 2
    one_line_error(capsys, "wrong shape", "0.weight (5, 3, 3, 3) in the file, (6, 3, 3, 3) in the model")


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt", "junk.pth"])
def test_random_bytes_as_weights_are_one_line(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                dtype=torch.uint8).numpy().tobytes())
    assert main(["estimate", *MODEL, "--weights", str(tmp_path / name)]) == 2
    one_line_error(capsys, name, "not a readable")


def test_weights_errors_absent_file_unknown_format_not_a_state_dict(tmp_path, capsys):
    assert main(["inspect", *MODEL, "--weights", str(tmp_path / "absent.pt")]) == 2
    one_line_error(capsys, "absent.pt: weights file does not exist")
    (tmp_path / "w.npz").write_bytes(b"x")
    assert main(["inspect", *MODEL, "--weights", str(tmp_path / "w.npz")]) == 2
    one_line_error(capsys, "unknown weights format '.npz'")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "plain.pt")
    assert main(["inspect", *MODEL, "--weights", str(tmp_path / "plain.pt")]) == 2
    one_line_error(capsys, "not a state dict of tensors")
    torch.save(tiny(), tmp_path / "whole.pt")  # a pickled module, not a state dict: weights_only refuses it
    assert main(["inspect", *MODEL, "--weights", str(tmp_path / "whole.pt")]) == 2
    one_line_error(capsys, "save model.state_dict()")


@pytest.mark.parametrize("args,needle", [
    (["--model", "timm:nope"], "timm model 'nope'"),
    (["--model", "nope.module:f"], "cannot import 'nope.module'"),
    (["--model", "et_user_nets:absent"], "has no 'absent'"),
    (["--model", "et_user_nets:tiny", "--model-arg", "width"], "expected key=value"),
    (["--model", "et_user_nets:tiny", "--model-arg", "depth=3"], "unexpected keyword argument 'depth'"),
    (["--model", "small_cnn", "--model-arg", "in_channels=1"], "in_channels is set from the data"),
    (["--model", "et_user_nets:tiny", "--pretrained"],
     "pretrained weights exist only for mobilenet_v2; pass --weights FILE"),
])
def test_bad_models_are_one_line_errors(capsys, args, needle):
    if args[1].startswith("timm:") and importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    assert main(["measure", *args, "--data", "digits", "--image-size", "8", "--threads", "1"]) == 2
    one_line_error(capsys, needle)


def test_timm_resnet18_through_inspect(capsys):
    if importlib.util.find_spec("timm") is None:  # importorskip would not do: a broken torchvision raises RuntimeError
        pytest.skip("timm is not installed")
    assert main(["inspect", "--model", "timm:resnet18", "--image-size", "16", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == "ResNet" and s["classifier"] == "fc"
    assert "layer1.0" in s["blocks"] and "layer4.1" in s["blocks"] and s["block_source"].startswith("derived")
    layers = {lay["name"]: lay for lay in s["layers"]}
    assert layers["conv1"]["kind"] == "conv2d" and layers["fc"]["out_shape"] == [2, 10]


def test_workload_model_args_and_weights_round_trip_through_dicts():
    wl = Workload(model="et_user_nets:tiny", model_args={"width": 5, "act": "gelu"}, weights="w.safetensors",
                  data="digits", image_size=8)
    d = wl.to_dict()
    assert d["model_args"] == {"width": 5, "act": "gelu"} and d["weights"] == "w.safetensors"
    assert Workload.from_dict(d) == wl and d["pretrained"] is False
    assert Workload().pretrained and not Workload(model="small_cnn").pretrained
    assert not Workload(weights="w.pt").pretrained  # --weights replaces the ImageNet weights
    from edgetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrained weights exist only for mobilenet_v2"):
        Workload(model="timm:resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        Workload(pretrained=True, weights="w.pt")
    with pytest.raises(ConfigError, match="model_args"):
        Workload(model_args=["width=5"])
