"""Execution options against the ordinary step: the fused optimizer step is the same arithmetic (bit for bit), micro-
batches with frozen BatchNorm statistics give the full batch's gradients (up to float64 summation order), and the
meter shows what each takes off the peak."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain.execution import FusedStep, run_step
from edgetrain.models import create_model
from edgetrain.testing import tiny_batch, tiny_model


def _loss(out, y):
    return F.cross_entropy(out, y)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
], ids=["sgd_momentum", "adamw"])
def test_fused_step_equals_the_ordinary_step_bitwise(make):
    a, b = tiny_model(), tiny_model()
    a.eval(), b.eval()  # no dropout: the two runs see the same masks trivially
    opt_a, opt_b = make(list(a.parameters())), FusedStep(make(list(b.parameters())))
    for step in range(3):
        x, y = tiny_batch(8, seed=step)
        run_step(a, x, y, _loss, opt_a)
        run_step(b, x, y, _loss, opt_b)
        assert all(p.grad is None for p in b.parameters())  # freed in the backward
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_fused_step_over_micro_batches_updates_once_with_the_accumulated_gradient():
    a, b = tiny_model(), tiny_model()
    a.eval(), b.eval()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = FusedStep(torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9))
    x, y = tiny_batch(8)
    for _ in range(2):
        run_step(a, x, y, _loss, opt_a, micro=4)
        run_step(b, x, y, _loss, opt_b, micro=4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_micro_batches_give_the_full_batch_gradient_with_frozen_batchnorm():
    model = tiny_model(dtype=torch.float64).eval()  # eval: dropout off; bn="frozen" is what matters for BatchNorm
    x, y = tiny_batch(8, dtype=torch.float64)
    grads = []
    for micro in (1, 4):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # no update: compare the gradients
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        loss = run_step(m, x, y, _loss, opt, micro=micro, bn="frozen")
        grads.append(({n: p.grad.clone() for n, p in m.named_parameters()}, loss))
    (g1, l1), (g4, l4) = grads
    torch.testing.assert_close(l4, l1, rtol=1e-12, atol=1e-14)
    for n in g1:  # equal up to the summation order of float64 (stated: 1e-12 relative)
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-12, atol=1e-14, msg=n)


def test_micro_batches_with_per_micro_batch_statistics_differ_as_stated():
    model = tiny_model().eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    x, y = tiny_batch(8)
    g = []
    for micro in (1, 2):
        m = copy.deepcopy(model).train()
        run_step(m, x, y, _loss, torch.optim.SGD(m.parameters(), lr=0.0), micro=micro, bn="micro")
        g.append(m.features[0][0].weight.grad.clone())
    assert not torch.allclose(g[0], g[1], rtol=1e-4)  # each half normalised by its own statistics


def _measure_fused(model, batch):  # noqa: ANN001, ANN202
    fused = FusedStep(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    try:
        return et.measure(model, batch, optimizer=fused, repeats=1)
    finally:
        fused.remove()


def test_the_meter_sees_what_each_option_takes_off_the_peak():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    plain = et.measure(model, batch, repeats=1)
    fused = _measure_fused(model, batch)
    micro = et.measure(model, batch, micro=4, repeats=1)
    # gradients alive at the peak: every gradient storage the step makes, freed by the fused step once applied. Here
    # the peak is early in the backward, where few gradients exist either way (measured 573,440 vs 634,920 B); at T1
    # 1.56 vs 2.95 MiB (docs/memory.md)
    assert fused.peak_split["gradients"] < plain.peak_split["gradients"]
    # the split does not depend on where the allocator puts blocks: a freed gradient's block reused by a transient
    # is still a transient (it once moved ~80 KB between the two with the heap left by earlier tests)
    junk = [torch.empty(n) for n in (1000, 50_000, 7, 300_000, 20_000)]
    del junk[1::2]
    again = _measure_fused(model, batch)
    assert again.peak_split == fused.peak_split and again.peak_bytes == fused.peak_bytes
    assert fused.peak_bytes < plain.peak_bytes
    assert micro.saved_bytes < plain.saved_bytes / 3 and micro.peak_bytes < plain.peak_bytes
    assert fused.grad_bytes == 0  # freed as soon as used


def test_fused_step_refuses_optimizers_it_cannot_split():
    with pytest.raises(et.ConfigError, match="FusedStep: RMSprop is not supported"):
        FusedStep(torch.optim.RMSprop(tiny_model().parameters()))


def test_a_second_fused_step_on_the_same_parameters_is_refused_until_the_first_is_removed():
    """Both hooks would step the parameter (the first with its own optimizer and state): silently wrong training."""
    model = tiny_model()
    first = FusedStep(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(et.ConfigError, match="already updated by another FusedStep"):
        FusedStep(torch.optim.SGD(model.parameters(), lr=0.1))
    first.remove()
    FusedStep(torch.optim.SGD(model.parameters(), lr=0.1)).remove()
    with pytest.raises(et.ConfigError, match="micro-batches: need an int in 1..4"):
        run_step(tiny_model(), *tiny_batch(4), _loss, torch.optim.SGD(tiny_model().parameters(), lr=0.1), micro=8)
