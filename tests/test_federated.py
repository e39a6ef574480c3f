"""Federated fine-tuning: the Dirichlet split, the partial-update codec and average, the config's errors, and one
Flower simulation run end to end (smoke sized) in which a client dies mid-round."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from edgetrain.errors import ConfigError
from edgetrain.federated import (FederatedConfig, Profile, average_updates, decode_update, dirichlet_split,
                                 encode_update, nbytes, require_flower, run)

WORKLOAD = {"model": "small_cnn", "data": "digits", "image_size": 16, "channels": 1, "batch_size": 8}


def config(**kw) -> dict:
    return {"workload": WORKLOAD, "clients": 3, "rounds": 2, "local_steps": 2, "analysis_steps": 2,
            "profiles": [{"name": "a", "budget": "4MiB"}, {"name": "b", "budget": "8MiB"}], **kw}


# ---------------------------------------------------------------------------------------------------- split
def test_dirichlet_split_partitions_and_skews():
    labels = torch.arange(10).repeat_interleave(100)  # 1000 samples, 10 classes
    parts = dirichlet_split(labels, 20, alpha=0.1, seed=3, min_size=8)
    allidx = torch.cat(parts).sort().values
    assert torch.equal(allidx, torch.arange(1000))  # disjoint and complete
    assert min(len(p) for p in parts) >= 8
    assert all(torch.equal(a, b) for a, b in zip(parts, dirichlet_split(labels, 20, 0.1, seed=3, min_size=8)))

    def classes_seen(ps):
        return sum(len(labels[p].unique()) for p in ps) / len(ps)

    iid = dirichlet_split(labels, 20, alpha=100.0, seed=3, min_size=8)
    assert classes_seen(parts) < 6 < classes_seen(iid)  # small alpha: few classes per client


def test_dirichlet_split_refuses_what_cannot_be_split():
    with pytest.raises(ConfigError, match="cannot give each of 50 clients 32 samples"):
        dirichlet_split(torch.arange(10).repeat(10), 50, alpha=0.5, min_size=32)


# ---------------------------------------------------------------------------------------------------- codec
def _state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 6, 3, 3, generator=g), "fc.bias": torch.randn(10, generator=g),
            "bn.num_batches_tracked": torch.tensor(5)}


def test_encode_sends_only_changed_slices_and_round_trips_exactly():
    old = _state()
    new = {k: v.clone() for k, v in old.items()}
    assert encode_update(old, new) == {}  # nothing trained, nothing sent
    new["conv.weight"][:, [1, 4]] += 0.5  # two input channels trained (a sparse-update slice)
    new["fc.bias"] += 1.0  # a whole tensor
    update = encode_update(old, new)
    assert set(update) == {"conv.weight@1.index", "conv.weight@1.values", "fc.bias"}
    assert update["conv.weight@1.index"].tolist() == [1, 4]
    assert nbytes(update) == 2 * 4 + 8 * 2 * 9 * 4 + 10 * 4 < nbytes(new)
    merged = average_updates(old, [(3.0, update)])
    for k in old:
        assert torch.equal(merged[k], new[k]), k  # exact: one client's values are the average


def test_average_is_per_element_over_the_clients_that_sent_it():
    old = _state()
    a = {k: v.clone() for k, v in old.items()}
    b = {k: v.clone() for k, v in old.items()}
    a["conv.weight"][:, 0] = 1.0
    a["conv.weight"][:, 1] = 2.0
    b["conv.weight"][:, 1] = 5.0
    b["bn.num_batches_tracked"] = torch.tensor(9)
    merged = average_updates(old, [(1.0, encode_update(old, a)), (3.0, encode_update(old, b))])
    w = merged["conv.weight"]
    assert torch.equal(w[:, 0], torch.ones(8, 3, 3))  # only a sent channel 0
    assert torch.equal(w[:, 1], torch.full((8, 3, 3), (1 * 2.0 + 3 * 5.0) / 4))  # both: weighted by samples
    assert torch.equal(w[:, 2:], old["conv.weight"][:, 2:])  # nobody: unchanged
    assert merged["bn.num_batches_tracked"].item() == 9 and merged["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(merged["fc.bias"], old["fc.bias"])


def test_average_refuses_an_unknown_tensor():
    old = _state()
    with pytest.raises(ConfigError, match="'extra.weight', which the model does not have"):
        average_updates(old, [(1.0, {"extra.weight": torch.zeros(2)})])
    assert decode_update({"x@0.index": torch.tensor([1], dtype=torch.int32), "x@0.values": torch.ones(1, 2)})["x"][0] == 0


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("change, message", [
    ({"strategy": "fedprox"}, "strategy must be one of fedavg, fedavgm"),
    ({"clients": 1}, "clients must be at least 2"),
    ({"rounds": 0}, "rounds must be a positive int"),
    ({"fraction": 0}, "fraction must be in"),
    ({"profiles": []}, "at least one client profile"),
    ({"profiles": [{"name": "x"}]}, "needs a name and a budget or a device"),
    ({"profiles": [{"name": "x", "device": "toaster"}]}, "unknown device 'toaster'"),
    ({"profiles": [{"name": "x", "budget": "1MiB", "ram": 3}]}, r"unknown key\(s\) \['ram'\]"),
    ({"fail": {"client": 1}}, "fail takes"),
    ({"fail": {"client": 1, "round": 1, "mode": "explode"}}, "fail takes"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
])
def test_config_errors_are_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        FederatedConfig.from_dict(config(**change))
    assert "\n" not in str(e.value)


def test_config_round_trips_and_profiles_take_devices(tmp_path):
    c = FederatedConfig.from_dict(config(profiles=[{"name": "mcu", "device": "mcu"}, {"name": "b", "budget": "8MiB"}]))
    assert c.profiles[0] == Profile("mcu", 256 * 1024, 1, 1024 * 1024)
    assert c.profile_of(3) == c.profiles[1]
    assert FederatedConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        FederatedConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        FederatedConfig.load(tmp_path / "missing.yaml")


def test_missing_flower_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(ConfigError, match=r"pip install 'edgetrain\[federated\]'"):
        require_flower()


def test_existing_output_is_refused_and_kept(tmp_path):
    pytest.importorskip("flwr")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run(FederatedConfig.from_dict(config()), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_infeasible_budget_names_the_profile_and_its_clients(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path / "cache"))
    c = FederatedConfig.from_dict(config(profiles=[{"name": "ok", "budget": "8MiB"}, {"name": "tiny", "budget": "1KiB"}],
                                         analysis_ks=[0, 1], weight_last=1))
    with pytest.raises(ConfigError, match=r"profile 'tiny' \(clients 1\): budget 1.0 KiB .* is infeasible") as e:
        run(c, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "rounds.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- a run
def _simulate(tmp_path, out, fail: dict, *extra: str) -> tuple[dict, list[dict]]:
    """``edgetrain federated`` in a new process on the smoke-sized config (3 clients, 2 rounds, every client
    sampled) with ``fail``: the summary and the rows of rounds.jsonl."""
    pytest.importorskip("flwr")
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(yaml.safe_dump(config(fail=fail, fraction=1.0)))
    env = {"EDGETRAIN_SMOKE": "1", "EDGETRAIN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "edgetrain", "federated", "--config", str(cfg), "--out", str(out),
                        "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return summary, [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def test_simulation_completes_a_round_without_a_client_that_dies(tmp_path):
    """Flower's simulation runtime, 3 clients, 2 rounds (smoke sized); client 1 fails halfway through its local
    steps of round 2: round 2 aggregates the other two and the log names client 1 and why."""
    out = tmp_path / "run"
    summary, rounds = _simulate(tmp_path, out, {"client": 1, "round": 2})
    assert summary["rounds"] == 2 and summary["smoke"] is True and summary["peak_rss_bytes"] > 0
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert sorted(c["client"] for c in rounds[1]["clients"]) == [0, 1, 2]
    assert sorted(c["client"] for c in rounds[2]["clients"]) == [0, 2]
    assert [f["client"] for f in rounds[2]["failed"]] == [1]
    assert "client 1 failed (client 1 failed at local step 1 of round 2" in (out / "federated.log").read_text()
    for r in rounds[1:]:
        for c in r["clients"]:
            assert 0 < c["bytes-sent"] < r["bytes_whole_model"]  # only what was trained
            assert c["peak"] <= c["budget"]
    from safetensors.torch import load_file

    from edgetrain.workload import Workload

    wl = Workload(**{**WORKLOAD, "image_size": 16})
    model = wl.build_model(10)
    model.load_state_dict(load_file(out / "model.safetensors"))  # strict: the whole global model
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), wl.build_model(10).state_dict().values()))


def test_a_client_whose_process_dies_costs_only_its_own_reply(tmp_path):
    """Client 1's worker process exits halfway through round 1 (``os._exit``: no reply, no cleanup). Round 1
    completes with the other two and the log says the process died; Ray restarts the worker, so round 2 has every
    client (without the restart, the dead worker fails every later client it is given). A second run into the same
    folder with --force starts a fresh log."""
    out = tmp_path / "run"
    for extra in ((), ("--force",)):
        _, rounds = _simulate(tmp_path, out, {"client": 1, "round": 1, "mode": "exit"}, *extra)
        assert sorted(c["client"] for c in rounds[1]["clients"]) == [0, 2]
        assert [f["client"] for f in rounds[1]["failed"]] == [1]
        assert sorted(c["client"] for c in rounds[2]["clients"]) == [0, 1, 2] and rounds[2]["failed"] == []
        log = (out / "federated.log").read_text().splitlines()
        assert [x.split(":")[0] for x in log] == ["round 0/2", "round 1/2", "round 2/2"]
        assert "client 1 failed (its process died mid-round" in log[1]
