"""Shared conformance suite: runs over every registered technique and each of its example configs."""

from __future__ import annotations

import copy

import pytest
import torch

import edgetrain as et
from edgetrain.registry import config_from_dict
from edgetrain.testing import frozen_reference, model_for, model_state, step_grads, tiny_batch

CASES = [pytest.param(info, cfg, id=f"{info.name}-{i}") for info in et.list_techniques() for i, cfg in
         enumerate(info.examples)]


def test_every_technique_has_examples_and_metadata():
    for info in et.list_techniques():
        assert info.examples, f"{info.name} registers no example configs for the conformance suite"
        assert info.summary and info.paper and info.reduces, info.name
        assert all(type(c) is info.config for c in info.examples)


def test_every_technique_config_is_importable_from_the_top_level_and_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for info in et.list_techniques():
        assert getattr(et, info.config.__name__, None) is info.config, info.config.__name__
        assert info.config.__name__ in et.__all__
        assert f"| `{info.name}` | `{info.config.__name__}(" in readme, f"{info.name} is not in README's technique table"


@pytest.mark.parametrize("info,cfg", CASES)
def test_config_round_trip(info, cfg):
    assert config_from_dict(cfg.to_dict()) == cfg
    r = et.Recipe([cfg], name="x")
    assert et.Recipe.from_json(r.to_json()) == r
    assert et.Recipe.from_yaml(r.to_yaml()) == r


@pytest.mark.parametrize("info,cfg", CASES)
def test_unknown_field_is_a_clear_error(info, cfg):
    with pytest.raises(et.ConfigError, match="unknown field"):
        config_from_dict({**cfg.to_dict(), "no_such_field": 1})


@pytest.mark.parametrize("info,cfg", CASES)
def test_apply_then_remove_restores_the_model(info, cfg):
    model = model_for(info)
    x, y = tiny_batch()
    before = model_state(model)
    model.eval()
    out_before = model(x)
    model.train()
    handle = et.apply_(model, cfg, x)
    step_grads(model, (x, y))  # use it once: forward and backward through the technique
    handle.remove()
    model.zero_grad(set_to_none=True)
    after = model_state(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["patched"] == before["patched"] == []
    assert after["training"] == before["training"]
    # BatchNorm running stats may move in the one training step; parameters must not (no optimizer step), beyond
    # the rounding a technique states when it keeps no copy of the originals (int8 W/s·s, fp16 weights)
    tol = info.remove_tolerance
    for k, v in before["state"].items():
        if "running" not in k and "num_batches" not in k:
            if tol:
                torch.testing.assert_close(after["state"][k], v, rtol=tol, atol=tol * float(v.abs().max()), msg=k)
            else:
                assert torch.equal(after["state"][k], v), k
    model.load_state_dict(before["state"])
    model.eval()
    assert torch.equal(model(x), out_before)


@pytest.mark.parametrize("info,cfg", CASES)
def test_gradients_match_plain_pytorch(info, cfg):
    """float64: loss, trainable gradients and BatchNorm statistics equal the exact reference.

    Lossy-by-design techniques either state ``grad_tolerance`` (checked here) or set it to 0 and test their
    gradients against their own slow reference of the paper's math in ``tests/techniques/``.
    """
    if not info.exact and not info.grad_tolerance:
        pytest.skip(f"{info.name} is lossy by design or adds parameters the generic reference cannot name; its "
                    "reference test lives in tests/techniques/")
    original = model_for(info, torch.float64)
    model = copy.deepcopy(original)
    batch = tiny_batch(dtype=torch.float64)
    et.apply_(model, cfg, batch[0])
    ref = frozen_reference(original, model)
    loss, grads = step_grads(model, batch)
    ref_loss, ref_grads = step_grads(ref, batch)
    assert grads, "the technique left nothing trainable"
    assert set(grads) == set(ref_grads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable  # frozen parameters get no gradient at all
    tol = info.grad_tolerance if not info.exact else 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=tol, atol=tol, msg=n)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=1e-12, atol=1e-12, msg=k)
