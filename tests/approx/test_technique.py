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
    assert not any("forward" in m.__dict__ for m in model.modules())  # it acts on the layers' calls
    part = handle.parts[0][1]
    hits = part.hits
    approx = model(x)
    assert part.hits - hits == 4  # every conv2d and linear call: features.{0,1,2}.0 and the classifier
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
    x, y = tiny_batch(16)
    et.apply_(model, ApproxMultiply(model="mitchell", mantissa_bits=5), x)
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
    handle = et.apply_(model, ApproxMultiply(targets=["classifier"]))
    part = handle.parts[0][1]
    hits = part.hits
    model(tiny_batch()[0])
    assert part.hits - hits == 1


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
    with pytest.raises(et.ConfigError, match="select no conv2d/linear layer"):
        et.apply_(tiny_model(), ApproxMultiply(targets=["features.0.1"]))  # a BatchNorm

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(et.ConfigError, match="read inside composite calls edgetrain cannot see into"):
        et.apply_(SelfAttention(), ApproxMultiply(), torch.randn(2, 3, 8))
    with pytest.raises(et.ConfigError, match="no linear or conv2d layer"):
        et.apply_(nn.Sequential(nn.ReLU()), ApproxMultiply(), torch.randn(2, 3))
    model = nn.Sequential(nn.Linear(3, 2))
    et.apply_(model, ApproxMultiply(), torch.randn(2, 3))
    with pytest.raises(et.ConfigError, match="float32"):
        model(torch.randn(1, 3, dtype=torch.float64))
