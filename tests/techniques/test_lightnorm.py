"""LightNorm's BatchNorm against slow references, gradcheck, the meter, and on models edgetrain did not write."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.errors import ConfigError
from edgetrain.lowp.formats import FORMATS
from edgetrain.lowp.norm import LightNormFunction, Numerics, expected_range, range_constant
from edgetrain.testing import model_state, tiny_batch, tiny_model

FP32 = FORMATS["fp32"]


def _reference_range_bn(x: torch.Tensor, weight, bias, k: int, scale: str, eps: float = 1e-5) -> torch.Tensor:
    """Per channel, in plain autograd: chunks of consecutive (N, *spatial) values, the last one shorter."""
    out = []
    for c in range(x.shape[1]):
        v = x[:, c].reshape(-1)
        n = v.numel()
        kk = max(1, min(k, n // 2))
        size = -(-n // kk)
        while n > 1 and n % size == 1:  # no one-value last chunk (tested on its own below)
            size += 1
        parts = list(torch.split(v, size))
        hi = torch.stack([p.max() for p in parts]).mean()
        lo = torch.stack([p.min() for p in parts]).mean()
        sigma = (hi - lo) * range_constant(n / len(parts), scale)
        out.append(((x[:, c] - v.mean()) / (sigma + eps)) * weight[c] + bias[c])
    return torch.stack(out, 1)


def _apply(x, w, b, num, eps=1e-5):
    return LightNormFunction.apply(x, w, b, num, eps)[0]


@pytest.mark.parametrize("shape,k", [((4, 3, 5, 5), 8), ((6, 2, 7), 3), ((9, 4), 4), ((3, 2, 3, 3), 16)])
@pytest.mark.parametrize("scale", ["banner", "d2"])
def test_range_bn_equals_the_per_channel_reference_forward_and_backward(shape, k, scale):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    num = Numerics(FP32, FP32, num_chunks=k, scale=scale)
    y, ref = _apply(x, w, b, num), _reference_range_bn(x, w, b, k, scale)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(ref, (x, w, b), gy)
    for a, r in zip(got, want):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("range_bn", [True, False])
def test_gradcheck_float64(range_bn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    num = Numerics(FP32, FP32, range_bn=range_bn, num_chunks=3)
    assert torch.autograd.gradcheck(lambda x, w, b: _apply(x, w, b, num), (x, w, b))


def test_standard_path_in_fp32_is_stock_batch_norm():
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(6, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64, requires_grad=True)
    num = Numerics(FP32, FP32, range_bn=False)
    y, ref = _apply(x, w, b, num), F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


def test_one_chunk_scale_is_the_range_over_sqrt_2_ln_n():
    """Spec §7.4 test 1: K = 1, infinite precision: sigma * sqrt(2 ln n) / range == 1."""
    x = torch.randn(50, 3, 2, 2, dtype=torch.float64)
    num = Numerics(FP32, FP32, num_chunks=1)
    _, mu, var = LightNormFunction.apply(x, None, None, num, 0.0)
    v = x.transpose(0, 1).reshape(3, -1)
    ratio = var.sqrt() * math.sqrt(2 * math.log(200)) / (v.amax(1) - v.amin(1))
    assert torch.allclose(ratio, torch.ones(3, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(mu, v.mean(1))


def test_scale_mismatch_of_banner_and_d2_on_gaussian_data():
    """Spec §7.3 pitfall 1: Banner's constant gives sigma ~1.6-1.85 std (chunk 49: 1.61; 512: 1.74); d2 ~1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 8, 8, generator=g)  # 4096 values per channel, 8 chunks of 512
    for scale, lo, hi in [("banner", 1.68, 1.80), ("d2", 0.97, 1.03)]:
        _, _, var = LightNormFunction.apply(x, None, None, Numerics(FP32, FP32, scale=scale), 1e-5)
        assert lo < float(var.sqrt().mean()) < hi, scale
    assert abs(expected_range(2) - 2 / math.sqrt(math.pi)) < 1e-9


def test_low_bit_saved_input_is_what_backward_reads():
    """fp10 + BFP: backward rebuilds the input from its codes; the result equals recomputing from the
    quantised input (the saved tensors are int8 codes, uint8 block data and int32 positions, no fp32 input)."""
    x = torch.randn(8, 32, 16, 16, requires_grad=True)  # 2048 values per channel: chunks of 256
    w, b = torch.rand(32).add(0.5).requires_grad_(), torch.randn(32).requires_grad_()
    cfg = et.LightNorm()
    num = cfg.numerics()
    seen: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = _apply(x, w, b, num)
    kinds = sorted({str(t.dtype) for t in seen if t.numel() >= x.numel()})
    assert kinds == ["torch.int8"], kinds
    assert sum(t.numel() * t.element_size() for t in seen) < x.numel() * 1.2
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_running_statistics_hold_sigma_squared_and_eval_is_stock():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=1.0))
    x = torch.randn(16, 1, 8, 8)
    h = et.apply_(model, et.LightNorm(fwd_format="fp32", bwd_format="fp32", bfp_bits=None), x)
    model.train()
    model(x)
    z = model[0](x).detach()
    _, mu, var = LightNormFunction.apply(z, None, None, Numerics(FP32, FP32), 1e-5)
    assert torch.allclose(model[1].running_mean, mu) and torch.allclose(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    out = model(x)
    assert torch.equal(out, F.batch_norm(z, model[1].running_mean, model[1].running_var, model[1].weight,
                                         model[1].bias, False, 0.0, 1e-5))
    h.remove()


def test_meter_sees_the_smaller_saved_input_and_the_estimate_agrees():
    model = tiny_model()
    x, y = tiny_batch(16)
    plain = et.measure(model, (x, y), repeats=1)
    ln = et.measure(model, (x, y), recipe=et.LightNorm(bfp_block=8), repeats=1)
    bn = [n for n in plain.saved_by_module if n.endswith(".1")]  # the BatchNorms of the three blocks
    # 1 byte per element + 3 bytes per block of 8 channels + the chunk positions, against 4 bytes per element
    assert bn and all(ln.saved_by_module[n] * 2.5 < plain.saved_by_module[n] for n in bn), (bn, ln.saved_by_module)
    assert ln.saved_bytes < plain.saved_bytes
    est = et.estimate(model, et.LightNorm(bfp_block=8), (1, 8, 8), 16)
    assert est.saved_bytes == ln.saved_bytes


def test_apply_remove_restores_and_frozen_batch_norms_are_left_alone():
    model = tiny_model()
    x, y = tiny_batch(8)
    before = model_state(model)
    h = et.apply_(model, et.LightNorm(), x)
    assert h.parts
    h.remove()
    after = model_state(model)
    assert after["requires_grad"] == before["requires_grad"] and after["patched"] == before["patched"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    # frozen BatchNorms (Freeze's no-save affine op) keep their running statistics; trained ones update them
    h = et.apply_(model, [et.Freeze(last_k_blocks=1), et.LightNorm()], x)
    frozen, trained = model.features[0][1].running_mean.clone(), model.features[2][1].running_mean.clone()
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert torch.equal(model.features[0][1].running_mean, frozen)
    assert not torch.equal(model.features[2][1].running_mean, trained)
    h.remove()


def test_bad_configs_and_models_are_one_line():
    for kwargs, msg in [(dict(fwd_format="fp11"), "unknown floating-point format 'fp11'"),
                        (dict(bfp_bits=9), "bfp_bits"), (dict(bfp_block=1), "bfp_block"), (dict(scale="x"), "scale"),
                        (dict(num_chunks=0), "num_chunks")]:
        with pytest.raises(ConfigError, match=msg):
            et.LightNorm(**kwargs)
    ln_model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        et.apply_(ln_model, et.LightNorm(), torch.randn(2, 4))
    frozen = tiny_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.classifier.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="frozen"):
        et.apply_(frozen, et.LightNorm(), tiny_batch(2)[0])


@pytest.mark.parametrize("name", ["resnet", "functional", "mobilenetv3"])
def test_fp32_lightnorm_without_range_bn_is_plain_batch_norm_on_foreign_models(name):
    """The plumbing on models edgetrain did not write: with fp32 formats, no BFP and the variance, every BN call
    runs LightNorm's Function and the step's gradients are plain PyTorch's."""
    from edgetrain.structure import analyze
    from edgetrain.testing.zoo import ZOO, available, evaluate

    if name not in available():
        pytest.skip(f"{name} needs the test extras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = ZOO[name].build()
    analyze(model, ZOO[name].batch(2)[0])
    row = evaluate(ZOO[name], et.LightNorm(range_bn=False, fwd_format="fp32", bwd_format="fp32", bfp_bits=None),
                   model=model)
    assert row["outcome"] == "works" and row["restored"], row
    assert row["grad_cosine"] > 1 - 1e-6 and row["grad_error"] < 1e-4, row


@pytest.mark.parametrize("bfp_bits", [5, None])
@pytest.mark.parametrize("act", [F.relu, F.silu])
def test_in_place_activation_after_lightnorm_gives_the_gradients_of_an_out_of_place_one(bfp_bits, act):
    """timm's blocks run ``act(bn(x), inplace=True)``: LightNorm's output must take an in-place op (its BFP output
    was a view, which autograd refuses to modify in place) and backprop through it as through the copy."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 3, 3)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    num = et.LightNorm(bfp_bits=bfp_bits).numerics()
    grads = []
    for inplace in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = act(_apply(xi, wi, bi, num), inplace=inplace)
        y.square().sum().backward()
        grads.append([t.grad for t in (xi, wi, bi)])
    for g_in, g_out in zip(*grads):
        torch.testing.assert_close(g_in, g_out, rtol=0, atol=0)


def test_chunks_never_hold_a_single_value_and_never_exceed_k():
    from edgetrain.lowp.norm import chunks

    for n in range(2, 400):
        for k in range(1, 17):
            got, size = chunks(n, k)
            sizes = [min(size, n - i * size) for i in range(got)]
            assert got <= k and sum(sizes) == n and min(sizes) >= 2, (n, k, sizes)


def _lightnorm_nodes(t: torch.Tensor) -> list:
    seen, stack, found = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LightNormFunctionBackward":
            found.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return found


def test_what_bn_stores_lives_only_in_saved_tensors():
    """ctx attributes hold the layout, not the payload: after backward nothing of the stored input is left."""
    import dataclasses

    model = tiny_model(0)
    x, y = tiny_batch()
    et.apply_(model, et.LightNorm(), x)
    out = model.train()(x)
    nodes = _lightnorm_nodes(out)
    assert nodes
    for node in nodes:
        layout = node.how[0]
        assert not any(isinstance(v, torch.Tensor) for v in dataclasses.asdict(layout).values())


def test_half_precision_models_run_lightnorm_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8)).to(torch.bfloat16)
    x = torch.randn(4, 3, 8, 8).bfloat16()
    with torch.no_grad():
        stock = model.train()(x)
    h = et.apply_(model, et.LightNorm(), x)
    out = model.train()(x)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
    assert not torch.equal(out, stock) and h.parts[0][1].hits > 0
    out.float().square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_batch_norm_without_running_statistics_is_stock_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8, track_running_stats=False))
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        stock = model.eval()(x)
    et.apply_(model, et.LightNorm(), x)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), stock)
        assert not torch.equal(model.train()(x), stock)  # in training it is LightNorm's


def test_a_module_calling_batch_norm_with_its_own_parameter_names():
    class FB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.zeros(4))
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):  # noqa: ANN001, ANN202
            return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, self.training, 0.1, 1e-5)

    torch.manual_seed(0)
    model, x = FB(), torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        stock = FB()
        stock.load_state_dict(model.state_dict())
        ref = stock.train()(x)
    h = et.apply_(model, et.LightNorm(), x)
    out = model.train()(x)
    assert h.parts[0][1].hits > 0 and not torch.equal(out, ref)
