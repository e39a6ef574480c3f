"""Dynamic sparse training (edgetrain.sparse): the sparse layers against the masked dense computation (float64,
gradcheck); the value gradient is nnz-sized and the backward makes no dense weight gradient unless armed (measured
with the profiler); each growth rule (SET, RigL, DST-EE) picks what a slow per-element reference picks, update after
update, with the optimizer state of grown weights zeroed and the kept weights' state moved with them; ERK densities
computed by hand; the meter shows weights, gradients and optimizer state of the sparse layers shrinking with density
(known byte counts); refusals are one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import edgetrain as et
from edgetrain.errors import ConfigError
from edgetrain.measure import PeakMeter
from edgetrain.sparse import DynamicSparse, SparseConv2d, SparseLinear, layer_densities, sparse_from_dense
from edgetrain.sparse.layers import _SparseMM

D = torch.float64
TOL = 1e-12  # float64: the CSR kernels sum in another order than the dense ones (not bitwise equal; a few ulp)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_and_gradients_equal_masked_dense(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(7, 5).double()
        x = torch.randn(3, 2, 7, dtype=D, requires_grad=True)  # extra leading dim: reshaped like nn.Linear
    else:
        dense = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
        x = torch.randn(2, 3, 7, 6, dtype=D, requires_grad=True)
    sp = sparse_from_dense(dense, 0.4, _gen())
    w = sp.dense_weight().requires_grad_()
    assert (sp.mask().view(w.shape) == (w != 0)).all() and sp.nnz == round(0.4 * w.numel())
    ref = F.linear(x, w, dense.bias) if kind == "linear" else F.conv2d(x, w, dense.bias, dense.stride,
                                                                       dense.padding, dense.dilation)
    got = sp(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
    gout = torch.randn_like(ref)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(ref, (x, w, dense.bias), gout)
    gx, gv, gb = torch.autograd.grad(got, (x, sp.values, sp.bias), gout)
    assert gv.shape == (sp.nnz,)  # the weight gradient is nnz-sized
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(gv, gw_ref.reshape(-1)[sp.flat_indices()], rtol=0, atol=TOL)
    torch.testing.assert_close(gb, gb_ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradcheck(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "linear":
        sp, x = sparse_from_dense(nn.Linear(5, 4).double(), 0.5, _gen()), torch.randn(3, 5, dtype=D)
        geom = None
    else:
        sp = sparse_from_dense(nn.Conv2d(2, 3, 3, stride=2, padding=1).double(), 0.5, _gen())
        x, geom = torch.randn(2, 2, 5, 5, dtype=D), sp.geometry
    v = sp.values.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, x: _SparseMM.apply(v, sp.crow, sp.col, sp.shape2d, x, sp, geom),
                                    (v, x.requires_grad_()))


def test_backward_makes_no_dense_weight_gradient_unless_armed() -> None:
    """The profiler's allocator events in the backward of a 512x512 layer at density 0.05 (13,107 nnz), batch 2:
    nnz-proportional, not dense (one dense fp32 weight is 1 MiB). The value gradient (4 B per nnz) plus
    ``sampled_addmm``'s copy of the pattern: 13 B per nnz measured; the input gradient adds torch's CSR transpose
    (via COO and a sort: 53 B per nnz in all measured); the armed update step makes the dense |dY X^T|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    ds = DynamicSparse(model, 0.05, "rigl", total_steps=10, delta_t=2, distribution="uniform")
    layer, dense_bytes = ds.layers["0"], 512 * 512 * 4

    def backward_peak(x: Tensor) -> int:
        loss = model(x).square().sum()
        with PeakMeter() as pm:
            loss.backward()
        return pm.peak_delta

    layer.capture = None
    x = torch.randn(2, 512)
    assert backward_peak(x) <= 16 * layer.nnz < dense_bytes / 4
    assert layer.values.grad.shape == (layer.nnz,)
    assert backward_peak(x.requires_grad_()) <= 56 * layer.nnz < dense_bytes * 0.75
    layer.capture = ds._score
    assert backward_peak(x) >= dense_bytes  # the dense |dY X^T| of the update step


# ------------------------------------------------------------------------------------------- growth references
def _ref_update(w: Tensor, mask: Tensor, grad: Tensor, cover: Tensor, t: int, k: int, method: str, rand: Tensor | None,
                c: float, eps: float, form: str = "sqrt") -> tuple[set[int], set[int]]:
    """Slow per-element RigL/SET/DST-EE: drop the k smallest |w| among active, grow the k best-scored positions not
    kept (|g| / mean|g| [+ c sqrt(ln t / (N + eps))], or a uniform random number). Returns (kept, grown)."""
    w, mask, grad, cover = (v.reshape(-1).tolist() for v in (w, mask, grad, cover))
    active = sorted((abs(w[i]), i) for i in range(len(w)) if mask[i])
    kept = {i for _, i in active[k:]}
    mean = sum(abs(g) for g in grad) / len(grad)
    scores = {}
    for i in range(len(w)):
        if i in kept:
            continue
        if method == "set":
            scores[i] = float(rand[i])
        else:
            scores[i] = abs(grad[i]) / mean
            if method == "dst_ee":
                ratio = math.log(max(t, 2)) / (cover[i] + eps)
                scores[i] += c * (math.sqrt(ratio) if form == "sqrt" else ratio)
    grow = sorted(scores, key=lambda i: -scores[i])[:k]
    return kept, set(grow)


@pytest.mark.parametrize("method,optim,form", [("set", "sgd", "sqrt"), ("rigl", "sgd", "sqrt"),
                                               ("dst_ee", "adam", "sqrt"), ("dst_ee", "sgd", "sqrt"),
                                               ("dst_ee", "sgd", "linear")])
def test_growth_rules_match_slow_reference(method: str, optim: str, form: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    total, dt, c, eps = 20, 2, 0.7, 1.0
    ds = DynamicSparse(model, 0.4, method, total_steps=total, delta_t=dt, distribution="uniform", c=c, eps=eps, seed=3,
                       bonus=form)
    opt = (torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.05))
    set_gen = torch.Generator().manual_seed(4)  # SET's growth stream: seed + 1
    x, y = torch.randn(8, 6, dtype=D), torch.randint(0, 4, (8,))
    cover = {n: torch.zeros(9 * 6 if n == "0" else 4 * 9, dtype=D) for n in ds.layers}
    updates = 0
    for t in range(1, 8):
        ws = {n: m.dense_weight().requires_grad_() for n, m in ds.layers.items()}
        masks = {n: m.mask().reshape(-1) for n, m in ds.layers.items()}
        for n in cover:
            cover[n] += masks[n]  # N += M every step, as the spec writes it
        ref_loss = F.cross_entropy(F.linear(torch.tanh(F.linear(x, ws["0"], model[0].bias)), ws["2"], model[2].bias), y)
        grads = dict(zip(ws, torch.autograd.grad(ref_loss, list(ws.values()))))  # dense dL/dW_eff
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = {n: (m.dense_weight().reshape(-1), {k: _dense(s, m) for k, s in opt.state[m.values].items()
                                                      if s.dim() == 1}) for n, m in ds.layers.items()}
        rec = ds.step(opt)
        assert (rec is not None) == (t % dt == 0)
        if rec is None:
            continue
        updates += 1
        zeta = 0.3 / 2 * (1 + math.cos(math.pi * t / (0.75 * total)))
        for n, m in ds.layers.items():
            k = round(zeta * m.nnz)
            rand = torch.rand(masks[n].numel(), generator=set_gen, dtype=D) if method == "set" else None
            kept_ref, grown_ref = _ref_update(before[n][0], masks[n], grads[n], cover[n], t, k, method, rand, c, eps,
                                              form)
            assert set(m.flat_indices().tolist()) == kept_ref | grown_ref, (n, t)
            old = set(masks[n].nonzero().view(-1).tolist())
            assert rec["layers"][n]["k"] == k and rec["layers"][n]["regrown"] == len(grown_ref & old)
            kept, new = (torch.isin(torch.arange(masks[n].numel()), torch.tensor(sorted(s))) for s in (kept_ref,
                                                                                                      grown_ref))
            dw = m.dense_weight().reshape(-1)
            assert torch.equal(dw[kept], before[n][0][kept]) and (dw[new] == 0).all()
            for key, s in before[n][1].items():  # optimizer state: moved with kept weights, zero for grown ones
                now = _dense(opt.state[m.values][key], m)
                assert torch.equal(now[kept], s[kept]) and (now[new] == 0).all() and now.abs().sum() > 0
    assert updates == 3


def _dense(s: Tensor, m: SparseLinear) -> Tensor:
    out = torch.zeros(math.prod(m.shape2d), dtype=s.dtype)
    out[m.flat_indices()] = s
    return out


def test_dst_ee_with_c_zero_is_rigl() -> None:
    def run(method: str, c: float) -> list[Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3))
        ds = DynamicSparse(model, 0.3, method, total_steps=30, delta_t=3, c=c)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ds.step(opt)
        return [m.mask() for m in ds.layers.values()]

    rigl, ee0, ee = run("rigl", 1.0), run("dst_ee", 0.0), run("dst_ee", 5.0)
    assert all(torch.equal(a, b) for a, b in zip(rigl, ee0))
    assert not all(torch.equal(a, b) for a, b in zip(rigl, ee))  # the exploration term changes the picks


# ------------------------------------------------------------------------------------------- densities
def test_erk_by_hand() -> None:
    # a (10, 20): raw (10 + 20) / 200 = 0.15; b (2, 10): raw 12 / 20 = 0.6; 220 weights.
    # density 0.5: 110 kept; scale 110 / (0.15 * 200 + 0.6 * 20) = 2.619 puts b over 1: b dense (20), then
    # scale = (110 - 20) / 30 = 3: a at 0.45.
    got = layer_densities({"a": (10, 20), "b": (2, 10)}, 0.5)
    assert got["b"] == 1.0 and got["a"] == pytest.approx(0.45, abs=1e-12)
    # density 0.2: 44 kept, scale 44 / 42: a 0.15 * 44 / 42, b 0.6 * 44 / 42 (both below 1)
    got = layer_densities({"a": (10, 20), "b": (2, 10)}, 0.2)
    assert got["a"] == pytest.approx(0.15 * 44 / 42, abs=1e-12) and got["b"] == pytest.approx(0.6 * 44 / 42, abs=1e-12)
    # a conv (8, 4, 3, 3): raw (8 + 4 + 3 + 3) / 288 = 1/16; with a (16, 18) linear: raw 34 / 288; 576 weights
    got = layer_densities({"c": (8, 4, 3, 3), "l": (16, 18)}, 0.1)
    scale = 57.6 / (18 + 34)
    assert got["c"] == pytest.approx(scale / 16, abs=1e-12) and got["l"] == pytest.approx(scale * 34 / 288, abs=1e-12)
    assert layer_densities({"a": (10, 20), "b": (2, 10)}, 0.3, "uniform") == {"a": 0.3, "b": 0.3}


def test_erk_dense_layer_stays_dense() -> None:
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))  # as test_erk_by_hand's a and b
    ds = DynamicSparse(model, 0.5, "rigl", total_steps=10)
    assert type(model[2]) is nn.Linear and isinstance(model[0], SparseLinear) and model[0].nnz == 90
    assert ds.densities == {"0": 0.45, "2": 1.0}


# ------------------------------------------------------------------------------------------- the meter
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10))


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_meter_sees_weights_gradients_optimizer_state_shrink(optim: str) -> None:
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    sizes = [(96, 64), (48, 96), (10, 48)]
    bias = 4 * sum(o for o, _ in sizes)
    got = {}
    for density in (1.0, 0.5, 0.2, 0.05):
        torch.manual_seed(0)
        model = _mlp()
        if density < 1:
            DynamicSparse(model, density, "rigl", total_steps=100, distribution="uniform")
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optim == "sgd"
               else torch.optim.AdamW(model.parameters(), lr=1e-3))
        m = et.measure(model, (x, y), optimizer=opt, repeats=0)
        nnz = sum(round(density * o * i) for o, i in sizes)
        assert m.param_bytes == m.grad_bytes == 4 * nnz + bias  # values (+ biases), nnz-sized
        per_tensor = 4 if optim == "sgd" else 8  # SGD: momentum; AdamW: two moments (+ a 4-byte step each)
        assert m.optimizer_bytes == per_tensor * (nnz + bias // 4) + (0 if optim == "sgd" else 4 * 6)
        assert m.peak_split["buffers"] == (0 if density == 1 else 4 * (nnz + sum(o + 1 for o, _ in sizes)))
        got[density] = m
    peaks = [got[d].peak_bytes for d in (1.0, 0.5, 0.2, 0.05)]
    assert peaks[1] > peaks[2] > peaks[3] and peaks[0] > peaks[2]  # at 50% the int32 indices cost as much as
    # the values saved: 0.5 sparse is not smaller than dense in weights + indices


def test_sparse_layers_save_what_dense_layers_save() -> None:
    """The meter: a sparse step keeps exactly the activations the dense step keeps, and nothing outside the hooks
    (the conv's output is laid out as a dense conv's, so a Flatten after it stays a view)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    batch = (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    dense = et.measure(model, batch, repeats=0)
    DynamicSparse(model, 0.2, "rigl", total_steps=100)
    sparse = et.measure(model, batch, repeats=0)
    assert sparse.hidden_bytes == 0 and sparse.saved_by_module == dense.saved_by_module
    # the conv's input (3,072 B) and the ReLU's output (8,192 B; the Linear's input is a view of it), the loss's 196 B
    assert sparse.saved_bytes == dense.saved_bytes == 3072 + 8192 + 196


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_refuses_density_outside_0_1(density: object) -> None:
    with pytest.raises(ConfigError, match=r"density: must be a number in \(0, 1\]") as e:
        DynamicSparse(_mlp(), density, total_steps=10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layer,name", [(nn.Conv1d(2, 3, 3), "Conv1d"), (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                                        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "reflect"),
                                        (nn.LSTM(3, 3), "LSTM"), (nn.Conv2d(2, 2, 3, padding="same"), "same")])
def test_refuses_unsupported_layer_naming_it(layer: nn.Module, name: str) -> None:
    model = nn.Sequential(layer, nn.Linear(3, 2))
    with pytest.raises(ConfigError, match=f"'0' is .*{name}") as e:
        DynamicSparse(model, 0.5, total_steps=10, layers=["0"])
    assert "\n" not in str(e.value)
    assert type(model[0]) is type(layer)  # nothing half-done


def test_refuses_model_without_supported_layer_and_bad_options() -> None:
    with pytest.raises(ConfigError, match="has no supported layer"):
        DynamicSparse(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()), 0.5, total_steps=10)
    with pytest.raises(ConfigError, match="has no module 'fc9'"):
        DynamicSparse(_mlp(), 0.5, total_steps=10, layers=["fc9"])
    for kw, frag in [({"method": "snip"}, "method: must be one of set, rigl, dst_ee"),
                     ({"distribution": "er"}, "distribution: must be one of erk, uniform"),
                     ({"delta_t": 0}, "delta_t"), ({"c": -1.0}, "c: must be"), ({"eps": 0.0}, "eps: must be"),
                     ({"zeta0": 1.5}, "zeta0"), ({"t_end_frac": 0}, "t_end_frac"),
                     ({"bonus": "log"}, "bonus: must be one of sqrt, linear")]:
        with pytest.raises(ConfigError, match=frag):
            DynamicSparse(_mlp(), 0.5, total_steps=10, **kw)


def test_missing_backward_on_update_step_is_one_line() -> None:
    model = _mlp()
    ds = DynamicSparse(model, 0.2, "rigl", total_steps=100, delta_t=1)
    with pytest.raises(ConfigError, match="no dense gradient for the update at step 1"):
        ds.step()


def test_second_backward_on_update_step_is_refused() -> None:
    model = _mlp()
    DynamicSparse(model, 0.2, "dst_ee", total_steps=100, delta_t=1)
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ConfigError, match="a second backward through the model at update step 1"):
        F.cross_entropy(model(x), y).backward()


def test_conv_model_trains_and_keeps_nnz() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    ds = DynamicSparse(model, 0.3, "dst_ee", total_steps=12, delta_t=2, distribution="uniform")
    assert isinstance(model[0], SparseConv2d)
    nnz = {n: m.nnz for n, m in ds.layers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ds.step(opt)
        losses.append(float(loss.detach()))
    assert len(ds.history) == 4 and {n: m.nnz for n, m in ds.layers.items()} == nnz
    assert losses[-1] < losses[0]
    assert all(0.3 < v <= 1 for v in ds.coverage().values())


@pytest.mark.parametrize("name", ["functional", "audio", "bert", "vit"])
def test_foreign_zoo_models_train_a_step_with_their_supported_layers_sparse(name):
    """Models edgetrain did not write: the exact Linear/Conv2d layers become sparse at the asked density, the rest
    (grouped convs, Conv1d, attention's own projections) stay as they were, and one training step runs."""
    import warnings

    from edgetrain.inputs import call_model
    from edgetrain.measure import default_loss
    from edgetrain.testing.zoo import ZOO, available

    if name not in available():
        pytest.skip(f"{name} needs a test extra")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ZOO[name].build()
    x, y = ZOO[name].batch(4)
    dense = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and getattr(m, "groups", 1) == 1}
    DynamicSparse(model, density=0.5, method="rigl", total_steps=10, distribution="uniform")
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear | SparseConv2d)}
    assert sparse and set(sparse) <= dense
    assert all(abs(m.nnz / math.prod(m.shape2d) - 0.5) < 0.01 for m in sparse.values())
    default_loss(call_model(model, x), y).backward()
    assert all(m.values.grad is not None and m.values.grad.shape == m.values.shape for m in sparse.values())
