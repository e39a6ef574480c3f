"""MAML / FOMAML / ANIL: the meta-gradient against central finite differences of the meta-objective in float64
(second order: the only reference that does not share the engine's unrolling), FOMAML's against the query gradient
at the adapted parameters, ANIL adapting the head only, episodic sampling and its one-line errors."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.data import load_data
from edgetrain.meta import Conv4, Episodes, MetaLearner, meta_train

D = torch.float64


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _task(seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 3, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g),
            torch.randn(9, 3, generator=g, dtype=D), torch.randint(0, 3, (9,), generator=g))


def _finite_differences(model: nn.Module, learner: MetaLearner, task, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        grad = torch.zeros_like(p)
        for i in range(p.numel()):
            vals = []
            for sign in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sign * eps
                vals.append(float(learner.meta_loss(*task).detach()))
                with torch.no_grad():
                    p.view(-1)[i] -= sign * eps
            grad.view(-1)[i] = (vals[0] - vals[1]) / (2 * eps)
        out[name] = grad
    return out


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_second_order_meta_gradient_equals_finite_differences(algorithm):
    model = _tiny()
    learner = MetaLearner(model, algorithm, inner_steps=2, inner_lr=0.5)
    task = _task()
    model.zero_grad()
    learner.meta_loss(*task).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = _finite_differences(model, learner, task)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-8, msg=n)
    assert all(got[n].abs().sum() > 0 for n in got)  # the body is meta-learned by ANIL too


def test_fomaml_meta_gradient_is_the_query_gradient_at_the_adapted_parameters_and_differs_from_maml():
    model = _tiny()
    xs, ys, xq, yq = task = _task(1)
    fo = MetaLearner(model, "fomaml", inner_steps=2, inner_lr=0.5)
    model.zero_grad()
    fo.meta_loss(*task).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    adapted = {k: v.detach().requires_grad_(True) for k, v in fo.adapt(xs, ys).items()}
    loss = nn.functional.cross_entropy(fo.logits(adapted, xq), yq)
    want = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values()))))
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)
    model.zero_grad()
    MetaLearner(model, "maml", inner_steps=2, inner_lr=0.5).meta_loss(*task).backward()
    assert any(not torch.allclose(got[n], p.grad) for n, p in model.named_parameters())


def test_anil_adapts_the_head_only_and_changes_no_parameter_in_place():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys, _, _ = _task()
    adapted = MetaLearner(model, "anil", inner_steps=3, inner_lr=0.5).adapt(xs, ys)
    assert set(adapted) == {"2.weight", "2.bias"}
    assert not torch.equal(adapted["2.weight"], model[2].weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_episodes_relabel_and_refuse_what_the_data_cannot_give():
    data = load_data("digits", "train", normalize="dataset")
    ep = Episodes(data, classes=[5, 6, 7, 8, 9], ways=5, shots=2, queries=3)
    xs, ys, xq, yq = ep.sample(random.Random(0))
    assert xs.shape[0] == 10 and xq.shape[0] == 15 and sorted(set(ys.tolist())) == list(range(5))
    assert torch.equal(torch.bincount(yq), torch.full((5,), 3))
    with pytest.raises(et.ConfigError, match="6-way tasks need 6 classes") as e:
        Episodes(data, classes=[5, 6, 7, 8, 9], ways=6)
    assert "\n" not in str(e.value)
    with pytest.raises(et.ConfigError, match="fewer than 500 shots"):
        Episodes(data, classes=[0, 1], ways=2, shots=500)
    with pytest.raises(et.ConfigError, match="choose one of"):
        MetaLearner(_tiny(), "reptile")


def test_a_short_meta_training_runs_and_evaluation_reports_a_confidence_interval():
    torch.manual_seed(0)
    data = load_data("digits", "train", image_size=16, normalize="dataset")  # 16 -> 1 after Conv4's 4 pools
    train_ep = Episodes(data, classes=[0, 1, 2, 3, 4], ways=5, shots=1, queries=5)
    test_ep = Episodes(data, classes=[5, 6, 7, 8, 9], ways=5, shots=1, queries=5)
    learner = MetaLearner(Conv4(ways=5, in_channels=1, width=8), "anil", inner_steps=2, inner_lr=0.1)
    losses = meta_train(learner, train_ep, iterations=3, meta_batch=2, progress=False)
    assert len(losses) == 3 and all(l == l for l in losses)
    r = learner.evaluate(test_ep, n=20)
    assert 0 <= r["accuracy"] <= 1 and r["ci95"] > 0 and r["episodes"] == 20


def test_review_findings_running_statistics_frozen_parameters_no_bias_heads_and_zero_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3, bias=False)).double()
    model[0].weight.requires_grad_(False)
    stats = {k: v.clone() for k, v in model.named_buffers()}
    task = _task()
    for alg in ("maml", "fomaml", "anil"):
        learner = MetaLearner(model, alg, inner_steps=2, inner_lr=0.5)
        learner.meta_loss(*task).backward()  # a frozen parameter and a head without bias work
        assert model[0].weight.grad is None
        assert all(torch.equal(stats[k], v) for k, v in model.named_buffers())  # no task moves the statistics
        same = learner.adapt(task[0], task[1], steps=0)
        assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in same.items())  # no step taken
