"""Plasticity with fixed random feedback: g' written from the activity equals softplus's derivative, the rule with
symmetric feedback and only the pseudo-gradient term is exactly an SGD step of backprop (float64), the whole rule
against a slow element-by-element reference of the authors' formula (every layer, the first one's error-Hebbian term
included), Oja's term bounds the activities where a negative coefficient silences them (the divergence), meta-training
changes theta through the whole trajectory and keeps theta2 >= 0, one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain.data import load_data
from edgetrain.plasticity import BETA, OnlineTasks, PlasticMLP, meta_train_rule, plastic_step

D = torch.float64


def test_the_derivative_from_the_activity_is_softplus_derivative():
    z = torch.linspace(-3, 3, 101, dtype=D)
    y = F.softplus(z, beta=BETA)
    torch.testing.assert_close(1 - torch.exp(-BETA * y), torch.sigmoid(BETA * z), rtol=1e-12, atol=1e-12)


def test_symmetric_feedback_pseudo_gradient_is_an_sgd_step_of_backprop():
    net = PlasticMLP((6, 5, 4, 3), feedback="sym")
    ws, bs = net.init(torch.Generator().manual_seed(0), D)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g)
    lr = 0.3
    got = plastic_step(net, ws, bs, x, y, torch.tensor([lr], dtype=D))
    leaves = [w.clone().requires_grad_(True) for w in ws]
    h = x
    for i, w in enumerate(leaves):
        h = h @ w.T
        if i < len(leaves) - 1:
            h = F.softplus(h, beta=BETA)
    grads = torch.autograd.grad(F.cross_entropy(h, y), leaves)
    for a, w, gr in zip(got, ws, grads):  # g' from the activity (1 - exp(-beta y)): rounding of exp(log1p(...))
        torch.testing.assert_close(a, w - lr * gr, rtol=1e-9, atol=1e-11)


def slow_rule(net, ws, bs, x, y, theta):
    """The authors' rule written element by element (one sample; their optim.py, read, not copied)."""
    L = len(ws)
    ys = [[float(v) for v in x[0]]]
    for l, w in enumerate(ws):
        z = [sum(float(w[j, k]) * ys[-1][k] for k in range(w.shape[1])) for j in range(w.shape[0])]
        ys.append([math.log1p(math.exp(BETA * v)) / BETA for v in z] if l < L - 1 else z)
    m = max(ys[-1])
    p = [math.exp(v - m) / sum(math.exp(u - m) for u in ys[-1]) for v in ys[-1]]
    es = [None] * (L + 1)
    es[L] = [p[j] - (1.0 if j == int(y[0]) else 0.0) for j in range(len(p))]
    for l in range(L - 1, -1, -1):  # down to the input: e_0
        back = ws[l] if net.feedback == "sym" else bs[l]
        es[l] = [sum(es[l + 1][j] * float(back[j, k]) for j in range(back.shape[0])) * (1 - math.exp(-BETA * ys[l][k]))
                 for k in range(back.shape[1])]
    out = []
    for l, w in enumerate(ws):
        post, pre = (p if l == L - 1 else ys[l + 1]), ys[l]
        new = w.clone()
        for j in range(w.shape[0]):
            for k in range(w.shape[1]):
                oja = post[j] * pre[k] - post[j] * sum(post[i] * float(w[i, k]) for i in range(w.shape[0]))
                new[j, k] = (float(w[j, k]) - float(theta[0]) * es[l + 1][j] * pre[k]
                             - float(theta[1]) * es[l + 1][j] * es[l][k] + float(theta[2]) * oja)
        out.append(new)
    return out


@pytest.mark.parametrize("feedback", ["fa", "sym"])
def test_the_rule_matches_a_slow_reference_on_every_layer(feedback):
    net = PlasticMLP((6, 5, 4, 3), feedback=feedback)
    ws, bs = net.init(torch.Generator().manual_seed(2), D)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(1, 6, generator=g, dtype=D), torch.tensor([1])
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    for got, want in zip(plastic_step(net, ws, bs, x, y, theta), slow_rule(net, ws, bs, x, y, theta)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    es = net.errors(ws, bs, net.forward(ws, x), y)  # e_0 .. e_3; FA sends errors through B, not W
    back = ws[1] if feedback == "sym" else bs[1]
    assert len(es) == 4 and not torch.equal(bs[1], ws[1])
    torch.testing.assert_close(es[1], (es[2] @ back) * torch.sigmoid(BETA * (x @ ws[0].T)), rtol=1e-12, atol=1e-14)


def test_the_first_layer_has_the_error_hebbian_term():
    net = PlasticMLP((5, 4, 3))
    ws, bs = net.init(torch.Generator().manual_seed(4), D)
    x, y = torch.rand(1, 5, dtype=D, generator=torch.Generator().manual_seed(5)), torch.tensor([2])
    without = plastic_step(net, ws, bs, x, y, torch.tensor([0.1, 0.0, 0.0], dtype=D))
    with_hebb = plastic_step(net, ws, bs, x, y, torch.tensor([0.1, 0.5, 0.0], dtype=D))
    es = net.errors(ws, bs, net.forward(ws, x), y)
    torch.testing.assert_close(with_hebb[0] - without[0], -0.5 * es[1].T @ es[0], rtol=1e-12, atol=1e-14)
    assert float((with_hebb[0] - without[0]).abs().max()) > 1e-4


def test_oja_bounds_the_activities_and_a_negative_coefficient_silences_them():
    """The divergence: with inputs in [0, 1] a negative theta2 shrinks the hidden activities tenfold and more within
    one online episode; a positive one (below 2 / |y|^2) keeps them near the input's scale."""
    net = PlasticMLP((20, 16, 12, 3))
    g = torch.Generator().manual_seed(6)
    xs, ys = torch.rand(100, 20, generator=g, dtype=D), torch.randint(0, 3, (100,), generator=g)
    norms = {}
    for th2 in (-0.02, 0.0, 0.02):
        ws, bs = net.init(torch.Generator().manual_seed(7), D)
        theta = torch.tensor([0.0, 0.0, th2], dtype=D)
        for i in range(len(ys)):
            ws = plastic_step(net, ws, bs, xs[i:i + 1], ys[i:i + 1], theta)
        norms[th2] = float(net.forward(ws, xs)[2].pow(2).sum(1).mean())
    assert norms[-0.02] < 0.1 * norms[0.0]
    assert 0.3 * norms[0.0] < norms[0.02] < 2 * float(xs.pow(2).sum(1).mean())


def test_meta_training_moves_theta_through_the_trajectory_and_fa_stays_fixed():
    data = load_data("digits", "train", normalize="none")
    tasks = OnlineTasks(data, [0, 1, 2], ways=3, train_per_class=4, query_per_class=3)
    net = PlasticMLP((64, 16, 3))
    fixed, _ = meta_train_rule(net, tasks, terms=3, episodes=3, learn=False)
    assert fixed.tolist() == torch.tensor([1e-3, 0.0, 0.0]).tolist()
    learned, accs = meta_train_rule(net, tasks, terms=3, episodes=3, lr=1e-2)
    assert len(accs) == 3 and all(v != 0 for v in learned[:2].tolist()) and learned[2] >= 0
    free, _ = meta_train_rule(net, tasks, terms=3, episodes=3, lr=1e-2, oja_nonneg=False)
    assert free[2] < 0  # here the first meta-gradients push theta2 below zero, as on Fashion-MNIST


def test_a_diverging_trajectory_is_a_one_line_error():
    data = load_data("digits", "train", normalize="none")
    tasks = OnlineTasks(data, [0, 1, 2], ways=3, train_per_class=4, query_per_class=3)
    with pytest.raises(et.ConfigError, match="became") as e:
        meta_train_rule(PlasticMLP((64, 16, 3)), tasks, terms=1, episodes=2, a=1e20)
    assert "\n" not in str(e.value)


def test_bad_settings_are_one_line():
    for kw in ({"feedback": "dfa"}, {"sizes": (5,)}):
        with pytest.raises(et.ConfigError) as e:
            PlasticMLP(**kw)
        assert "\n" not in str(e.value)
    data = load_data("digits", "train", normalize="dataset")
    with pytest.raises(et.ConfigError, match="fewer than"):
        OnlineTasks(data, [0, 1], ways=2, train_per_class=400)
    with pytest.raises(et.ConfigError, match="terms"):
        meta_train_rule(PlasticMLP((64, 3)), OnlineTasks(data, [0, 1, 2], ways=3, train_per_class=2,
                                                         query_per_class=1), terms=4, episodes=1)
