"""FrozenChunks (the frozen first blocks run on the batch in chunks): the same step as unchunked, a lower forward peak
with the same saved bytes, the frozen prefix found in Sequential and non-Sequential models, one-line refusals, and
remove() restoring the model.

Exactness, as measured here: float32 MobileNetV2 (oneDNN direct convolutions) is bit-exact in chunks, and so is the
training step's every gradient; float64 dense convs go through MKL's GEMM, whose rounding depends on the problem size,
so the float64 bound is ``1e-14 * max|y|`` (as PatchExecute's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.cost import estimate
from edgetrain.execution import FusedStep
from edgetrain.models import create_model
from edgetrain.techniques import Freeze, FrozenChunks, FrozenInference, Int8Frozen, PatchExecute
from edgetrain.testing import seeded

F64_BOUND = 1e-14  # of max|y| (MKL float64 GEMM rounding by problem size)


def _mnv2(dtype: torch.dtype = torch.float32) -> nn.Module:
    return seeded(create_model("mobilenet_v2", num_classes=10, width_mult=0.35), 0, torch.float32).to(dtype).train()


def _unit(model: nn.Module, name: str = "features"):
    return model.get_submodule(name).forward.__self__  # the wrapper FrozenChunks installed


def _grads(model: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    with et.apply_(model, recipe, x):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the classifier's dropout draws the same mask
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("chunks", [2, 3, 8])
def test_mobilenet_v2_prefix_in_chunks_is_bit_exact_in_float32(chunks):
    model = _mnv2()
    x = torch.randn(7, 3, 32, 32)
    with et.apply_(model, [Freeze(last_k_blocks=2), FrozenChunks(chunks=chunks)], x):
        unit = _unit(model)
        assert unit.inner[0] is model.features[0] and unit.inner[-1] is model.features[16]  # blocks 17, 18 train
        with torch.no_grad():
            assert torch.equal(unit.wrapped(x), unit.run(x))


def test_mobilenet_v2_prefix_in_chunks_float64_within_rounding():
    model = _mnv2(torch.float64)
    x = torch.randn(5, 3, 33, 31, dtype=torch.float64)
    with et.apply_(model, [Freeze(last_k_blocks=3), FrozenChunks(chunks=2)], x):
        unit = _unit(model)
        with torch.no_grad():
            split, whole = unit.wrapped(x), unit.run(x)
    torch.testing.assert_close(split, whole, rtol=0, atol=F64_BOUND * float(whole.abs().max()))


@pytest.mark.parametrize("extra", [[], [FrozenInference()], [FrozenInference(), Int8Frozen()]])
def test_training_step_equals_the_unchunked_one(extra):
    """The trained blocks see the whole batch: loss and every gradient equal the same recipe without chunks."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    base = _mnv2()
    ref = _grads(copy.deepcopy(base), [Freeze(last_k_blocks=2), *extra], x, y)
    got = _grads(copy.deepcopy(base), [Freeze(last_k_blocks=2), *extra, FrozenChunks(chunks=4)], x, y)
    assert torch.equal(ref[0], got[0])
    assert ref[1].keys() == got[1].keys() and ref[1]
    for name in ref[1]:
        assert torch.equal(ref[1][name], got[1][name]), name


def test_a_lower_forward_peak_with_the_same_saved_bytes_and_a_predicted_peak():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    rows = []
    for recipe in ([Freeze(last_k_blocks=2), FrozenInference()],
                   [Freeze(last_k_blocks=2), FrozenInference(), FrozenChunks(chunks=8)]):
        model = _mnv2()
        recipe = et.Recipe(recipe, name="r", execution=et.Execution(fused_step=True))
        m = et.measure(model, (x, y), recipe=recipe, warmup=1, repeats=0)
        assert estimate(model, recipe, batch_size=16, example=x).saved_bytes == m.saved_bytes
        predicted = estimate(model, recipe, batch_size=16, example=x, peak=True).peak.bytes
        assert abs(predicted - m.peak_bytes) <= 1024, (predicted, m.peak_bytes)  # the loss's stand-in target
        rows.append(m)
    whole, chunked = rows
    assert chunked.saved_bytes == whole.saved_bytes
    state = sum(whole.peak_split[c] for c in ("weights_trainable", "weights_frozen", "buffers", "optimizer", "batch"))
    forward = [m.phase_peaks["forward"] - state for m in rows]
    assert forward[1] < 0.5 * forward[0], (whole.phase_peaks, chunked.phase_peaks)
    assert chunked.peak_bytes < whole.peak_bytes


def test_micro_batches_are_chunked_too():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    recipe = et.Recipe([Freeze(last_k_blocks=2), FrozenChunks(chunks=2)], name="r",
                       execution=et.Execution(micro_batches=2, fused_step=True, bn="frozen"))
    model = _mnv2()
    with et.apply_(model, recipe, x) as applied:
        hits = applied.parts[-1][1].hits
        opt = FusedStep(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9))
        from edgetrain.execution import run_step

        run_step(model, x, y, nn.functional.cross_entropy, opt, micro=2, bn="frozen")
        assert applied.parts[-1][1].hits - hits == 2  # one chunked forward per micro-batch
        opt.remove()


# ------------------------------------------------------------------------------------------------ other models
class Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))  # functional activation, residual


class NotSequential(nn.Module):
    """ResNet-like: a stem in the root's own forward, stages in a ModuleList, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList([Stage(8) for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for s in self.stages:
            x = s(x)
        return self.head(x.mean((2, 3)))


def test_a_model_without_sequential_gets_its_frozen_stages_chunked_one_by_one():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))
    base = seeded(NotSequential(), 0, torch.float32)
    recipe = [Freeze(targets=["stages.2", "head"], classifier=False)]
    ref = _grads(copy.deepcopy(base), recipe, x, y)
    model = copy.deepcopy(base)
    with et.apply_(model, [*recipe, FrozenChunks(chunks=3)], x) as applied:
        assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == {"stages.0", "stages.1"}
        hits = applied.parts[-1][1].hits
        model(x)
        assert applied.parts[-1][1].hits - hits == 2  # each frozen stage, once
    got = _grads(model, [*recipe, FrozenChunks(chunks=3)], x, y)
    assert torch.equal(ref[0], got[0])
    for name in ref[1]:
        assert torch.equal(ref[1][name], got[1][name]), name
    assert not any("forward" in m.__dict__ for m in model.modules())  # removed


def test_a_frozen_part_that_cannot_be_chunked_is_left_whole_and_the_rest_is_chunked():
    torch.manual_seed(0)
    model = seeded(NotSequential(), 0, torch.float32).train()
    model.stages[1].conv = nn.Sequential(model.stages[1].conv, nn.Dropout(0.5))  # random numbers in train mode
    x = torch.randn(6, 3, 12, 12)
    with et.apply_(model, [Freeze(targets=["stages.2", "head"], classifier=False), FrozenChunks(chunks=3)], x):
        assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == {"stages.0"}
        model(x)  # trains: stages.1 runs whole, its dropout as without chunks


def _same_forward(model: nn.Module, recipe, x: torch.Tensor, chunks: int = 3) -> list:
    """The recipe with FrozenChunks computes, in train mode, what it computes without (float rounding of a dense conv
    on another batch size aside); returns the hits of FrozenChunks in that forward."""
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    with et.apply_(ref, recipe, x), torch.no_grad():
        want = ref(x.clone())
    with et.apply_(model, [*recipe, FrozenChunks(chunks=chunks)], x) as applied, torch.no_grad():
        hits = applied.parts[-1][1].hits
        got = model(x.clone())
        hits = applied.parts[-1][1].hits - hits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    return hits


def test_a_forward_hook_on_a_chunked_module_runs_once_per_call():
    model = seeded(NotSequential(), 0, torch.float32).train()
    calls = []
    model.stages[0].register_forward_hook(lambda mod, i, o: (calls.append(o.shape[0]), o * 2)[1])
    x = torch.randn(6, 3, 12, 12)
    recipe = [Freeze(targets=["stages.2", "head"], classifier=False)]
    assert _same_forward(model, recipe, x) == 2  # stages.0 and stages.1, each in chunks
    with et.apply_(model, [*recipe, FrozenChunks(chunks=3)], x):
        calls.clear()
        model(x)
    assert calls == [6]  # the hook saw the whole batch once, never a chunk


class TakesScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = Stage(8)

    def forward(self, x, scale):
        return self.stage(x) * scale.view(1, -1, 1, 1)


class WithScale(NotSequential):
    def __init__(self) -> None:
        super().__init__()
        self.scaled = TakesScale()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        x = self.scaled(torch.relu(self.stem(x)), self.scale)
        for s in self.stages:
            x = s(x)
        return self.head(x.mean((2, 3)))


def test_a_module_called_with_other_tensors_runs_whole():
    """Its other tensor (here of size 8, the batch size) cannot be told apart from a batched one: not chunked."""
    model = seeded(WithScale(), 0, torch.float32).train()
    hits = _same_forward(model, [Freeze(targets=["stages.2", "head"], classifier=False)], torch.randn(8, 3, 12, 12), 4)
    assert hits == 2  # stages.0 and stages.1 chunked; `scaled` (called with the scale tensor) ran whole


def test_an_identity_child_an_in_place_first_op_eval_dropout_and_an_empty_batch():
    model = nn.Sequential(nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.Dropout(0.5).eval()),
                          nn.Identity(), nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Flatten(), nn.Linear(64, 3))
    model[:3].requires_grad_(False)
    x = torch.randn(5, 3, 8, 8)
    assert _same_forward(model, [], x) == 1
    with et.apply_(model, [FrozenChunks(chunks=2)], x):
        assert "forward" in model.__dict__  # the root Sequential's run 0..3 is chunked
        assert model(torch.randn(0, 3, 8, 8)).shape == (0, 3)


def test_refuses_running_statistics_updated_per_chunk():
    """InstanceNorm with tracked statistics updates them with each chunk's mean: its output per sample is the same,
    its buffers are not; the probe compares both."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)),
                          nn.Flatten(), nn.Linear(144, 3)).train()
    model[0].requires_grad_(False)
    _refused(model, FrozenChunks(), torch.randn(2, 3, 8, 8), "update their buffers")


class SignHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.fc = nn.Linear(144, 3)

    def forward(self, x):
        return self.fc((self.body(x) > 0).float().flatten(1))  # a boolean map between the frozen and trained parts


def test_a_boolean_output_is_compared_and_chunked():
    model = SignHead()
    model.body.requires_grad_(False)
    x = torch.randn(5, 3, 8, 8)
    assert _same_forward(model, [], x) == 1


# ------------------------------------------------------------------------------------------------ refusals
def _refused(model: nn.Module, recipe, x: torch.Tensor, match: str) -> str:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(et.ConfigError, match=match) as e:
        et.apply_(model, recipe, x)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("FrozenChunks"), msg
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return msg


def test_refuses_a_model_whose_first_layer_trains():
    _refused(_mnv2(), FrozenChunks(), torch.randn(2, 3, 32, 32), "no frozen modules before the first op that trains")


def test_refuses_a_model_where_nothing_trains():
    model = _mnv2().requires_grad_(False)
    _refused(model, FrozenChunks(), torch.randn(2, 3, 32, 32), "nothing in the model trains")


def test_refuses_batch_statistics():
    model = _mnv2()
    model.features[:10].requires_grad_(False)  # frozen by hand: BatchNorms still normalise with batch statistics
    _refused(model, FrozenChunks(), torch.randn(2, 3, 32, 32), "batch statistics")


def test_refuses_an_op_that_mixes_samples():
    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Centre(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 3, 8, 8))
    model[0].requires_grad_(False)
    _refused(model, FrozenChunks(targets=["0", "1"]), torch.randn(2, 3, 8, 8), "mixes samples")


def test_refuses_dropout_in_the_prefix():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)), nn.Flatten(), nn.Linear(144, 3))
    model[0].requires_grad_(False)
    _refused(model.train(), FrozenChunks(), torch.randn(2, 3, 8, 8), "draws random numbers")


def test_refuses_targets_that_are_not_consecutive_children_of_a_sequential():
    model = _mnv2()
    msg = _refused(model, [Freeze(last_k_blocks=2), FrozenChunks(targets=["features.1", "features.3"])],
                   torch.randn(2, 3, 32, 32), "not consecutive children")
    assert "features.1" in msg


def test_conflicts_with_patch_execute():
    with pytest.raises(et.ConfigError, match="patch_execute|frozen_chunks"):
        et.apply_(_mnv2(), [Freeze(last_k_blocks=2), PatchExecute(blocks=2), FrozenChunks()],
                  torch.randn(2, 3, 32, 32))


def test_bad_config():
    with pytest.raises(et.ConfigError, match="chunks"):
        FrozenChunks(chunks=1)
