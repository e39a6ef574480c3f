"""The energy and time model (edgetrain.hardware.energy, .profiles, .calibrate): a hand-computed layer, the direction
techniques promise on built-in models, the CLI, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.cli import main as cli_main
from edgetrain.cost import CostTable, LayerCost, estimate
from edgetrain.errors import ConfigError
from edgetrain.hardware.energy import step_cost, traffic
from edgetrain.hardware.profiles import BUILTIN, get_profile, load_profile, parse_profile
from edgetrain.models import create_model


def _c(v: float) -> dict:
    return {"value": v, "source": "test"}


def toy(**over) -> dict:
    d = {"name": "toy", "compute": {"mac_pj": _c(0.5), "macs_per_second": _c(8)}, "active_watts": _c(0.0),
         "levels": [{"name": "fast", "capacity": _c(64), "read_pj_per_byte": _c(1), "write_pj_per_byte": _c(2),
                     "bandwidth": _c(100)},
                    {"name": "slow", "read_pj_per_byte": _c(10), "write_pj_per_byte": _c(20), "bandwidth": _c(10)}]}
    d.update(over)
    return d


def one_linear() -> CostTable:
    """Linear(4 -> 3) at batch 2 that trains its weight and passes the gradient on (2 backward products per MAC)."""
    row = LayerCost(name="fc", kind="Linear", in_shape=(4,), out_shape=(3,), weight_bytes=60, trainable_bytes=60,
                    macs=12, backward_macs=24, saved_per_sample=16.0)
    return CostTable({"fc": row}, batch_size=2, optimizer="sgd_momentum", input_shape=(4,))


def test_one_layer_by_hand():
    # resident = 60 weights + 60 grads + 60 momentum + 32 saved + 32 batch = 244 B > 64: the slow level;
    # streaming = 32 B input + 24 B output = 56 B <= 64: the fast level.
    rows, home, resident = traffic(one_linear(), parse_profile(toy()).levels)
    assert (home, resident) == ("slow", 244)
    (t,) = rows
    assert t.reads == {"forward": {"fast": 32, "slow": 60}, "backward": {"fast": 24, "slow": 32 + 60},
                       "optimizer": {"fast": 0, "slow": 180}}
    assert t.writes == {"forward": {"fast": 24, "slow": 32}, "backward": {"fast": 32, "slow": 60},
                        "optimizer": {"fast": 0, "slow": 120}}
    c = step_cost(one_linear(), parse_profile(toy()))
    # MACs 24 + 48 at 0.5 pJ; fast 56 read x 1 + 56 written x 2; slow 332 read x 10 + 212 written x 20
    assert c.energy_by == pytest.approx({"compute": 36e-12, "fast": 168e-12, "slow": 7560e-12, "active": 0.0})
    assert c.energy_j == pytest.approx(7764e-12)
    # forward max(24/8, 56/100 + 92/10); backward max(48/8, 56/100 + 152/10); optimizer 300/10
    assert c.time_by_pass == pytest.approx({"forward": 9.76, "backward": 15.76, "optimizer": 30.0})
    assert c.time_s == pytest.approx(55.52)
    d = toy(active_watts=_c(2.0))
    d["compute"] = {**d["compute"], "op_overhead_s": _c(0.1), "step_overhead_s": _c(1.0)}
    c = step_cost(one_linear(), parse_profile(d))
    assert c.time_s == pytest.approx(55.52 + 0.2 + 1.0)
    assert c.energy_j == pytest.approx(7764e-12 + 2.0 * 56.72)
    (layer,) = c.layers  # the layer carries the board's power over its own time; the step overhead stays apart
    assert layer["energy_j"] == pytest.approx(7764e-12 + 2.0 * 55.72)


def test_efficiency_and_capacity_move_the_layer():
    d = toy()
    d["compute"] = {**d["compute"], "efficiency": {"linear": _c(0.25)}}
    c = step_cost(one_linear(), parse_profile(d))
    assert c.time_by_pass["backward"] == pytest.approx(48 / 2)  # 48 MACs at 8 x 0.25 per second: compute-bound now
    d["compute"]["efficiency"] = {"linear": _c(0.25), "linear_backward": _c(0.1)}
    c = step_cost(one_linear(), parse_profile(d))
    assert c.time_by_pass["forward"] == pytest.approx(24 / 2)  # the forward keeps the kind's 0.25: 12 > 9.76
    assert c.time_by_pass["backward"] == pytest.approx(48 / 0.8)
    relu = LayerCost(name="act", kind="ReLU", in_shape=(3,), out_shape=(3,), saved_per_sample=12.0)
    table = CostTable({"act": relu}, batch_size=2, optimizer="sgd", input_shape=(3,))
    d["compute"]["efficiency"] = {"other": _c(0.5), "other_backward": _c(0.25)}
    c = step_cost(table, parse_profile(d))  # in 24 B + out 24 B streaming in "fast"; saved 24 B resident there too
    assert c.time_by_pass["forward"] == pytest.approx((24 + 24) / 100 / 0.5)
    assert c.time_by_pass["backward"] == pytest.approx((24 + 24 + 24) / 100 / 0.25)  # grad out, saved, grad in
    d = toy()
    d["levels"][0]["capacity"] = _c(1024)  # everything fits the fast level: no write-back, all accesses fast
    c = step_cost(one_linear(), parse_profile(d))
    assert c.resident_level == "fast" and c.bytes_by_level["slow"] == 0
    assert c.bytes_by_level["fast"] == 56 + 56 + 332 + 212 - 32  # the same bytes, less the write-back of saved


def _energy(model: nn.Module, recipe, shape, batch=8) -> float:
    x = torch.zeros(2, *shape)
    table = estimate(model, recipe, batch_size=batch, example=x)
    with et.apply_(model, recipe, x):
        return step_cost(table, get_profile("horowitz45"), model).energy_j


@pytest.mark.parametrize("name,kwargs,shape", [("small_cnn", {"in_channels": 1}, (1, 28, 28)),
                                               ("mobilenet_v2", {}, (3, 64, 64))])
def test_techniques_that_move_fewer_bytes_cost_less_energy(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs)
    e = {r: _energy(model, et.Recipe(t), shape) for r, t in
         {"plain": [], "bias": [et.BiasOnly()], "last": [et.Freeze(last_k_blocks=1)], "head": [et.Freeze()],
          "actnn": [et.ActNN(bits=2)]}.items()}
    assert e["head"] < e["last"] < e["plain"]
    assert e["bias"] < e["plain"]
    assert e["actnn"] < e["plain"]  # fewer saved bytes to write back and read (the codec's compute is not modelled)
    assert _energy(model, et.Recipe([]), shape) == e["plain"]  # the model was restored by each apply_


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="unknown device profile 'nope'; known: horowitz45"):
        get_profile("nope")
    h = parse_profile(BUILTIN["horowitz45"])
    with pytest.raises(ConfigError, match=r"'horowitz45' has no compute.macs_per_second, levels.sram_32k.bandwidth"):
        step_cost(one_linear(), h, time=True)
    d = toy()
    del d["compute"]["mac_pj"]
    with pytest.raises(ConfigError, match=r"'toy' has no compute.mac_pj, which the energy estimate needs"):
        step_cost(one_linear(), parse_profile(d), energy=True)
    assert step_cost(one_linear(), parse_profile(d)).energy_j is None  # asked for nothing: only time
    bad = [
        (toy(active_watts=_c(-1.0)), "active_watts must be >= 0, got -1.0"),
        (toy(compute={"macs_per_second": _c(0)}), "compute.macs_per_second must be > 0, got 0.0"),
        (toy(compute={"mac_pj": 4.6}), r"compute.mac_pj must be \{value: ..., source"),
        (toy(compute={"mac_pj": {"value": 1, "source": " "}}), "compute.mac_pj has an empty source"),
        (toy(compute={"mac_pj": _c("lots")}), "compute.mac_pj must be a number, got 'lots'"),
        (toy(compute={"flops": _c(1)}), r"unknown compute keys \['flops'\]"),
        (toy(compute={"efficiency": {"fft": _c(1)}}), "compute.efficiency is a mapping of op kinds"),
        (toy(levels=[]), "levels must be a non-empty list"),
        (toy(levels=[{"name": "a"}, {"name": "b"}]), "level 'a' needs a capacity"),
        (toy(extra=1), r"unknown keys \['extra'\]"),
    ]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_profile(d)


def test_profile_files(tmp_path):
    import yaml

    p = tmp_path / "board.yaml"
    d = toy()
    d["levels"][0]["capacity"] = _c("256KiB")
    p.write_text(yaml.safe_dump(d))
    prof = load_profile(p)
    assert prof.levels[0].capacity.value == 256 * 1024 and get_profile(str(p)) == prof
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        get_profile(str(tmp_path / "missing.yaml"))


def test_every_builtin_constant_has_a_source():
    for name in BUILTIN:
        prof = get_profile(name)
        assert prof.constants() and all(src for _, _, src in prof.constants())
        assert prof.can(energy=True)
    assert get_profile("mcu").can(time=True) and not get_profile("horowitz45").can(time=True)


def test_host_profile_is_measured_and_times_but_has_no_energy():
    host = get_profile("host")
    assert host.can(time=True) and not host.can(energy=True)
    assert host.macs_per_second.value > 1e8 and host.levels[-1].bandwidth.value > 1e8
    with pytest.raises(ConfigError, match=r"'host' has no compute.mac_pj, active_watts"):
        step_cost(one_linear(), host, energy=True)


def test_cli_energy_json_matches_the_library(capsys):
    rc = cli_main(["estimate", "--model", "small_cnn", "--channels", "1", "--image-size", "28", "--batch-size", "8",
                   "--energy", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    assert out["step_cost"]["energy_j"] == pytest.approx(_energy(model, et.Recipe([]), (1, 28, 28)), rel=1e-9)
    assert {c["key"] for c in out["step_cost"]["constants"]} >= {"mac_pj", "dram.read_pj_per_byte"}
    assert cli_main(["estimate", "--model", "small_cnn", "--energy", "--profile", "nope"]) == 2
    assert "unknown device profile 'nope'" in capsys.readouterr().err


def test_the_docs_python_blocks_run(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "hardware.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/hardware.md", "exec"), {})
    assert "one step on 'horowitz45'" in capsys.readouterr().out
