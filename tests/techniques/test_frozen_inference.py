"""FrozenInference and Int8Frozen: the frozen part of a network run as inference. What each changes in the output and
the gradients (against plain PyTorch), what the meter shows, and what each refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.measure import measure
from edgetrain.techniques import Freeze, FrozenInference, Int8Frozen


def _block(cin: int, cout: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=True), nn.BatchNorm2d(cout), act)


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Three conv-BN-activation blocks (stock modules), a pooled linear head; non-trivial BN statistics."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(_block(3, 8, nn.ReLU()), _block(8, 8, nn.Hardswish()), _block(8, 8, nn.ReLU6()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.to(dtype)


class FunctionalNet(nn.Module):
    """The same blocks called through ``F.conv2d``/``F.batch_norm``/``F.relu`` in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), bn.running_mean,
                                    bn.running_var, bn.weight, bn.bias, bn.training, 0.1, bn.eps))
        return self.head(x.mean((2, 3)))


def _step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("make", [_net, FunctionalNet], ids=["modules", "functional"])
def test_frozen_inference_matches_the_frozen_model_in_float64(make):
    torch.manual_seed(1)
    base = make() if make is FunctionalNet else make(torch.float64)
    base = base.to(torch.float64)
    x, y = torch.randn(4, 3, 10, 10, dtype=torch.float64), torch.randint(0, 5, (4,))
    ref = copy.deepcopy(base)
    et.apply_(ref, Freeze(), x)
    applied = copy.deepcopy(base)
    handle = et.apply_(applied, [Freeze(), FrozenInference()], x)
    out_ref, g_ref = _step_grads(ref, x, y)
    out, g = _step_grads(applied, x, y)
    # the fold reorders the arithmetic: float64 rounding only (measured ~1e-16 relative)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-12, atol=1e-12, msg=n)
    handle.remove()


class _Spy(torch.overrides.TorchFunctionMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_frozen_inference_really_runs_folded_and_in_place():
    """The folded path is taken: no BatchNorm op runs and each activation writes into its conv's own output."""
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    et.apply_(model, [Freeze(), FrozenInference()], x)
    seen = []
    hooks = [blk[2].register_forward_hook(lambda m, i, o: seen.append(i[0].data_ptr() == o.data_ptr()))
             for blk in model[:3]]
    calls = []
    with _Spy(calls):
        model.train()(x)
    for h in hooks:
        h.remove()
    assert "batch_norm" not in calls  # every BatchNorm folded (this model's are all frozen)
    assert seen == [True, True, True]  # relu, hardswish, relu6: in place


def test_frozen_inference_lowers_the_forward_peak_where_the_conv_kernel_does_not_set_it():
    """Without oneDNN, an eval-mode BatchNorm and the activation each make a new activation-sized buffer; folded
    and in place they make none. (With oneDNN the conv's own reorder buffers set the peak on this host and the two
    peaks are equal: asserted too, so the technique never costs memory.)"""
    model = _net()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    for mkldnn in (False, True):
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            plain = measure(model, (x, y), recipe=et.Recipe([Freeze()], name="f"), warmup=1, repeats=0)
            fused = measure(model, (x, y), recipe=et.Recipe([Freeze(), FrozenInference()], name="fi"), warmup=1,
                            repeats=0)
        act = 16 * 8 * 32 * 32 * 4  # one activation of the blocks
        if not mkldnn:
            # one activation-sized buffer fewer (measured: 524,264 B of 524,288)
            assert fused.phase_peaks["forward"] <= plain.phase_peaks["forward"] - 0.95 * act, (plain.phase_peaks,
                                                                                               fused.phase_peaks)
        else:
            assert fused.peak_bytes <= plain.peak_bytes + 1024
        assert fused.saved_bytes == plain.saved_bytes


def test_frozen_inference_finds_nothing_on_a_model_that_trains_everything():
    with pytest.raises(et.ConfigError, match="FrozenInference: found nothing"):
        et.apply_(_net(), FrozenInference(), torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------------ Int8Frozen
def test_int8_frozen_weights_are_int8_and_the_output_within_the_stated_bound():
    model = _net()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    ref = copy.deepcopy(model)
    et.apply_(ref, Freeze(), x)
    handle = et.apply_(model, [Freeze(), Int8Frozen()], x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.dtype == torch.int8 for c in convs) and model[-1].weight.dtype == torch.float32
    for c, r in zip(convs, [m for m in ref.modules() if isinstance(m, nn.Conv2d)]):
        err = (c.weight.float() * c.weight_scale.view(-1, 1, 1, 1) - r.weight).abs().flatten(1).amax(1)
        assert bool((err <= r.weight.abs().flatten(1).amax(1) / 254 + 1e-7).all())  # rounding <= s/2
    out_ref, g_ref = _step_grads(ref, x, y)
    out, g = _step_grads(model, x, y)
    rel = float((out - out_ref).norm() / out_ref.norm())
    assert 0 < rel <= 0.25  # the stated forward bound (Int8Frozen's forward_bound); it does change the output
    assert g.keys() == g_ref.keys() == {"5.weight", "5.bias"}
    m = measure(model, (x, y), warmup=1, repeats=0)
    assert m.frozen_by_dtype.get("int8") == sum(c.weight.numel() for c in convs)
    handle.remove()
    assert all(c.weight.dtype == torch.float32 and not hasattr(c, "weight_scale") for c in convs)


def test_int8_frozen_passes_the_input_gradient_through_a_frozen_layer():
    """A frozen layer between trained ones: the input gradient uses the dequantised weight (close to fp32's)."""
    model = _net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for p in model[1].parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(model)
    et.apply_(model, Int8Frozen(), x)
    assert model[1][0].weight.dtype == torch.int8 and model[0][0].weight.dtype == torch.float32
    _, g_ref = _step_grads(ref, x, y)
    _, g = _step_grads(model, x, y)
    assert g.keys() == g_ref.keys() and "0.0.weight" in g
    cos = F.cosine_similarity(g["0.0.weight"].flatten(), g_ref["0.0.weight"].flatten(), dim=0)
    assert cos > 0.99


def test_int8_frozen_finds_nothing_when_nothing_is_frozen():
    with pytest.raises(et.ConfigError, match="Int8Frozen: found nothing"):
        et.apply_(_net(), Int8Frozen(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("order", ["fold-then-int8", "int8-then-fold"])
def test_frozen_inference_and_int8_frozen_compose_in_either_order(order):
    """Both act on the same frozen convs: the folds still run (no BatchNorm op) on the dequantised int8 weights, and
    the output equals Freeze + Int8Frozen's (the same int8 weights, unfolded) up to float32 rounding."""
    torch.manual_seed(2)
    x, base = torch.randn(2, 3, 8, 8), _net()
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    et.apply_(ref, [Freeze(), Int8Frozen()], x)
    techniques = [FrozenInference(), Int8Frozen()] if order == "fold-then-int8" else [Int8Frozen(), FrozenInference()]
    et.apply_(model, [Freeze(), *techniques], x)
    assert all(blk[0].weight.dtype == torch.int8 for blk in model[:3])
    calls = []
    with _Spy(calls):
        out = model.train()(x)
    assert "batch_norm" not in calls
    torch.testing.assert_close(out, ref.train()(x), rtol=1e-5, atol=1e-5)
