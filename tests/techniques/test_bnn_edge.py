"""BNN on the edge: binary saved activations in the meter, exact STE/binary-layer gradients against the
standard formulation, l1-BN approximate backward against its formula and the exact gradient, fp16 state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.measure import measure
from edgetrain.techniques import BNNEdge
from edgetrain.techniques.bnn_edge import BinaryConv2d, BinaryLinear, EdgeL1BatchNorm, SignActivation, binary_mlp


def _batch(n=100):
    torch.manual_seed(0)
    return torch.rand(n, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (n,))


def test_saved_memory_is_binary_and_state_is_fp16():
    torch.manual_seed(0)
    model = binary_mlp()
    batch = _batch()
    opt = lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], eps=1e-4)  # noqa: E731
    std = measure(model, batch, optimizer=opt(model), repeats=1)
    edge_model = copy.deepcopy(model)
    et.apply_(edge_model, BNNEdge(), batch[0])
    edge = measure(edge_model, batch, optimizer=opt(edge_model), repeats=1)
    n, h = 100, 256
    # standard: first input, and per hidden layer the +-1 linear input, the BN input and the sign input (fp32)
    assert std.saved_bytes >= 4 * n * (784 + 3 * 3 * h)
    # edge: the first layer's real input plus 1-bit tensors and per-channel statistics
    assert edge.saved_bytes <= 4 * n * 784 + 3 * 3 * n * h // 8 + 32 * 1024  # + statistics, logits
    assert edge.grad_bytes < 0.55 * std.grad_bytes and edge.optimizer_bytes < 0.55 * std.optimizer_bytes


def test_binary_layers_and_sign_match_the_standard_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(BinaryLinear(20, 16, first_layer=True), SignActivation(), BinaryLinear(16, 8)).double()
    with torch.no_grad():
        model[2].weight.mul_(3)  # some |W| > 1: the clip STE must zero them
    x = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])
    edge = copy.deepcopy(model)
    et.apply_(edge, BNNEdge(fp16_weights=False, fp16_grads=False), x.detach())
    got = torch.autograd.grad(edge(x).square().sum(), [x, *edge.parameters()])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_binary_conv_matches_the_standard_gradients():
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 4, stride=2).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64).sign().requires_grad_()
    ref = torch.autograd.grad(conv(x).square().sum(), [x, conv.weight])
    edge = copy.deepcopy(conv)
    et.apply_(nn.Sequential(edge), BNNEdge(fp16_weights=False, fp16_grads=False), x.detach())
    got = torch.autograd.grad(edge(x).square().sum(), [x, edge.weight])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_l1_batchnorm_backward_is_the_papers_approximation():
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64) * 2 + 1
    beta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(64, 8, dtype=torch.float64)
    mu = x.mean(0)
    sigma = (x - mu).abs().mean(0)
    xi = x.clone().requires_grad_()
    EdgeL1BatchNorm.apply(xi, beta, mu, sigma, False).backward(dy)
    xhat = (x - mu) / sigma
    s, kappa = xhat.sign(), xhat.abs().mean(0).half().double()
    expected = (dy - dy.mean(0) - s * kappa * (dy * s).mean(0)) / sigma  # spec §4.3
    torch.testing.assert_close(xi.grad, expected)
    torch.testing.assert_close(beta.grad, dy.sum(0))
    # against the exact gradient of l1 BN (statistics differentiated): close in direction
    xe = x.clone().requires_grad_()
    m = xe.mean(0)
    exact = torch.autograd.grad(((xe - m) / (xe - m).abs().mean(0) * dy).sum(), xe)[0]
    cos = float((exact * xi.grad).sum() / (exact.norm() * xi.grad.norm()))
    assert cos > 0.9


def test_errors_and_defaults():
    with pytest.raises(et.ConfigError, match="BNNEdge.fp16_weights"):
        BNNEdge(fp16_weights="yes")
    layer = BinaryLinear(4, 4)
    layer.bias = nn.Parameter(torch.zeros(4))
    x = torch.randn(2, 4)
    with pytest.raises(et.ConfigError, match="has a bias"):
        et.apply_(nn.Sequential(layer), BNNEdge(), x)
    with pytest.raises(et.ConfigError, match="not a binary network"):
        et.apply_(nn.Sequential(nn.Linear(4, 4)), BNNEdge(targets=["0"]), x)
