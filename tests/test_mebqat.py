"""MEBQAT: the quantizers against the papers' formulas, bit switching, subtask sampling, the outer loop's gradient
against a manual computation, the integer export's agreement, and one-line errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.lowp.fakequant import FP, FakeQuant, dorefa_act, dorefa_weight, lsq, quantizers, set_bits
from edgetrain.lowp.intexport import export_integer, load_integer
from edgetrain.mebqat import (MEBQATTraining, allowed, batch_statistics, evaluate_bitwidths, recalibrate_bn,
                              sample_subtasks)
from edgetrain.techniques.mebqat import quantized_layers
from edgetrain.testing import TinyConvNet, tiny_batch, tiny_model


def _model(cfg: et.MEBQAT, seed: int = 0) -> nn.Module:
    m = tiny_model(seed)
    m.features[2][3].p = 0.0  # no dropout: every forward of a batch is the same function
    et.apply_(m, cfg, tiny_batch()[0], check=False)
    return m


# ------------------------------------------------------------------------------------------------ LSQ
def _lsq_reference(x: list[float], s: float, n: int, p: int, gout: list[float]) -> tuple[list, list, float]:
    """Esser et al. 2020, Eq. for v_hat, its STE and dv_hat/ds, in Python floats, element by element."""
    g = 1 / math.sqrt(len(x) * p)
    out, gx, gs = [], [], 0.0
    for v, go in zip(x, gout):
        r = v / s
        out.append(min(max(round(r), n), p) * s)
        if r <= n:
            gx.append(0.0)
            gs += go * n
        elif r >= p:
            gx.append(0.0)
            gs += go * p
        else:
            gx.append(go)
            gs += go * (round(r) - r)
    return out, gx, gs * g


@pytest.mark.parametrize("bits,kind", [(2, "weight"), (4, "weight"), (3, "act"), (8, "act")])
def test_lsq_forward_and_gradients_match_the_paper(bits, kind):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(200, generator=g, dtype=torch.float64) * 1.5)
    if kind == "act":
        x = x.abs()
    n, p = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if kind == "weight" else (0, 2**bits - 1)
    s0 = 2.5 / p  # values beyond 2.5 (and below -2.5 for weights) are clipped
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    gout = torch.randn(200, generator=g, dtype=torch.float64)
    y = lsq(xr, s, n, p)
    (y * gout).sum().backward()
    ref_y, ref_gx, ref_gs = _lsq_reference(x.tolist(), s0, n, p, gout.tolist())
    assert torch.allclose(y, torch.tensor(ref_y, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(xr.grad, torch.tensor(ref_gx, dtype=torch.float64), atol=1e-12)
    assert s.grad.item() == pytest.approx(ref_gs, rel=1e-10, abs=1e-12)
    assert (xr.grad == 0).any() and (xr.grad != 0).any()  # both regions were exercised


def test_lsq_quantizer_init_grid_and_upstream_quirk():
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64) * 3  # non-negative: the unsigned grid
    q = FakeQuant("lsq", "act", (2, 4), bits=4).double()
    y = q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15))  # 2<|x|>/sqrt(p), p = 2^4 - 1
    assert not bool(q.signed)
    codes = torch.round(y / q.step.detach())
    assert codes.min() >= 0 and codes.max() <= 15 and len(codes.unique()) <= 16
    up = FakeQuant("lsq", "act", (4,), bits=4, act_grid="upstream").double()
    assert up.grid(4) == (0, 16)  # MEBQAT's p = 2^b: 17 levels
    w = FakeQuant("lsq", "weight", (3,), bits=3).double()
    assert w.grid(3) == (-4, 3)
    signed = FakeQuant("lsq", "act", (4,), bits=4).double()
    signed(torch.randn(10, dtype=torch.float64))
    assert bool(signed.signed) and signed.grid(4) == (-8, 7)  # an input with negatives: the signed grid


def test_per_bitwidth_steps_are_separate_and_shared_is_one():
    shared = FakeQuant("lsq", "weight", (2, 4, 8))
    per = FakeQuant("lsq", "weight", (2, 4, 8), step_sizes="per_bitwidth")
    assert shared.step.shape == (1,) and per.step.shape == (3,)
    w = torch.randn(50, requires_grad=True)
    for b in (2, 8):
        per.set_bits(b)
        per(w).sum().backward()
    assert per.initialized.tolist() == [True, False, True]
    assert per.step[0].item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(1))
    assert per.step[2].item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(127))
    assert per.step.grad[1] == 0 and per.step.grad[0] != 0 and per.step.grad[2] != 0


# ------------------------------------------------------------------------------------------------ Yu21 / DoReFa
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dorefa_weight_levels(bits):
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    y = dorefa_weight(w, bits)
    e = w.abs().mean()
    k = 2**bits - 1
    levels = (y / e + 1) / 2 * k  # (2u - 1) E -> u K, integers 0..K
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    assert levels.min() >= -1e-9 and levels.max() <= k + 1e-9
    if bits == 1:
        assert torch.equal(y, torch.where(w >= 0, e, -e))
    else:
        t = torch.tanh(w) / torch.tanh(w).abs().max()
        assert torch.allclose(y, (2 * torch.round((t + 1) / 2 * k) / k - 1) * e)
        assert len(y.unique()) <= k + 1
        if bits <= 3:
            assert len(y.unique()) == k + 1


def test_dorefa_gradients_straight_through():
    w = torch.randn(30, dtype=torch.float64, requires_grad=True)
    dorefa_weight(w, 1).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # sign's STE: identity
    w.grad = None
    dorefa_weight(w, 3).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)  # the same chain by plain autograd: tanh / max|tanh|, STE round
    t = torch.tanh(w2) / torch.tanh(w2).abs().max()
    u = (t + 1) / 2 * 7
    ((2 * (u + (u.round() - u).detach()) / 7 - 1) * w2.detach().abs().mean()).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-12)
    x = torch.tensor([-0.5, 0.0, 0.2, 0.7, 1.0, 1.4], dtype=torch.float64, requires_grad=True)
    y = dorefa_act(x, 2)
    assert y.tolist() == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------------ switching
def test_set_bits_switches_every_quantizer_and_32_is_the_plain_model():
    x, _ = tiny_batch()
    plain = tiny_model().eval()
    m = _model(et.MEBQAT(weight_bits=4, act_bits=4)).eval()
    assert sorted(quantized_layers(m)) == ["features.1.0", "features.2.0"]  # not the first conv, nor the classifier
    outs = {}
    for b in (1, 2, 4, 8, FP):
        assert set_bits(m, b, b) == 4
        assert all(q.bits == b for q in quantizers(m))
        outs[b] = m(x).detach()
    assert torch.equal(outs[FP], plain(x))
    assert not torch.allclose(outs[2], outs[8])
    with pytest.raises(et.ConfigError, match="not a candidate") as e:
        set_bits(m, 4, 9)
    assert "\n" not in str(e.value)
    assert all(q.bits == FP for q in quantizers(m))  # nothing changed
    with pytest.raises(et.ConfigError, match="no fake quantizers"):
        set_bits(tiny_model(), 4, 4)


def test_lsq_steps_are_parameters_the_optimizer_sees_and_remove_drops_them():
    m = tiny_model()
    x, y = tiny_batch()
    handle = et.apply_(m, et.MEBQAT(method="lsq", weight_bits=4, act_bits=4), x)
    steps = [n for n, _ in m.named_parameters() if n.endswith(".step")]
    assert steps == ["features.1.0.mebqat_weight.step", "features.1.0.mebqat_input.step",
                     "features.2.0.mebqat_weight.step", "features.2.0.mebqat_input.step"]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n in steps}
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n in steps)
    handle.remove()
    assert not [n for n, _ in m.named_parameters() if "mebqat" in n] and not quantizers(m)


# ------------------------------------------------------------------------------------------------ subtasks
def test_constraints_and_subtask_sampling():
    assert allowed(FP, FP) and allowed(1, 1) and allowed(1, FP) and allowed(4, 2) and allowed(2, FP)
    assert not allowed(FP, 4) and not allowed(1, 4) and not allowed(4, 1) and not allowed(FP, 1)
    cands = (1, 2, 4, 8)
    pool = {(w, a) for w, a in itertools.product((*cands, FP), repeat=2) if allowed(w, a)}
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(400):
        tasks = sample_subtasks(cands, 4, g)
        assert tasks[:2] == [(FP, FP), (1, 1)]  # guaranteed: (FP, FP) and the lowest
        assert all(t in pool for t in tasks[2:])
        for t in tasks[2:]:
            seen[t] = seen.get(t, 0) + 1
    assert set(seen) == pool  # every allowed pair is drawn
    expect = 800 / len(pool)
    assert all(0.5 * expect < c < 1.6 * expect for c in seen.values()), seen  # uniform over the allowed pairs
    assert sample_subtasks((2, 4), 4, g)[:2] == [(FP, FP), (2, 2)]  # LSQ: the lowest candidate
    with pytest.raises(et.ConfigError, match="subtasks must be an int >= 2"):
        sample_subtasks(cands, 1, g)


# ------------------------------------------------------------------------------------------------ outer loop
def _manual_grads(m: nn.Module, x, y, tasks, clamp: float) -> dict[str, torch.Tensor]:
    """The outer loop by hand: per subtask, autograd.grad of its loss (teacher: the FP pass, detached); the mean
    over subtasks, then clamped element-wise."""
    params = dict(m.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    set_bits(m, FP, FP)
    teacher = F.softmax(m(x).detach(), 1)
    for w, a in tasks:
        set_bits(m, w, a)
        z = m(x)
        loss = F.cross_entropy(z, y)
        if (w, a) != (FP, FP):
            loss = loss - (teacher * F.log_softmax(z, 1)).sum(1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), gr in zip(params.items(), grads):
            if gr is not None:
                total[n] += gr
    set_bits(m, FP, FP)
    return {n: (t / len(tasks)).clamp(-clamp, clamp) for n, t in total.items()}


@pytest.mark.parametrize("method", ["dorefa", "lsq"])
def test_outer_step_gradient_is_the_clamped_mean_of_subtask_gradients(method):
    x, y = tiny_batch(8, dtype=torch.float64)

    def fresh() -> nn.Module:  # the same model again (a deepcopy would not carry the op handlers)
        m = _model(et.MEBQAT(method=method, weight_bits=FP, act_bits=FP)).double()
        set_bits(m, 2, 2)
        m(x)  # LSQ: initialise the 2-bit steps
        set_bits(m, FP, FP)
        return m.train()

    m, ref, m2 = fresh(), fresh(), fresh()
    clamp = 0.05  # small enough that some elements are clamped
    outer = MEBQATTraining(m, clamp=clamp)
    torch.manual_seed(3)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    outer.step(x, y, opt)
    tasks = outer.last_subtasks
    want = _manual_grads(ref, x, y, tasks, clamp)
    clamped = 0
    for n, p in m.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), want[n], rtol=1e-9, atol=1e-12, msg=n)
        clamped += int((want[n].abs() == clamp).sum())
    assert clamped > 0
    # the training-mode path (one backward over the S subtasks; et.train calls clip_gradients) gives the same
    mode = MEBQATTraining(m2, clamp=clamp).train()
    torch.manual_seed(3)
    mode.training_loss(mode(x), y).backward()
    mode.clip_gradients()
    assert mode.last_subtasks == tasks
    for n, p in m2.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-12, msg=n)


def test_training_mode_runs_in_edgetrain_train_and_restores_its_bits():
    from edgetrain.data import load_data

    data = load_data("digits", "train", channels=1, image_size=8)
    net = TinyConvNet(num_classes=data.num_classes)
    outer = MEBQATTraining(net)
    cfg = et.TrainConfig(steps=3, batch_size=16, optimizer="adamw", lr=1e-3)
    res = et.train(outer, data, data, cfg, recipe=et.MEBQAT(weight_bits=FP, act_bits=FP), progress=False)
    assert res.steps == 3 and math.isfinite(res.final_loss)
    assert len(outer.last_subtasks) == 4 and all(q.bits == FP for q in quantizers(net))
    acc = evaluate_bitwidths(outer, data, (1, 4, FP), bn="batch")
    assert set(acc) == {1, 4, FP} and all(0 <= v <= 1 for v in acc.values())


# ------------------------------------------------------------------------------------------------ BatchNorm
def test_recalibration_is_the_average_of_batch_statistics_and_batch_mode_restores_state():
    m = _model(et.MEBQAT(weight_bits=4, act_bits=4)).eval()
    bn = m.features[1][1]
    seen = []
    bn.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 1, 8, 8, generator=g) for _ in range(3)]
    assert recalibrate_bn(m, batches) == 3
    means = torch.stack([s.mean((0, 2, 3)) for s in seen])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert bn.momentum == 0.1 and not bn.training
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with batch_statistics(m):
        assert bn.training
        m(batches[0])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items()) and not bn.training


# ------------------------------------------------------------------------------------------------ integer export
@pytest.mark.parametrize("method,bits", [("dorefa", 1), ("dorefa", 3), ("dorefa", 8), ("lsq", 2), ("lsq", 4),
                                         ("lsq", 16)])
def test_integer_export_agrees_with_the_fake_quantized_model(tmp_path, method, bits):
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    m = _model(et.MEBQAT(method=method, weight_bits=FP, act_bits=FP, quantize_first_last=method == "lsq"))
    set_bits(m, bits, bits)
    m.train()
    m(x[:32])  # LSQ steps initialised on data; BatchNorm statistics move
    m.eval()
    with torch.no_grad():
        fake = m(x)
    info = export_integer(m, tmp_path / "m.safetensors", bits)
    assert all(q.bits == bits for q in quantizers(m))  # export leaves the model as it was
    if bits <= 4:
        assert info["bytes"] < info["fp32_bytes"]
    skeleton = TinyConvNet()
    load_integer(tmp_path / "m.safetensors", skeleton)
    layers = list(info["layers"])
    assert all(skeleton.get_submodule(n).weight.numel() == 0 for n in layers)  # no float weight is left
    with torch.no_grad():
        ints = skeleton.eval()(x)
    agreement = (ints.argmax(1) == fake.argmax(1)).double().mean().item()
    assert agreement == 1.0  # stated: predictions agree on every sample
    torch.testing.assert_close(ints, fake, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "pact"}, "MEBQAT.method: must be one of dorefa, lsq"),
    ({"weight_bits": 3, "candidates": (2, 4)}, "MEBQAT.weight_bits: 3 is not in the candidate set"),
    ({"act_bits": 17}, "MEBQAT.act_bits: 17 is not in the candidate set"),
    ({"method": "lsq", "candidates": (1, 2)}, "LSQ has no 1-bit weights"),
    ({"method": "lsq", "weight_bits": 1}, "MEBQAT.weight_bits: 1 is not in the candidate set"),
    ({"step_sizes": "per_layer"}, "MEBQAT.step_sizes"),
])
def test_bad_configs_are_one_line_errors(kwargs, match):
    with pytest.raises(et.ConfigError, match=match) as e:
        et.MEBQAT(**kwargs)
    assert "\n" not in str(e.value)


def test_config_round_trip_and_no_layer_refusal():
    cfg = et.MEBQAT(weight_bits=None, act_bits=4, candidates=[4, 2, 2])
    assert cfg.weight_bits == FP and cfg.candidates == (2, 4)
    assert et.registry.config_from_dict(cfg.to_dict()) == cfg
    two = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(et.ConfigError, match="besides the first and the last"):
        et.apply_(two, et.MEBQAT(), torch.randn(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ review findings
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 2))


def test_lsq_input_with_negatives_uses_the_signed_grid_from_its_first_call():
    q = FakeQuant("lsq", "act", (4,), bits=4)
    x = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    first, second = q(x), q(x)
    assert bool(q.signed) and torch.equal(first, second) and bool((first < 0).any())


def test_per_bitwidth_steps_train_in_the_training_mode():
    """Several bit widths first used in one graph: initialising a step must not break the others' backward."""
    net = _mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    et.apply_(net, et.MEBQAT(method="lsq", weight_bits=None, act_bits=None, step_sizes="per_bitwidth"), x)
    mode = MEBQATTraining(net).train()
    torch.manual_seed(0)
    mode.training_loss(mode(x), y).backward()
    steps = [q.step for q in quantizers(net)]
    assert all(s.grad is not None and bool(torch.isfinite(s.grad).all()) for s in steps)


class _ScaledLinear(nn.Linear):
    """A layer that computes the weight it uses (as weight standardisation does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 1.0, self.bias)


def test_a_layer_computing_its_weight_is_quantized_and_refused_by_the_integer_export(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), _ScaledLinear(8, 8), nn.ReLU(), _ScaledLinear(8, 8), nn.ReLU(),
                        nn.Linear(8, 2))
    x = torch.rand(4, 8)
    with torch.no_grad():
        plain = net(x)
    et.apply_(net, et.MEBQAT(weight_bits=32, act_bits=32), x)
    set_bits(net, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(net(x), plain)  # the computed weights were quantized
    with pytest.raises(et.ConfigError, match="computes the weight it uses"):
        export_integer(net, tmp_path / "m.safetensors", 1)


def test_a_model_whose_layers_are_never_reached_is_refused():
    class Parent(nn.Module):  # the parent computes from the child's weight and calls the op itself
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.a(x).relu()
            x = F.linear(x, self.b.weight * 2.0, self.b.bias).relu()
            return self.c(x)

    with pytest.raises(et.ConfigError, match="found nothing to act on"):
        et.apply_(Parent(), et.MEBQAT(targets=["b"]), torch.randn(2, 8))


def test_set_bits_reaches_every_layer_of_a_model_with_a_model_attribute():
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.proj, self.head = _mlp(), nn.Linear(2, 8), nn.Linear(8, 2)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.head(torch.relu(self.proj(self.model(x))))

    m = Wrap()
    et.apply_(m, et.MEBQAT(weight_bits=8, act_bits=8), torch.rand(2, 8), check=False)
    assert set_bits(m, 2, 2) == 2 * len(quantized_layers(m))
    assert all(q.bits == 2 for q in quantizers(m))


def test_outer_step_keeps_per_layer_bits_and_the_caller_s_mode():
    net = _mlp()
    x, y = torch.rand(16, 8), torch.randint(0, 2, (16,))
    et.apply_(net, et.MEBQAT(weight_bits=4, act_bits=4), x)
    first = quantized_layers(net)["2"].mebqat_weight
    first.set_bits(8)
    before = [q.bits for q in quantizers(net)]
    outer = MEBQATTraining(net).eval()
    outer.step(x, y, torch.optim.SGD(net.parameters(), lr=0.1))
    assert [q.bits for q in quantizers(net)] == before
    assert not any(m.training for m in outer.modules())


def test_teacher_pass_leaves_batch_norm_statistics_to_the_subtasks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,))
    et.apply_(net, et.MEBQAT(weight_bits=None, act_bits=None), x)
    outer = MEBQATTraining(net, guaranteed=[(1, 1), (2, 2)], subtasks=2)  # no (FP, FP): a separate teacher pass
    bn = net[1]
    outer.step(x, y, torch.optim.SGD(net.parameters(), lr=0.0))
    assert int(bn.num_batches_tracked) == 2  # the two subtasks, not the teacher


def test_dorefa_on_an_all_zero_weight_is_zero_not_nan():
    w = torch.zeros(4, 4, requires_grad=True)
    out = dorefa_weight(w, 3)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, 4)) and bool(torch.isfinite(w.grad).all())


def test_recipe_targets_are_quantized_as_given():
    net = _mlp()
    h = et.apply_(net, et.Recipe(techniques=(et.MEBQAT(),), targets=("0", "2", "6")), torch.rand(2, 8))
    assert sorted(quantized_layers(net)) == ["0", "2", "6"]
    h.remove()


def test_a_tied_weight_used_by_a_layer_that_is_not_a_target_is_not_quantized():
    net = _mlp()
    net[4].weight = net[2].weight  # tied
    x = torch.rand(4, 8)
    et.apply_(net, et.MEBQAT(weight_bits=32, act_bits=32, targets=["2"]), x)
    set_bits(net, 1, 1)
    seen = []
    net[4].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net[4].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(x)
    torch.testing.assert_close(seen[1], F.linear(seen[0], net[2].weight, net[4].bias), rtol=0, atol=0)


def test_input_passed_by_keyword_is_quantized():
    class KW(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(input=x, weight=self.weight, bias=self.bias)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), KW(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.rand(4, 8)
    et.apply_(net, et.MEBQAT(weight_bits=32, act_bits=32), x)
    set_bits(net, 2, 2)
    seen = []
    net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net[2].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(x)
    q = quantized_layers(net)["2"]
    want = F.linear(q.mebqat_input(seen[0]), q.mebqat_weight(net[2].weight), net[2].bias)
    torch.testing.assert_close(seen[1], want, rtol=0, atol=0)


def test_load_integer_refuses_damaged_and_mismatched_files_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model(et.MEBQAT(weight_bits=4, act_bits=4))
    m.eval()(tiny_batch()[0])
    good = tmp_path / "m.safetensors"
    export_integer(m, good, 4)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "short.safetensors").write_bytes(good.read_bytes()[:200])
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 10))
    cases = [(tmp_path / "junk.safetensors", TinyConvNet(), "not a readable safetensors file"),
             (tmp_path / "short.safetensors", TinyConvNet(), "not a readable safetensors file"),
             (tmp_path / "missing.safetensors", TinyConvNet(), "does not exist"),
             (good, other, "load_integer:")]
    tensors = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    cut = {k: (v[:3] if k.endswith(".weight.codes") else v) for k, v in tensors.items()}
    save_file(cut, str(tmp_path / "cut.safetensors"), metadata=meta)
    cases.append((tmp_path / "cut.safetensors", TinyConvNet(), "truncated"))
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"edgetrain.intexport": "{not json"})
    cases.append((tmp_path / "meta.safetensors", TinyConvNet(), "corrupt export metadata"))
    for path, skeleton, match in cases:
        with pytest.raises(et.ConfigError, match=match) as e:
            load_integer(path, skeleton)
        assert "\n" not in str(e.value), path


def test_run_time_bit_widths_must_be_ints_and_subtasks_are_checked_at_construction():
    m = _model(et.MEBQAT(weight_bits=4, act_bits=4))
    with pytest.raises(et.ConfigError, match="must be an int"):
        set_bits(m, 4.0, 4)
    with pytest.raises(et.ConfigError, match="subtasks must be an int >= 2"):
        MEBQATTraining(m, subtasks=1)


def test_accuracy_limit_counts_samples():
    from edgetrain.data import load_data
    from edgetrain.mebqat import accuracy

    data = load_data("digits", "test", channels=1, image_size=8)
    calls = []
    model = TinyConvNet(num_classes=data.num_classes).eval()
    model.register_forward_pre_hook(lambda mod, a: calls.append(len(a[0])))
    accuracy(model, data, batch_size=64, limit=10)
    assert sum(calls) == 10
