"""Int8 training with QAS (TTE): gradients vs a float64 straight-through reference, real int8 savings, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain.cost import estimate
from edgetrain.testing import model_state, tiny_batch, tiny_model
from edgetrain.techniques.int8 import Int8Layer, dequantize_input, quantize_input


def _ste_round(t):
    return t + (torch.round(t) - t).detach()


def _reference(x, wbar, scale, bias, stride, padding, groups):
    """The spec's math written with autograd: straight-through rounding of input and weight."""
    q, s, z = quantize_input(x.detach())
    x_hat = x + (dequantize_input(q, s, z, x.dtype) - x).detach()  # forward: dequantised; backward: identity
    w = torch.clamp(_ste_round(wbar), -127, 127) * scale.view(-1, 1, 1, 1)
    return F.conv2d(x_hat, w, bias, stride, padding, 1, groups)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 1), (1, 1, 4), (1, 0, 1)])
@pytest.mark.parametrize("qas", [False, True])
def test_gradients_match_the_straight_through_reference(stride, padding, groups, qas):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6 if groups == 1 else 4, 4 // groups, 3, 3, dtype=torch.float64)
    scale = w.abs().amax((1, 2, 3)) / 127
    wbar = (w / scale.view(-1, 1, 1, 1)).requires_grad_()
    b = torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True)
    y = Int8Layer.apply(x, wbar, scale, b, ((stride, stride), (padding, padding), (1, 1), groups), qas)
    ref = _reference(x, wbar, scale, b, stride, padding, groups)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, wbar, b), g)
    want = list(torch.autograd.grad(ref, (x, wbar, b), g))
    if qas:
        want[1] = want[1] / scale.view(-1, 1, 1, 1) ** 2
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("qas", [False, True])
def test_linear_gradients_match_the_straight_through_reference(qas):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)  # (batch, tokens, features)
    w = torch.randn(6, 8, dtype=torch.float64)
    scale = w.abs().amax(1) / 127
    wbar = (w / scale.view(-1, 1)).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = Int8Layer.apply(x, wbar, scale, b, None, qas)
    q, s, z = quantize_input(x.detach())
    x_hat = x + (dequantize_input(q, s, z, x.dtype) - x).detach()
    ref = F.linear(x_hat, torch.clamp(_ste_round(wbar), -127, 127) * scale.view(-1, 1), b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, wbar, b), g)
    want = list(torch.autograd.grad(ref, (x, wbar, b), g))
    if qas:
        want[1] = want[1] / scale.view(-1, 1) ** 2
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_qas_restores_the_fp32_weight_gradient_scale():
    """With QAS, dL/dW̄ = dL/dW / s_W: one SGD step on W̄ moves W = s_W W̄ as fp32 SGD on W would."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.05
    scale = w.abs().amax((1, 2, 3)) / 127
    wbar = (w / scale.view(-1, 1, 1, 1)).requires_grad_()
    y = Int8Layer.apply(x, wbar, scale, None, ((1, 1), (1, 1), (1, 1), 1), True)
    (gq,) = torch.autograd.grad(y.square().sum(), wbar)
    wq = torch.clamp(torch.round(wbar.detach()), -127, 127) * scale.view(-1, 1, 1, 1)
    wq.requires_grad_()
    q, s, z = quantize_input(x)
    (gf,) = torch.autograd.grad(F.conv2d(dequantize_input(q, s, z, x.dtype), wq, None, 1, 1).square().sum(), wq)
    torch.testing.assert_close(gq * scale.view(-1, 1, 1, 1), gf)  # s_W · ΔW̄ = ΔW


def test_input_quantisation_error_is_bounded():
    x = torch.randn(1000, dtype=torch.float64) * 3
    q, s, z = quantize_input(x)
    assert q.dtype == torch.int8
    assert (dequantize_input(q, s, z, x.dtype) - x).abs().max() <= s / 2 + 1e-12


def test_meter_sees_int8_saved_inputs_and_estimate_agrees():
    model = tiny_model()
    x, y = tiny_batch(16)
    plain = et.measure(model, (x, y), recipe=et.Freeze(last_k_blocks=2), repeats=1)
    q = et.measure(model, (x, y), recipe=[et.Freeze(last_k_blocks=2), et.Int8()], repeats=1)
    # the first trainable conv keeps its input as int8 instead of fp32 (+ two scalars)
    assert q.saved_by_module["features.1.0"] * 4 <= plain.saved_by_module["features.1.0"] + 64
    # the ReLU after it keeps 1 bit per element instead of its fp32 output
    assert q.saved_by_module["features.1.2"] * 32 <= plain.saved_by_module["features.1.2"] + 32
    assert q.saved_bytes < plain.saved_bytes
    est = estimate(model, [et.Freeze(last_k_blocks=2), et.Int8()], (1, 8, 8), 16)
    assert abs(est.saved_bytes - q.saved_bytes) <= 0.10 * q.saved_bytes


def test_apply_remove_round_trip_and_trained_weights_are_kept():
    model = tiny_model()
    before = model_state(model)
    h = et.apply_(model, et.Int8())
    h.remove()  # W/s·s: the rounding of fp32, no copy of W kept (Int8's stated remove_tolerance)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before["state"][k], rtol=1e-6, atol=1e-7)
    h = et.apply_(model, et.Int8())
    conv = model.get_submodule("features.0.0")
    with torch.no_grad():
        conv.weight.add_(1.0)  # one int8 step in every weight
    scale = conv.weight_scale.clone()
    h.remove()
    torch.testing.assert_close(conv.weight, before["state"]["features.0.0.weight"] + scale.view(-1, 1, 1, 1))


def test_errors():
    with pytest.raises(et.ConfigError, match="qas: must be true/false"):
        et.Int8(qas="yes")
    m = tiny_model()
    with pytest.raises(et.ConfigError, match="no trainable conv/linear layer"):
        et.apply_(m, [et.Freeze(), et.Int8()])
    with pytest.raises(et.ConfigError, match="already changed by another technique"):
        et.apply_(m, [et.SparseUpdate(bias_last_k=1, weights={"features.2.0": 0.5}), et.Int8(targets="features.2.0")])
    with pytest.raises(et.ConfigError, match="select no conv1d/conv2d/conv3d/linear layer"):
        et.apply_(m, et.Int8(targets="pool"))
    et.apply_(m, et.Int8(targets="classifier")).remove()  # a linear layer: int8 takes it (weight and input)
