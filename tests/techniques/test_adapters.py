"""Every weight adapter (LoRA, KronA): gradients against plain PyTorch in float64 (the original model called with the
weight ``W + s * delta(theta)`` as a function of the adapter's parameters, via functional_call), merge() equal to the
adapted model, and a merge that refuses changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import edgetrain as et
from edgetrain.techniques import KronA, KronABlock, LoRA
from edgetrain.techniques._adapter import ADAPTERS, merge
from edgetrain.testing import frozen_reference, tiny_batch, tiny_model

CONFIGS = [LoRA(rank=2), LoRA(rank=3, alpha=1.5, classifier=False, dropout=0.2), KronA(),
           KronA(factors=(2, 1), scale=0.5, classifier=False, dropout=0.2)]


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if m in ADAPTERS}


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter a random value (one factor starts at zero: the update would be trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters(model).values():
            for k in ADAPTERS[m].params:
                p = getattr(m, k)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def reference_delta(layer: nn.Module, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """The update in the weight's shape from first principles: B @ A (composed kernels), or torch.kron(A, B)."""
    if "lora_A" in values:
        return (values["lora_B"].flatten(1) @ values["lora_A"].flatten(1)).view_as(layer.weight)
    a, b = values["krona_A"], values["krona_B"]
    return torch.kron(a.view(*a.shape, *(1,) * (b.dim() - 2)), b)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c.dropout], ids=str)
def test_gradients_equal_plain_pytorch_with_the_updated_weight_in_float64(cfg):
    torch.manual_seed(0)
    base = tiny_model(dtype=torch.float64).train()
    x, y = tiny_batch(6, dtype=torch.float64)
    model = copy.deepcopy(base)
    with et.apply_(model, cfg, x):
        randomise(model)
        found = adapters(model)
        assert found
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks in both (the adapters' dropout comes after the model's)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        leaves = {f"{n}.{k}": getattr(m, k).detach().clone().requires_grad_(True) for n, m in found.items()
                  for k in ADAPTERS[m].params}
        scales = {n: ADAPTERS[m].scale for n, m in found.items()}
        ref_model = frozen_reference(base, model)  # frozen BatchNorms on running statistics, as the adapters run them
    params = {n: p.detach().clone().requires_grad_(n in got) for n, p in ref_model.named_parameters()}
    for n in found:
        mine = {k.rpartition(".")[2]: v for k, v in leaves.items() if k.rpartition(".")[0] == n}
        layer = base.get_submodule(n)
        params[f"{n}.weight"] = layer.weight.detach() + scales[n] * reference_delta(layer, mine)
    torch.manual_seed(5)
    ref_loss = nn.functional.cross_entropy(functional_call(ref_model, {**params, **dict(ref_model.named_buffers())},
                                                           (x,)), y)
    wrt = {**leaves, **{n: params[n] for n in got if n in params}}
    grads = dict(zip(wrt, torch.autograd.grad(ref_loss, list(wrt.values()))))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert set(got) == set(wrt)  # the adapters (and the classifier when asked), nothing else
    for n in got:
        torch.testing.assert_close(got[n], grads[n], rtol=1e-10, atol=1e-12, msg=n)
    assert cfg.classifier == any(n.startswith("classifier.") for n in got)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_in_eval_mode_the_adapted_model_is_the_original_with_the_updated_weight(cfg):
    torch.manual_seed(0)
    base = tiny_model(dtype=torch.float64).eval()
    x, _ = tiny_batch(6, dtype=torch.float64)
    model = copy.deepcopy(base)
    with et.apply_(model, cfg, x):
        randomise(model)
        with torch.no_grad():
            got = model(x)
            ref = copy.deepcopy(base)
            for n, m in adapters(model).items():
                values = {k: getattr(m, k) for k in ADAPTERS[m].params}
                ref.get_submodule(n).weight.add_(ADAPTERS[m].scale * reference_delta(m, values))
            torch.testing.assert_close(got, ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_merge_equals_the_adapted_model_and_leaves_no_adapter(cfg, dtype, tol):
    torch.manual_seed(0)
    model = tiny_model(dtype=dtype).eval()
    x, _ = tiny_batch(4, dtype=dtype)
    applied = et.apply_(model, cfg, x)
    randomise(model)
    with torch.no_grad():
        adapted = model(x)
    n = len(adapters(model))
    assert merge(model) == n > 0
    applied.remove()
    assert not adapters(model) and not any(k.startswith(("lora", "krona")) or ".lora" in k or ".krona" in k
                                           for k in model.state_dict())
    with torch.no_grad():
        merged = model(x)
    assert (merged - adapted).abs().max() <= tol * adapted.abs().max()


def test_merge_refuses_a_block_adapter_and_changes_nothing():
    from edgetrain.testing.patch_net import patch_net

    model = patch_net(torch.float32).eval()
    x, _ = tiny_batch(4)
    with et.apply_(model, KronABlock(), x):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(et.ConfigError, match="cannot|no weight can absorb") as e:
            merge(model)
        assert "\n" not in str(e.value)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cfg", [LoRA(rank=2, dropout=0.5, classifier=False, targets=["0"]),
                                 KronA(factors=(2, 3), dropout=0.5, classifier=False, targets=["0"])], ids=str)
def test_dropout_drops_the_branch_input_only(cfg):
    """Training mode: W x + b + s * branch(dropout(x)), the same mask drawn from the same seed; the frozen path
    sees the whole input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).double().train()
    x = torch.randn(5, 6, dtype=torch.float64)
    with et.apply_(model, cfg, x):
        randomise(model)
        layer = model[0]
        torch.manual_seed(7)
        got = model(x)
        torch.manual_seed(7)
        dropped = nn.functional.dropout(x, cfg.dropout, True)
        values = {k: getattr(layer, k).detach() for k in ADAPTERS[layer].params}
        ref = nn.functional.linear(x, layer.weight, layer.bias) + ADAPTERS[layer].scale * (
            dropped @ reference_delta(layer, values).T)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [LoRA, KronA])
def test_a_model_with_nothing_to_adapt_is_refused(cls):
    """The only linear is the classifier (trained whole or left alone, never adapted by default): one line."""
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(et.ConfigError, match="no layer .* to adapt") as e:
        et.apply_(model, cls(classifier=False), torch.randn(2, 6))
    assert "\n" not in str(e.value) and all(p.requires_grad for p in model.parameters())
