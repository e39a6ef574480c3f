"""LoRA: the conv update's composed kernel, targets, refusals, and what it saves (gradients against plain PyTorch and
merge() equality for every weight adapter: tests/techniques/test_adapters.py)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.models import create_model
from edgetrain.techniques import LoRA
from edgetrain.techniques.lora import delta


def _adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if "lora_A" in m._parameters}


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _adapters(model).values():  # B starts at zero: give the test a non-trivial update
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype))


def test_delta_of_a_conv_is_the_composed_kernel():
    """B (1x1) after A (k x k) is one k x k convolution with kernel B @ A."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False).double()
    conv.lora_A = nn.Parameter(torch.randn(2, 3, 3, 3, dtype=torch.float64))
    conv.lora_B = nn.Parameter(torch.randn(5, 2, 1, 1, dtype=torch.float64))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    two = nn.functional.conv2d(nn.functional.conv2d(x, conv.lora_A, None, 2, 1), conv.lora_B)
    one = nn.functional.conv2d(x, delta(conv, 1.0), None, 2, 1)
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


def test_mobilenet_v2_adapts_dense_convs_and_skips_depthwise_ones_and_saves_less_than_plain():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    plain = et.measure(model, batch, repeats=0)
    with et.apply_(model, LoRA(rank=4), batch[0]):
        adapters = _adapters(model)
        assert adapters and all(m.groups == 1 for m in adapters.values() if isinstance(m, nn.Conv2d))
        depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise and not set(depthwise) & set(adapters)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = et.measure(model, batch, recipe=LoRA(rank=4), repeats=0)
    assert trainable < 0.5 * sum(p.numel() for p in model.parameters())
    assert m.saved_bytes < plain.saved_bytes, (m.saved_bytes, plain.saved_bytes)
    assert m.grad_bytes < plain.grad_bytes and m.optimizer_bytes < plain.optimizer_bytes


def test_transformers_attention_and_mlp_linears_by_glob():
    from edgetrain.models.foreign import ensure_torchvision

    transformers = pytest.importorskip("transformers")
    ensure_torchvision()  # transformers imports torchvision when it is installed
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    ids = torch.randint(0, 64, (2, 8))
    recipe = et.Recipe([LoRA(rank=2)], name="bert-lora", targets=["*attention.self.query", "*attention.self.value",
                                                                   "*intermediate.dense"])
    with et.apply_(model, recipe, {"input_ids": ids}):
        names = sorted(_adapters(model))
        assert len(names) == 6 and all(n.endswith(("query", "value", "intermediate.dense")) for n in names)
        out = model(input_ids=ids, labels=torch.tensor([0, 1]))
        out.loss.backward()
        assert all(m.lora_B.grad is not None for m in _adapters(model).values())


def test_refuses_a_named_grouped_conv_and_bad_configs():
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    with pytest.raises(et.ConfigError, match="grouped convolution") as e:
        et.apply_(model, LoRA(targets=["features.1.conv.0.0"]), torch.randn(2, 3, 32, 32))
    assert "\n" not in str(e.value)
    assert not _adapters(model) and all(p.requires_grad for p in model.parameters())
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"classifier": "yes"}):
        with pytest.raises(et.ConfigError):
            LoRA(**bad)
