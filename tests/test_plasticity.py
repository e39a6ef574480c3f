"""Plasticity with fixed random feedback: g' written from the activity equals softplus's derivative, the rule with
symmetric feedback and only the pseudo-gradient term is exactly an SGD step of backprop (float64), the Oja and
error-Hebbian terms against their formulas, meta-training changes theta through the whole trajectory, one-line
errors."""

from __future__ import annotations


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


def test_the_other_terms_follow_their_formulas_and_fa_uses_the_feedback_matrices():
    net = PlasticMLP((5, 4, 3))
    ws, bs = net.init(torch.Generator().manual_seed(2), D)
    x, y = torch.randn(1, 5, dtype=D), torch.tensor([2])
    ys = net.forward(ws, x)
    es = net.errors(ws, bs, ys, y)
    torch.testing.assert_close(es[0], (es[1] @ bs[1]) * torch.sigmoid(BETA * (x @ ws[0].T)), rtol=1e-12, atol=1e-14)
    theta = torch.tensor([0.0, 0.2, 0.1], dtype=D)
    got = plastic_step(net, ws, bs, x, y, theta)
    p = torch.softmax(ys[-1], 1)
    want1 = ws[1] - 0.2 * es[1].T @ es[0] + 0.1 * (p.T @ ys[1] - (p.T @ p) @ ws[1])
    want0 = ws[0] + 0.1 * (ys[1].T @ x - (ys[1].T @ ys[1]) @ ws[0])  # no error-Hebbian term on the first layer
    torch.testing.assert_close(got[1], want1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0], want0, rtol=1e-12, atol=1e-14)


def test_meta_training_moves_theta_through_the_trajectory_and_fa_stays_fixed():
    data = load_data("digits", "train", normalize="dataset")
    tasks = OnlineTasks(data, [0, 1, 2], ways=3, train_per_class=4, query_per_class=3)
    net = PlasticMLP((64, 16, 3))
    fixed, _ = meta_train_rule(net, tasks, terms=3, episodes=3, learn=False)
    assert fixed.tolist() == torch.tensor([1e-3, 0.0, 0.0]).tolist()
    learned, accs = meta_train_rule(net, tasks, terms=3, episodes=3, lr=1e-2)
    assert len(accs) == 3 and all(v != 0 for v in learned[1:].tolist())


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
