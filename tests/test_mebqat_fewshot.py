"""MEBQAT-MAML: the meta-update against first-order MAML gradients computed by hand at each task's bit widths, the
inner loop leaving BatchNorm's beta, the bit widths put back, and one-line errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.data import load_data
from edgetrain.lowp.fakequant import FP, quantizers, set_bits
from edgetrain.mebqat_fewshot import bn_betas, evaluate_bitwidths, learner, meta_train, task_pairs
from edgetrain.meta import Episodes, MetaLearner


def _net(dtype=torch.float64) -> nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(dtype)
    et.apply_(net, et.MEBQAT(method="lsq", weight_bits=None, act_bits=None, candidates=(2, 4)),
              torch.rand(2, 1, 8, 8, dtype=dtype))
    return net


class _Double(Episodes):
    def sample(self, rng: random.Random):  # noqa: ANN201
        return tuple(t.double() if t.is_floating_point() else t for t in super().sample(rng))


def _episodes(dtype=torch.float64) -> Episodes:  # noqa: ANN001
    data = load_data("digits", "train", channels=1, image_size=8)
    return (_Double if dtype == torch.float64 else Episodes)(data, [0, 1, 2, 3, 4], ways=3, shots=2, queries=3)


def test_meta_update_is_the_clamped_mean_of_first_order_query_gradients_at_each_pair():
    episodes, clamp = _episodes(), 0.02
    net, ref = _net(), _net()
    for m in (net, ref):  # initialise the LSQ steps at every candidate on data (the shared step: one each)
        for b in (2, 4):
            set_bits(m, b, b)
            m(episodes.sample(random.Random(9))[0])
        set_bits(m, FP, FP)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    meta = learner(net, inner_steps=2, inner_lr=0.1)
    pool = task_pairs(net)
    history = meta_train(meta, episodes, 1, meta_batch=3, clamp=clamp, seed=5, progress=False,
                         optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    # by hand: the same draws, each task's FOMAML gradient (the query gradient at the adapted parameters)
    rng, want = random.Random(5), {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    drawn = [rng.choice(pool) for _ in range(3)]
    assert history[0][1] == drawn and any(p != (FP, FP) for p in drawn)
    betas = set(bn_betas(ref))
    for w, a in drawn:
        xs, ys, xq, yq = episodes.sample(rng)
        set_bits(ref, w, a)
        params = {n: p for n, p in ref.named_parameters()}
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(ref, params, (xs,)), ys)
            names = [n for n in params if n not in betas]
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            params = {**params, **{n: params[n] - 0.1 * g for n, g in zip(names, grads) if g is not None}}
        adapted = {n: p.detach().requires_grad_() for n, p in params.items()}
        q = F.cross_entropy(torch.func.functional_call(ref, adapted, (xq,)), yq) / 3
        for n, g in zip(adapted, torch.autograd.grad(q, list(adapted.values()), allow_unused=True)):
            if g is not None:
                want[n] += g
    clamped = 0
    for n, p in net.named_parameters():
        expect = want[n].clamp(-clamp, clamp)
        torch.testing.assert_close(before[n] - p.detach(), expect, rtol=1e-9, atol=1e-12, msg=n)
        clamped += int((expect.abs() == clamp).sum())
    assert clamped > 0
    assert all(q.bits == FP for q in quantizers(net))  # the bit widths are put back


def test_inner_loop_leaves_batch_norm_beta_and_evaluation_covers_each_width():
    episodes, net = _episodes(torch.float32), _net(torch.float32)
    meta = learner(net)
    adapted = meta.adapt(*episodes.sample(random.Random(0))[:2])
    for name in bn_betas(net):
        assert adapted[name] is net.get_parameter(name)
    assert adapted["0.weight"] is not net.get_parameter("0.weight")
    got = evaluate_bitwidths(meta, episodes, (2, 4, FP), n=3, steps=1)
    assert set(got) == {2, 4, FP} and all(0 <= r["accuracy"] <= 1 for r in got.values())
    assert all(q.bits == FP for q in quantizers(net))


def test_one_line_errors():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(et.ConfigError, match="has no MEBQAT quantizers"):
        learner(plain)
    with pytest.raises(et.ConfigError, match="leaves no parameter to adapt"):
        MetaLearner(plain, "fomaml", inner_exclude=("*",)).adapt(torch.rand(2, 4), torch.tensor([0, 1]))
