"""LiteResidual: gradients against TinyTL's form written as plain modules (float64), the branch starting at zero
(the model computes exactly what it did), the branch shapes on MobileNetV2, what it saves, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.models import create_model
from edgetrain.techniques import LiteResidual
from edgetrain.techniques.lite_residual import BRANCHES
from edgetrain.testing import frozen_reference, lite_residual_reference, tiny_batch, tiny_model

D = torch.float64


@pytest.mark.parametrize("cfg", [LiteResidual(), LiteResidual(bias=False, classifier=False, kernel_size=3,
                                                              downsample=1)], ids=str)
def test_gradients_equal_the_authors_form_as_plain_modules_in_float64(cfg):
    """Reference: the original model whose blocks add interpolate(lite(x)) with independent copies of the branches
    (edgetrain.testing.lite_residual_reference)."""
    torch.manual_seed(0)
    base = tiny_model(dtype=D).train()
    x, y = tiny_batch(6, dtype=D)
    model = copy.deepcopy(base)
    with et.apply_(model, cfg, x):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the last BN's weight starts at zero: give the branches a non-trivial output
            for n, p in model.named_parameters():
                if "lite_residual_" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.5)
        torch.manual_seed(5)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref = frozen_reference(base, model)
        lite_residual_reference(ref, model)
    torch.manual_seed(5)
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    wrt = {n: p for n, p in ref.named_parameters() if n in got or "lite_residual_" in n}
    grads = dict(zip(wrt, torch.autograd.grad(ref_loss, list(wrt.values()))))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert set(got) == set(wrt)
    for n in got:
        torch.testing.assert_close(got[n], grads[n], rtol=1e-10, atol=1e-12, msg=n)
    biases = [n for n in got if n.endswith(".bias") and "lite_residual" not in n and not n.startswith("classifier")]
    assert bool(biases) == cfg.bias


def test_the_branch_starts_at_zero_and_the_model_computes_exactly_what_it_did():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    with et.apply_(model, LiteResidual(), x):
        with torch.no_grad():
            assert torch.equal(model(x), before)
        blocks = [n for n, m in model.named_modules() if m in BRANCHES]
        kernels = [BRANCHES[model.get_submodule(n)][0].conv1.kernel_size[0] for n in blocks]
    assert len(blocks) >= 10 and kernels[0] == 5 and min(kernels) < 5  # smaller kernels at low resolution
    with torch.no_grad():
        assert torch.equal(model(x), before) and not any("lite_residual" in k for k in model.state_dict())


def test_mobilenet_v2_saves_less_than_full_fine_tuning_and_the_branches_survive_a_dtype_change():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    plain = et.measure(model, batch, repeats=0)
    lite = et.measure(model, batch, recipe=LiteResidual(), repeats=0)
    bias = et.measure(model, batch, recipe=et.BiasOnly(), repeats=0)
    assert bias.saved_bytes < lite.saved_bytes < plain.saved_bytes
    assert lite.grad_bytes < plain.grad_bytes  # "reduce memory, not parameters": the branches are not tiny
    with et.apply_(model, LiteResidual(), batch[0]):
        model.double()  # the branches read the block's (replaced) tensors
        out = model(batch[0].double())
        nn.functional.cross_entropy(out, batch[1]).backward()
        grads = [p.grad for n, p in model.named_parameters() if "lite_residual_" in n]
        assert grads and all(g is not None and g.dtype == D for g in grads)


def test_refusals_are_one_line():
    pytest.importorskip("transformers")
    from edgetrain.testing.zoo import _bert

    model = _bert()
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    with pytest.raises(et.ConfigError, match="no block") as e:
        et.apply_(model, LiteResidual(), ids)
    assert "\n" not in str(e.value) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(et.ConfigError, match="maps a 3-d input") as e:
        et.apply_(model, LiteResidual(targets=["bert.encoder.layer.0"]), ids)
    assert "\n" not in str(e.value)
    for bad in ({"kernel_size": 4}, {"downsample": 0}, {"expand": 0}, {"groups": 0}, {"bias": "yes"}):
        with pytest.raises(et.ConfigError):
            LiteResidual(**bad)


def test_a_deepcopy_of_an_applied_model_fails_loudly_instead_of_dropping_the_branches():
    x, _ = tiny_batch(4)
    model = tiny_model()
    with et.apply_(model, LiteResidual(), x):
        clone = copy.deepcopy(model)
        with pytest.raises(RuntimeError, match="apply the technique to the copy"):
            clone(x)
