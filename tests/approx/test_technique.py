"""ApproxMultiply technique: apply/remove through the registry, training through it, one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.approx import approx_linear, get_lut
from edgetrain.techniques import ApproxMultiply
from edgetrain.testing import tiny_batch, tiny_model


def test_apply_swaps_every_linear_and_conv_and_remove_restores():
    model = tiny_model()
    x, y = tiny_batch()
    model.eval()
    before = model(x)
    keys = list(model.state_dict())
    handle = et.apply_(model, ApproxMultiply(model="mbm"))
    patched = sorted(n for n, m in model.named_modules() if "forward" in m.__dict__)
    assert patched == ["classifier", "features.0.0", "features.1.0", "features.2.0"]
    approx = model(x)
    assert not torch.allclose(approx, before, rtol=1e-4, atol=1e-4)
    feats = model.pool(model.features(x)).flatten(1)
    torch.testing.assert_close(approx, approx_linear(feats, model.classifier.weight, model.classifier.bias,
                                                     get_lut("mbm", 7)), rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    handle.remove()
    assert torch.equal(model(x), before)


def test_training_steps_through_the_simulation_reduce_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    et.apply_(model, ApproxMultiply(model="mitchell", mantissa_bits=5))
    x, y = tiny_batch(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_targets_select_layers():
    model = tiny_model()
    et.apply_(model, ApproxMultiply(targets=["classifier"]))
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == ["classifier"]


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "booth"}, "ApproxMultiply.model: unknown multiplier 'booth'"),
    ({"mantissa_bits": 0}, "ApproxMultiply.mantissa_bits"),
    ({"mantissa_bits": 12}, "ApproxMultiply.mantissa_bits"),
    ({"mantissa_bits": True}, "ApproxMultiply.mantissa_bits"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(et.ConfigError, match=match):
        ApproxMultiply(**kwargs)


def test_unsupported_modules_and_dtypes_are_one_line_errors():
    with pytest.raises(et.ConfigError, match="float64 weights"):
        et.apply_(tiny_model(dtype=torch.float64), ApproxMultiply())
    with pytest.raises(et.ConfigError, match="select no Linear/Conv2d"):
        et.apply_(tiny_model(), ApproxMultiply(targets=["features.0.1"]))  # a BatchNorm
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(et.ConfigError, match="never called"):
        et.apply_(mha, ApproxMultiply())
    assert not any("forward" in m.__dict__ for m in mha.modules())
    with pytest.raises(et.ConfigError, match="no nn.Linear or nn.Conv2d"):
        et.apply_(nn.Sequential(nn.ReLU()), ApproxMultiply())
    model = nn.Sequential(nn.Linear(3, 2))
    et.apply_(model, ApproxMultiply())
    with pytest.raises(et.ConfigError, match="float32"):
        model(torch.randn(1, 3, dtype=torch.float64))
