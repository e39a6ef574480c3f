"""The foreign zoo: models edgetrain did not write, to hold every technique to "any model" (issue: generality).

Each entry builds a small, seeded model (no weights are downloaded) and an example batch ``(inputs, target)``:

* ``efficientnet``: timm ``tf_efficientnet_b0``: ``Conv2dSame`` convolutions that pad TF-"SAME" in their own
  forward, SiLU, squeeze-excite with a sigmoid gate, ``BatchNormAct2d``, blocks in nested ``Sequential`` stages;
* ``mobilenetv3``: timm ``mobilenetv3_small_050``: hard-swish, squeeze-excite with hard-sigmoid, ReLU;
* ``resnet``: timm ``resnet18`` (in-place ReLU, residual ``BasicBlock``);
* ``vit``: timm ``vit_tiny_patch16_224`` at 32 px with 8 px patches: GELU, LayerNorm, fused attention
  (``F.scaled_dot_product_attention``), a class token and position embedding that are root parameters;
* ``bert``: a ``transformers`` ``BertForSequenceClassification`` built from a config (2 layers, width 64), called
  with ``input_ids`` and an ``attention_mask`` that pads part of a sequence, with attention and hidden dropout;
* ``audio``: a hand-written Conv1d net on raw waveforms (M5-like, Dai et al. 2017);
* ``functional``: a hand-written CNN with a ``Conv2d`` subclass that pads in its own forward, ``F.relu6`` and
  ``F.gelu`` called in forwards, a third-party-style activation class, and its blocks in a ``ModuleList``.

The timm and transformers entries need those packages (test extras); :func:`available` lists what can be built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Any, Tensor]]  # batch size -> (inputs, target)
    needs: str | None = None  # the package it needs
    description: str = ""


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights whatever the global RNG (timm/transformers initialise from it): re-draw every
    floating-point parameter from a local generator with the scale it has, and give BatchNorms real statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * (std if std > 0 else 0.1) + (1.0 if std == 0 and
                                                                                     float(p.mean()) == 1.0 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().train()


def _images(n: int, size: int = 32, classes: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _images64(n: int) -> tuple[Tensor, Tensor]:
    return _images(n, 64)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from edgetrain.models.foreign import import_timm

        return _seeded(import_timm().create_model(name, pretrained=False, num_classes=10, **kwargs))

    return build


def _bert() -> nn.Module:
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()  # transformers imports torchvision when it is installed
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=4, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    return _seeded(BertForSequenceClassification(cfg))


def _tokens(n: int, seq: int = 16, seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::2, seq * 3 // 4:] = 0  # every other sequence is padded
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 4, (n,), generator=g)


class AudioNet(nn.Module):
    """An M5-like raw-waveform classifier (Dai et al., Very Deep CNNs for Raw Waveforms, ICASSP 2017)."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        chans = [1, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            k, s = (80, 4) if i == 0 else (3, 1)
            layers += [nn.Conv1d(chans[i], chans[i + 1], k, s), nn.BatchNorm1d(chans[i + 1]), nn.ReLU(),
                       nn.MaxPool1d(4 if i < 3 else 1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(-1))  # (N, classes)


def _waves(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1600, generator=g), torch.randint(0, 10, (n,), generator=g)


class PadSameConv2d(nn.Conv2d):
    """A ``Conv2d`` subclass that pads TF-"SAME" in its own forward, then calls ``F.conv2d`` with padding 0."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class QuickGELU(nn.Module):
    """A library's own activation class (as CLIP's): ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class FunctionalBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.act = QuickGELU()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.bn1(self.expand(x)))  # a functional activation
        h = self.act(self.bn2(self.dw(h)))
        return x + F.gelu(self.project(h))  # residual, functional GELU


class FunctionalNet(nn.Module):
    def __init__(self, classes: int = 10, c: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = PadSameConv2d(3, c, 3, stride=2)
        self.stem_bn = nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(FunctionalBlock(c) for _ in range(depth))
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (N, classes)


ZOO: dict[str, ZooModel] = {z.name: z for z in (
    # ImageNet CNNs at 64 px: at 32 px their last stages are 1x1 maps whose train-mode BatchNorm over a few samples
    # makes gradients ill-conditioned
    ZooModel("efficientnet", _timm("tf_efficientnet_b0"), _images64, "timm",
             "timm tf_efficientnet_b0 (Conv2dSame, SiLU, SE), 64 px"),
    ZooModel("mobilenetv3", _timm("mobilenetv3_small_050"), _images64, "timm",
             "timm mobilenetv3_small_050 (hard-swish, SE), 64 px"),
    ZooModel("resnet", _timm("resnet18"), _images64, "timm", "timm resnet18, 64 px"),
    ZooModel("vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), _images, "timm",
             "timm vit_tiny at 32 px, 8 px patches (GELU, LayerNorm, SDPA)"),
    ZooModel("bert", _bert, _tokens, "transformers",
             "transformers BERT from a config (2x64, attention mask, dropout)"),
    ZooModel("audio", lambda: _seeded(AudioNet()), _waves, None, "Conv1d waveform net (M5-like)"),
    ZooModel("functional", lambda: _seeded(FunctionalNet()), _images, None,
             "hand-written: Conv2d subclass padding in forward, F.relu6/F.gelu, ModuleList blocks"),
)}


def available() -> list[str]:
    """The zoo entries whose packages are installed."""
    import importlib.util

    return [n for n, z in ZOO.items() if z.needs is None or importlib.util.find_spec(z.needs) is not None]


# ------------------------------------------------------------------------------------------------ evaluation
def zoo_configs(structure) -> dict[str, Any]:  # noqa: ANN001
    """The config each registered technique is tried with on a zoo model (a function of the model's structure
    where the config names layers). Every registered technique must have one (the zoo test checks)."""
    from edgetrain.recipe import Recipe
    from edgetrain.techniques import (ActNN, ApproxMultiply, BiasOnly, BNNEdge, Checkpoint, Comet, Freeze,
                                      FrozenChunks, FrozenInference, GradientFilter, Int8, Int8Frozen, KronA,
                                      KronABlock, LightNorm, LiteResidual, LoRA, MobileTL,
                                      SmartDeal, SparseUpdate)
    from edgetrain.techniques.sparse_update import layers

    trained = layers(structure)
    return {
        "freeze": Freeze(last_k_blocks=2),
        "bias_only": BiasOnly(),
        "checkpoint": Checkpoint(),
        "gradient_filter": GradientFilter(radius=2, last_n_convs=2),
        "actnn": ActNN(),
        "mobiletl": MobileTL(last_k_blocks=2),
        "comet": Comet(eb=1e-3, adaptive=False),
        "bnn_edge": BNNEdge(),
        "sparse_update": SparseUpdate(bias_last_k=min(4, len(trained)), weights={trained[-1]: 0.5} if trained else {}),
        "int8": Int8(),
        # the simulated multiplier is slow on depthwise convs (one GEMM per group): the last two layers
        "approx_multiply": ApproxMultiply(targets=[n for n in structure.layers_of(("linear", "conv2d"))][-2:] or None),
        # execution of the frozen part: after the freezing technique they need
        "frozen_inference": Recipe([Freeze(last_k_blocks=2), FrozenInference()], name="frozen_inference"),
        "int8_frozen": Recipe([Freeze(last_k_blocks=2), Int8Frozen()], name="int8_frozen"),
        "frozen_chunks": Recipe([Freeze(last_k_blocks=2), FrozenChunks(chunks=2)], name="frozen_chunks"),
        "lora": LoRA(rank=2),
        "krona": KronA(),
        "krona_block": KronABlock(),
        "lite_residual": LiteResidual(),
        # range BN is another normaliser (its gradients are not plain BN's by design; reference tests in
        # tests/test_lightnorm.py): the zoo holds the low-bit arithmetic and BFP against plain BatchNorm
        "lightnorm": LightNorm(range_bn=False),
        "patch_execute": __import__("edgetrain.techniques", fromlist=["PatchExecute"]).PatchExecute(blocks=2),
        # LSQ at 16 bits: a rounding of the same network (Yu21 renormalises the weights: another function by design;
        # at 8 bits LSQ's clipping takes gradients away, techniques/mebqat.py); its learned steps have no counterpart
        # in plain PyTorch and are left out of the gradient comparison
        "mebqat": __import__("edgetrain.techniques", fromlist=["MEBQAT"]).MEBQAT(method="lsq", weight_bits=16,
                                                                                 act_bits=16),
        # SED (two starts per block) of every layer of the larger zoo models costs a minute of suite time: the last
        # six convs and linears (tests/techniques/test_smartdeal.py runs whole models)
        "smartdeal": SmartDeal(iterations=3, targets=structure.layers_of(("linear", "conv2d"))[-6:] or None),
    }


def _grads(model: nn.Module, inputs: Any, target: Tensor, seed: int = 0) -> tuple[float, dict[str, Tensor]]:
    from edgetrain.inputs import call_model
    from edgetrain.measure import default_loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for the technique and the reference
    loss = default_loss(call_model(model, inputs), target)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _as_reference(model: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients in the reference's terms: int8's dL/dW̄ times s_W is dL/dW (with QAS; the technique's scaling
    shows as a cosine below 1 without it), a sparse update's ``weight_part`` is the kept slice of ``weight``."""
    out = dict(grads)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        scale = m._buffers.get("weight_scale")
        if scale is not None and f"{prefix}weight" in out:
            out[f"{prefix}weight"] = out[f"{prefix}weight"] * scale.view(-1, *([1] * (m.weight.dim() - 1)))
        if f"{prefix}weight_part" in out:
            out[f"{prefix}weight_part"] = out.pop(f"{prefix}weight_part")
    return out


class _Proxy:
    """Stands in for an adapted layer in ``Adapter.delta``: its weight's shape and the given parameter values."""

    def __init__(self, weight: Tensor, values: dict[str, Tensor]) -> None:
        self.weight = weight.detach().double()
        self.__dict__.update(values)


def _adapter_of(model: nn.Module, name: str) -> Any:
    from edgetrain.techniques._adapter import ADAPTERS

    owner, _, leaf = name.rpartition(".")
    ad = ADAPTERS.get(model.get_submodule(owner)) if owner else None
    return ad if ad is not None and leaf in ad.params else None


def _compare(model: nn.Module, got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, float]:
    """(relative L2 error, cosine) of all trained gradients as one vector against the reference's."""
    a, b = [], []
    for name, g in got.items():
        if ".mebqat_" in name and name not in ref:  # MEBQAT's LSQ steps: parameters plain PyTorch has no analogue of
            continue
        if name.endswith("weight_part"):
            layer = model.get_submodule(name.rpartition(".")[0])
            dim = 1 if g.shape[1] != layer.weight.shape[1] or layer.weight.shape[1] != 1 else 0
            r = ref[name.replace("weight_part", "weight")].index_select(dim, layer.weight_keep)
        elif name.endswith((".sd_C", ".sd_B")):  # SmartDeal: the STE chain rule at the rebuilt weights
            from edgetrain.techniques.smartdeal import chain_grads

            owner, _, leaf = name.rpartition(".")
            r = chain_grads(model.get_submodule(owner), ref[f"{owner}.weight"])[leaf == "sd_B"]
        elif (ad := _adapter_of(model, name)) is not None:  # W + s * delta(theta): chain rule through delta
            layer = model.get_submodule(name.rpartition(".")[0])
            theta = getattr(layer, name.rpartition(".")[2]).detach().double().requires_grad_(True)
            with torch.no_grad():
                values = {k: getattr(layer, k).detach().double() for k in ad.params}
            values[name.rpartition(".")[2]] = theta
            proxy = _Proxy(layer.weight, values)
            gw = ref[f"{name.rpartition('.')[0]}.weight"].double()
            (r,) = torch.autograd.grad(ad.delta(proxy), theta, grad_outputs=ad.scale * gw)
        else:
            r = ref[name]
        a.append(g.flatten().double())
        b.append(r.flatten().double())
    if not a:
        return float("nan"), float("nan")
    ga, gb = torch.cat(a), torch.cat(b)
    err = float((ga - gb).norm() / gb.norm().clamp_min(1e-30))
    cos = float(ga @ gb / (ga.norm() * gb.norm()).clamp_min(1e-30))
    return err, cos


def evaluate(entry: ZooModel, cfg: Any, batch_size: int = 4, model: nn.Module | None = None) -> dict[str, Any]:
    """Try one technique config on one zoo model; returns what happened and what was measured.

    ``outcome`` is ``"works"`` (applied, checked by ``apply_``, trained one step, removed) or ``"refused"`` with
    the one-line ``reason``. Measured: ``plain_saved`` / ``saved`` bytes (the meter's saved-tensor hooks, one
    training forward), ``estimate`` (the cost model at the same batch, ``None`` without one), gradient
    ``grad_error`` (relative L2) and ``grad_cosine`` against plain PyTorch with the technique's trainable set,
    and whether ``remove()`` restored the model (``restored``).
    """
    import copy

    import edgetrain as et
    from edgetrain.cost import estimate
    from edgetrain.inputs import call_model, tensors
    from edgetrain.measure import SavedTensorMeter, default_loss
    from edgetrain.registry import get
    from edgetrain.techniques.smartdeal import dense_reference
    from edgetrain.testing import frozen_reference, kron_block_reference, lite_residual_reference

    original = model if model is not None else entry.build()
    inputs, target = entry.batch(batch_size)
    from edgetrain.recipe import as_recipe

    recipe = as_recipe(cfg)
    last = recipe.techniques[-1]  # a recipe tries its last technique on top of the ones before
    row: dict[str, Any] = {"model": entry.name, "technique": last.name, "config": recipe.to_dict()}
    work = copy.deepcopy(original)
    state = {k: v.clone() for k, v in work.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in work.modules())
    work.eval()
    out_before = [t.detach() for t in tensors(call_model(work, inputs))]
    work.train()
    try:
        handle = et.apply_(work, cfg, inputs)
    except et.EdgetrainError as e:
        return {**row, "outcome": "refused", "reason": str(e)}
    row["outcome"] = "works"
    with SavedTensorMeter(work) as meter:
        out = call_model(work, inputs)
        default_loss(out, target)
    row["saved"] = meter.total_bytes
    del out
    _, got = _grads(work, inputs, target)
    ref_model = frozen_reference(original, work)
    kron_block_reference(ref_model, work)  # KronA^B's branches, with the Kronecker matrix formed
    lite_residual_reference(ref_model, work)  # TinyTL's branches as plain modules
    dense_reference(ref_model, work)  # SmartDeal's rebuilt weights as plain weights
    trained = dict(work.named_parameters())
    for n, p in ref_model.named_parameters():  # a partial-weight or adapted layer's reference trains the whole weight
        if n.endswith(".weight") and any(f"{n.rpartition('.')[0]}.{k}" in trained for k in ("weight_part", "lora_A", "krona_A")):
            p.requires_grad_(True)
    _, ref = _grads(ref_model, inputs, target)
    row["grad_error"], row["grad_cosine"] = _compare(work, _as_reference(work, got), ref)
    handle.remove()
    work.zero_grad(set_to_none=True)
    after = work.state_dict()
    moving = ("running", "num_batches")  # BatchNorm statistics move in the training step
    tol = max(get(c).remove_tolerance for c in recipe.techniques)  # the rounding a technique states when it keeps
    # no copy of the originals

    def same(a: Tensor, b: Tensor) -> bool:
        return torch.equal(a, b) if not tol else bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())))

    same_state = all(same(after[k], v) for k, v in state.items() if not any(m in k for m in moving))
    work.load_state_dict(state)
    work.eval()
    same_out = all(same(b.detach(), a) for a, b in zip(out_before, tensors(call_model(work, inputs))))
    same_hooks = hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in work.modules())
    row["restored"] = bool(same_state and same_out and same_hooks and all(p.requires_grad for p in work.parameters()))
    plain = copy.deepcopy(original)
    with SavedTensorMeter(plain) as meter:
        default_loss(call_model(plain, inputs), target)
    row["plain_saved"] = meter.total_bytes
    try:
        row["estimate"] = estimate(copy.deepcopy(original), cfg, batch_size=batch_size, example=inputs).saved_bytes
    except et.ConfigError:
        row["estimate"] = None
    return row
