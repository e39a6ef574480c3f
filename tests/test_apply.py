from __future__ import annotations

import pytest
import torch

import edgetrain as et
from edgetrain.apply import select
from edgetrain.structure import analyze
from edgetrain.testing import tiny_batch, tiny_model


def test_select_globs_in_model_order():
    model = tiny_model()
    assert select(model, ["features.*.0"]) == ["features.0.0", "features.1.0", "features.2.0"]
    structure = analyze(model, tiny_batch()[0])
    assert select(model, ["features.2.*"], frozenset({"batch_norm"}), structure) == ["features.2.1"]


def test_unknown_target_is_an_error_that_shows_real_names():
    with pytest.raises(et.ConfigError, match="'feature.9' matches no module of TinyConvNet; names look like features"):
        et.apply_(tiny_model(), et.Freeze(targets=["feature.9"]))


def test_target_of_wrong_layer_type_is_an_error():
    with pytest.raises(et.ConfigError, match="select no"):
        et.apply_(tiny_model(), et.BiasOnly(targets=["pool"]))


def test_blocks_and_classifier_come_from_the_ops():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 4))
    s = analyze(seq, torch.randn(2, 2))
    assert s.blocks == ["0"] and s.classifier == "2"  # the ReLU has no parameters, the classifier is the head
    with pytest.raises(et.ConfigError, match="Freeze.classifier: Sequential has no linear op"):
        et.apply_(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()), et.Freeze(),
                  torch.randn(2, 1, 2, 2)) if False else et.apply_(torch.nn.Sequential(torch.nn.BatchNorm1d(3)),
                                                                   et.Freeze(), torch.randn(2, 3))


def test_apply_needs_an_example_for_a_model_without_an_input_size():
    with pytest.raises(et.ConfigError, match="pass example="):
        et.apply_(torch.nn.Sequential(torch.nn.Linear(2, 2)), et.Freeze())


def test_conflicting_techniques_are_rejected():
    with pytest.raises(et.ConfigError, match="conflicts"):
        et.apply_(tiny_model(), [et.Freeze(), et.BiasOnly()])


def test_failed_apply_rolls_back_what_was_applied():
    model = tiny_model()
    with pytest.raises(et.ConfigError, match="last_k_blocks"):
        et.apply_(model, [et.Checkpoint(), et.Freeze(last_k_blocks=9)])
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_two_techniques_on_one_module_is_an_error():
    with pytest.raises(et.ConfigError, match="patched forward"):
        et.apply_(tiny_model(), [et.Checkpoint(targets=["features.0"]), et.Checkpoint(targets=["features.0"])])


def test_freeze_last_k_blocks_trains_exactly_those():
    model = tiny_model()
    with et.apply_(model, et.Freeze(last_k_blocks=1)):
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert trainable == ["classifier.bias", "classifier.weight", "features.2.0.weight", "features.2.1.bias",
                             "features.2.1.weight"]
        x, y = tiny_batch()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert model.features[0][0].weight.grad is None
    assert all(p.requires_grad for p in model.parameters())


def test_bias_only_trains_biases_and_classifier():
    model = tiny_model()
    et.apply_(model, et.BiasOnly())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"features.0.1.bias", "features.1.1.bias", "features.2.1.bias", "classifier.weight",
                         "classifier.bias"}


def _registered(info):
    """Register a throwaway technique for one test (the registry is global)."""
    from edgetrain import registry

    registry.register(info)
    return lambda: registry._REGISTRY.pop(info.name)


def test_a_technique_that_changes_the_output_is_refused_and_undone():
    """apply_'s probe check: a lossless technique that changes what the model computes does not apply."""
    import dataclasses

    from edgetrain.ops import Undo, intercept

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Doubler(et.Technique):
        name = "doubler_for_test"

    def apply(model, cfg, targets, structure):
        undo = Undo()
        intercept(model, ("linear",), lambda call: call.proceed() * 2, undo)  # a wrong "lossless" rewrite
        return undo

    unregister = _registered(et.TechniqueInfo(config=Doubler, apply=apply, summary="x", paper="x",
                                              reduces=frozenset({"compute"})))
    try:
        model = tiny_model().eval()
        x = tiny_batch()[0]
        before = model(x)
        with pytest.raises(et.ConfigError, match="changes what TinyConvNet computes in eval mode .* is lossless"):
            et.apply_(model, Doubler())
        assert torch.equal(model(x), before)  # undone: the handler is gone
    finally:
        unregister()


def test_a_technique_that_does_nothing_is_refused():
    import dataclasses

    from edgetrain.ops import Undo, intercept

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Idle(et.Technique):
        name = "idle_for_test"

    def apply(model, cfg, targets, structure):
        undo = Undo()
        intercept(model, ("embedding",), lambda call: call.proceed(), undo)  # TinyConvNet has no embedding
        return undo

    unregister = _registered(et.TechniqueInfo(config=Idle, apply=apply, summary="x", paper="x",
                                              reduces=frozenset({"compute"}), looks_for="embedding layers"))
    try:
        with pytest.raises(et.ConfigError, match="Idle: found nothing to act on in TinyConvNet \\(it looks for "
                                                 "embedding layers\\)"):
            et.apply_(tiny_model(), Idle())
    finally:
        unregister()
