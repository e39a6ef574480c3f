"""COMET technique: meter saving, eb = 0 is exactly plain, adaptive bounds follow the formula, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import edgetrain as et
from edgetrain.measure import measure
from edgetrain.techniques import Comet
from edgetrain.techniques.comet import new_bound
from edgetrain.testing import TinyConvNet, step_grads, tiny_model


def _batch(n=8, size=16):
    torch.manual_seed(0)
    return torch.randn(n, 1, size, size), torch.randint(0, 10, (n,))


def test_meter_shows_the_saving():
    torch.manual_seed(0)
    model = TinyConvNet(in_channels=1, width=16)
    x, y = _batch(16, 32)
    plain = measure(model, (x, y), repeats=1)
    comet = measure(model, (x, y), recipe=Comet(eb=0.05, adaptive=False), repeats=1)
    assert comet.saved_bytes < plain.saved_bytes / 3


def test_zero_bound_reproduces_plain_gradients_exactly():
    model = tiny_model()
    batch = _batch()
    loss, ref = step_grads(model, batch)
    c = copy.deepcopy(model)
    et.apply_(c, Comet(eb=0.0, adaptive=False))
    loss2, got = step_grads(c, batch)
    assert torch.equal(loss, loss2)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-7, msg=n)


def test_gradients_stay_close_at_a_small_bound():
    model = tiny_model()
    batch = _batch()
    _, ref = step_grads(model, batch)
    c = copy.deepcopy(model)
    et.apply_(c, Comet(eb=1e-3, adaptive=False))
    _, got = step_grads(c, batch)
    flat = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
    assert float(flat.norm() / torch.cat([g.flatten() for g in ref.values()]).norm()) < 0.01


def test_adaptive_bound_follows_the_formula():
    model = tiny_model()
    cfg = Comet(eb=1e-3, warmup=1, update_every=2, alpha=0.05)
    handle = et.apply_(model, cfg).parts[0][1]
    for i in range(4):
        step_grads(model, _batch(), seed=i)
    updated = {name for name, _, _ in handle.history}
    assert "features.0.0" in updated and "classifier" in updated
    assert [c for n, c, _ in handle.history if n == "features.0.0"] == [1, 3]  # after warm-up, every 2 forwards
    assert all(cfg.eb_min <= eb <= cfg.eb_max for _, _, eb in handle.history)
    # the formula on known numbers: S = mean_j sum_k delta^2 = 4, mean|G| = 0.5 -> eb = 0.05 * 0.5 * sqrt(3/4)
    delta = torch.ones(4, 2)
    assert new_bound(cfg, delta, torch.full((2, 3), 0.5)) == pytest.approx(0.05 * 0.5 * math.sqrt(3 / 4))


def test_config_errors():
    with pytest.raises(et.ConfigError, match="Comet.eb"):
        Comet(eb=-0.1)
    with pytest.raises(et.ConfigError, match="Comet.backend"):
        Comet(backend="zfp")
    with pytest.raises(et.ConfigError, match="Comet.eb_min"):
        Comet(eb_min=1.0, eb_max=0.1)
    with pytest.raises(et.ConfigError, match="Comet.update_every"):
        Comet(update_every=0)
    with pytest.raises(et.ConfigError, match="Comet: found nothing to act on"):
        et.apply_(TinyConvNet(), Comet(targets=["pool"]), torch.randn(2, 1, 8, 8))
