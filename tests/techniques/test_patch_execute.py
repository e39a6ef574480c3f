"""PatchExecute (MCUNetV2 patch-based execution of the frozen first blocks): tiled == untiled, a lower forward peak
with the same saved bytes, one-line refusals, and remove() restoring the model.

Exactness, as measured: float64 dense convolutions go through MKL's GEMM (im2col), whose rounding depends on the
number of output positions, so a tile's outputs differ from the whole image's by at most 3.4e-16 of the output's
largest value (about one ulp; 3-18% of the elements differ at all). The bound asserted is ``1e-14 * max|y|``
(rtol 0). Prefixes of depthwise convolutions only (torch's own kernel, no GEMM) are bit-exact in float64, and
float32 (oneDNN direct convolutions) was bit-exact on every MobileNetV2 case measured here; both are asserted with
``torch.equal``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.cost import estimate
from edgetrain.models import create_model
from edgetrain.techniques import Freeze, PatchExecute
from edgetrain.testing import seeded
from edgetrain.testing.patch_net import patch_net

F64_BOUND = 1e-14  # of max|y|; measured at most 3.4e-16 (MKL float64 GEMM rounding by problem size)


def _patched(model: nn.Module, name: str = "features"):
    return model.get_submodule(name).forward.__self__  # the wrapper PatchExecute installed


def _tiled_vs_whole(model: nn.Module, x: torch.Tensor, name: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    p = _patched(model, name)
    with torch.no_grad():
        return p.wrapped(x), p.run(x)


def _assert_exact(tiled: torch.Tensor, whole: torch.Tensor, bitwise: bool = False) -> None:
    assert tiled.shape == whole.shape
    if bitwise:
        assert torch.equal(tiled, whole), float((tiled - whole).abs().max())
    else:
        torch.testing.assert_close(tiled, whole, rtol=0, atol=F64_BOUND * float(whole.abs().max()))


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("patches", [2, 3])
@pytest.mark.parametrize("size", [(65, 63), (64, 64)])
def test_mobilenet_v2_prefix_tiled_equals_untiled(size, patches):
    """The real MobileNetV2 stem and first inverted residuals (stride-2 convs, depthwise, residual adds), frozen by
    Freeze (BatchNorms on running statistics), in train mode with grad enabled."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).double().train()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with et.apply_(model, [Freeze(last_k_blocks=2), PatchExecute(blocks=4, patches=patches)], x):
        _assert_exact(*_tiled_vs_whole(model, x))


def test_mobilenet_v2_float32_is_bit_exact_here():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    x = torch.randn(2, 3, 65, 63)
    with et.apply_(model, [Freeze(last_k_blocks=2), PatchExecute(blocks=6, patches=3)], x):
        _assert_exact(*_tiled_vs_whole(model, x), bitwise=True)


class DownBlock(nn.Module):
    """ResNet-style: conv 3x3 stride 2 -> BN -> ReLU -> conv 3x3, plus a 1x1 stride-2 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1))
        self.short = nn.Conv2d(cin, cout, 1, 2)

    def forward(self, x):
        return torch.relu(self.main(x) + self.short(x))


class DWResidual(nn.Module):
    """Depthwise conv (any kernel, stride 1, 'same' by integer padding) -> BN -> hardswish, plus the input."""

    def __init__(self, c: int, k: int = 3, dilation: int = 1, dense: bool = True) -> None:
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.dw = nn.Conv2d(c, c, k, 1, pad, dilation, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1) if dense else nn.Identity()

    def forward(self, x):
        return x + self.pw(nn.functional.hardswish(self.bn(self.dw(x))))


def _seed(model: nn.Module, dtype=torch.float64) -> nn.Module:
    return seeded(model, 0, dtype)


def _net(*frozen: nn.Module, head: int = 8) -> nn.Sequential:
    """``frozen`` blocks (then frozen, BatchNorms in eval mode), a trainable conv and a classifier."""
    model = nn.Sequential(*frozen, nn.Sequential(nn.LazyConv2d(head, 3, 1, 1), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(10))
    return model


def _build(blocks: list[nn.Module], x: torch.Tensor) -> nn.Sequential:
    model = _net(*blocks)
    model(x.float())  # materialise the lazy layers
    model = _seed(model, x.dtype)
    for b in blocks:
        b.requires_grad_(False)
        b.eval()
    model.block_names = [str(i) for i in range(len(blocks) + 1)]
    model.classifier_name = str(len(blocks) + 3)
    return model


MIXED = [lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6()),  # stride 2
         lambda: DWResidual(8),  # depthwise + residual add
         lambda: DownBlock(8, 12),  # stride-2 branch + stride-2 shortcut
         lambda: DWResidual(12, k=3, dilation=2),  # dilated
         # a (3, 1) kernel, then an unpadded ("valid") conv
         lambda: nn.Sequential(nn.Conv2d(12, 12, (3, 1), 1, (1, 0)), nn.Conv2d(12, 12, 3, 1, 0), nn.ELU()),
         lambda: DWResidual(12, k=5)]


@pytest.mark.parametrize("patches", [2, 3])
@pytest.mark.parametrize("size", [(65, 63), (33, 40)])
def test_mixed_prefix_tiled_equals_untiled(size, patches):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    model = _build([make() for make in MIXED], x)
    ref = copy.deepcopy(model).eval()(x)
    with et.apply_(model, PatchExecute(blocks=len(MIXED), patches=patches), x):
        _assert_exact(*_tiled_vs_whole(model, x, ""))
        model.eval()
        _assert_exact(model(x).detach(), ref.detach())


def test_depthwise_prefix_is_bit_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 65, 63, dtype=torch.float64)
    blocks = [nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6), nn.BatchNorm2d(6), nn.ReLU()),
              DWResidual(6, dense=False), DWResidual(6, k=5, dense=False),
              nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6), nn.Hardswish())]
    model = _build(blocks, x)
    for patches in (2, 3):
        with et.apply_(model, PatchExecute(blocks=4, patches=patches), x):
            _assert_exact(*_tiled_vs_whole(model, x, ""), bitwise=True)


def test_training_step_equals_freeze_alone():
    """One train-mode step of MobileNetV2 in float64 (trainable BatchNorms and dropout in the trained part): loss,
    gradients and BatchNorm statistics equal Freeze alone's."""
    torch.manual_seed(0)
    base = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).double().train()
    x, y = torch.randn(4, 3, 65, 63, dtype=torch.float64), torch.randint(0, 10, (4,))
    results = []
    for recipe in ([Freeze(last_k_blocks=2)], [Freeze(last_k_blocks=2), PatchExecute(blocks=4, patches=3)]):
        model = copy.deepcopy(base)
        with et.apply_(model, recipe, x):
            torch.manual_seed(1)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                            {k: v.clone() for k, v in model.state_dict().items()}))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-13, atol=0)
    assert set(g1) == set(g0) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-12, atol=1e-14, msg=n)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-12, atol=1e-14, msg=k)


# ------------------------------------------------------------------------------------------------ memory
def test_meter_shows_a_lower_forward_peak_with_the_same_saved_bytes():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10).train()
    x, y = torch.randn(4, 3, 96, 96), torch.randint(0, 10, (4,))
    rows = []
    for recipe in ([Freeze(last_k_blocks=2)], [Freeze(last_k_blocks=2), PatchExecute(blocks=4, patches=2)]):
        m = et.measure(model, (x, y), recipe=recipe, warmup=1, repeats=0)
        table = estimate(model, recipe, batch_size=4, example=x)
        assert table.saved_bytes == m.saved_bytes
        rows.append(m)
    plain, tiled = rows
    assert tiled.saved_bytes == plain.saved_bytes
    # measured: the forward's peak 20.7 -> 15.9 MiB; above the resident state (weights, optimizer, batch: 12.5 MiB)
    # 8.2 -> 3.4 MiB; the step's peak 20.7 -> 16.3 MiB (now in the backward)
    assert plain.peak_phase == "forward"
    state = sum(plain.peak_split[c] for c in ("weights_trainable", "weights_frozen", "buffers", "optimizer", "batch"))
    forward = [m.phase_peaks["forward"] - state for m in rows]
    assert forward[1] < 0.5 * forward[0], (plain.phase_peaks, tiled.phase_peaks)
    assert tiled.peak_bytes < 0.85 * plain.peak_bytes


# ------------------------------------------------------------------------------------------------ refusals
def _refused(model: nn.Module, recipe, x: torch.Tensor, match: str) -> str:
    with pytest.raises(et.ConfigError, match=match) as e:
        et.apply_(model, recipe, x)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("PatchExecute")
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left applied
    return msg


def test_refuses_a_trainable_prefix():
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    msg = _refused(model, PatchExecute(blocks=2), torch.randn(2, 3, 32, 32), "train; it runs only where no")
    assert "features.0" in msg


def test_refuses_a_trainable_layer_before_the_blocks():
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    recipe = [Freeze(targets=["features.0"], last_k_blocks=1), PatchExecute(targets=["features.1", "features.2"])]
    _refused(model, recipe, torch.randn(2, 3, 32, 32), "features.0.* runs before")


def test_refuses_train_mode_batchnorm_at_apply_and_at_run_time():
    x = torch.randn(2, 3, 33, 40, dtype=torch.float64)
    model = _build([make() for make in MIXED[:3]], x)
    model.train()  # the frozen blocks' BatchNorms now use batch statistics: nothing froze their calls
    _refused(model, PatchExecute(blocks=3), x, "normalises with batch statistics")
    model.eval()  # in eval mode at apply, the probe passes; training later is refused at the first forward
    with et.apply_(model, PatchExecute(blocks=3), x):
        model.train()
        with pytest.raises(et.ConfigError, match="batch statistics") as e:
            model(x)
        assert "\n" not in str(e.value)


class DropPath(nn.Module):
    """A residual conv whose branch is dropped per sample in train mode only (stochastic depth)."""

    def __init__(self, c: int, factory: bool) -> None:
        super().__init__()
        self.conv, self.factory = nn.Conv2d(c, c, 3, 1, 1), factory

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) if self.factory else \
                x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.9)
            y = y * (keep < 0.9).to(x.dtype) if self.factory else y * keep
        return x + y


@pytest.mark.parametrize("factory", [True, False])
def test_refuses_random_ops_the_eval_trace_does_not_see(factory):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = _build([nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()), DropPath(8, factory)], x)
    model.train()
    _refused(model, PatchExecute(blocks=2), x, "draws random numbers")
    model.eval()
    with et.apply_(model, PatchExecute(blocks=2), x):
        model.train()
        with pytest.raises(et.ConfigError, match="draws random numbers"):
            model(x)


def test_refuses_a_parameter_unfrozen_after_apply():
    x = torch.randn(2, 3, 33, 40, dtype=torch.float64)
    model = _build([make() for make in MIXED[:2]], x)
    with et.apply_(model, PatchExecute(blocks=2), x):
        model[0][0].weight.requires_grad_(True)
        with pytest.raises(et.ConfigError, match="no gradient flows"):
            model(x)
        model[0][0].weight.requires_grad_(False)


@pytest.mark.parametrize("block,match", [
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.MaxPool2d(2)), r"max_pool2d \(pools\)"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, "same")), "string padding 'same'"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.GroupNorm(2, 8)), r"group_norm \(normalises over"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.Dropout(0.1)), r"dropout \(draws random"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.Upsample(scale_factor=2)), "resamples"),
])
def test_refuses_ops_that_see_beyond_a_tile(block, match):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = _build([nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()), block()], x)
    _refused(model, PatchExecute(blocks=2), x, match)


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, 1, 1), nn.ReLU())
                                    for i in range(3))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


class OwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 1.0


def test_refuses_blocks_outside_one_stock_sequential():
    x = torch.randn(2, 3, 16, 16)
    model = ListNet()
    model.blocks[:2].requires_grad_(False)
    _refused(model, PatchExecute(blocks=2), x, "not consecutive children of one nn.Sequential")
    seq = OwnForward(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1)), nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1)),
                     nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    seq[:2].requires_grad_(False)
    seq.block_names, seq.classifier_name = ["0", "1", "2"], "5"
    _refused(seq, PatchExecute(blocks=2), x, "has its own forward")
    _refused(seq, PatchExecute(blocks=5), x, "5 > the model's 3 blocks")


def test_config_errors_are_one_line():
    for kwargs in ({"patches": 1}, {"blocks": 0}, {"blocks": 2.0}, {"patches": True}):
        with pytest.raises(et.ConfigError) as e:
            PatchExecute(**kwargs)
        assert "\n" not in str(e.value) and str(e.value).startswith("PatchExecute.")


# ------------------------------------------------------------------------------------------------ remove
def test_remove_restores_the_model():
    model = patch_net(torch.float64)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    before = model(x)
    model.train()
    handle = et.apply_(model, PatchExecute(blocks=3, patches=2), x)
    assert "forward" in model.features.__dict__
    nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    handle.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for k, v in model.state_dict().items():  # the trained block's BatchNorm statistics moved in the step
        assert torch.equal(v, state[k]) or k.startswith("features.3.1.running") or "num_batches" in k, k
    model.load_state_dict(state)
    model.eval()
    assert torch.equal(model(x), before)
