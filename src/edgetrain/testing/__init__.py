"""Public test helpers: tiny seeded models and reference comparisons used by the conformance suite.

Third-party techniques can run the same checks on themselves.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class TinyConvNet(nn.Module):
    """Three conv-BN-ReLU blocks (one depthwise, one with dropout) and a linear classifier, for 8x8 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, groups: int = 1, p: float = 0.0) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *( [nn.Dropout(p)] if p else []))

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, width, stride=2, groups=width),
            block(width, 2 * width, p=0.1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        self.block_names = ["features.0", "features.1", "features.2"]
        self.classifier_name = "classifier"
        self.default_input_size, self.in_channels = 8, in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))  # (N, num_classes)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyConvNet:
    """A seeded :class:`TinyConvNet` with non-trivial BatchNorm statistics and affine parameters."""
    return seeded(TinyConvNet(), seed, dtype)


def seeded(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` with every parameter drawn from a seeded normal (std 0.3) and non-trivial BatchNorm running
    statistics, in ``dtype``: the test nets' common initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.to(dtype)


def model_for(info, dtype: torch.dtype = torch.float32) -> nn.Module:  # noqa: ANN001
    """The small seeded model the conformance suite applies a technique's examples to."""
    return info.example_model(dtype) if info.example_model is not None else tiny_model(dtype=dtype)


def tiny_batch(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def frozen_reference(original: nn.Module, applied: nn.Module) -> nn.Module:
    """A plain copy of ``original`` with ``applied``'s trainable set, frozen-weight BatchNorms in eval mode.

    This is the exact semantics of freezing: what a technique that only freezes must reproduce.
    """
    ref = copy.deepcopy(original)
    flags = {n: p.requires_grad for n, p in applied.named_parameters()}
    for n, p in ref.named_parameters():
        p.requires_grad_(flags[n])
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()
    return ref


def step_grads(model: nn.Module, batch: tuple[Tensor, Tensor], seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and gradients of one forward/backward (dropout seeded), without an optimizer step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def model_state(model: nn.Module) -> dict[str, object]:
    """Everything :func:`edgetrain.apply_` + ``remove`` must leave unchanged."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "patched": sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        "training": {n: m.training for n, m in model.named_modules()},
    }


def kron_block_reference(ref: nn.Module, applied: nn.Module) -> None:
    """Give ``ref`` (a plain copy of the model ``applied`` came from) the KronA^B branches of ``applied``'s blocks,
    computed by forming ``kron(A, B)``: the adapters become parameters of ``ref``'s blocks with the same names and
    values, and a forward hook adds ``s * x @ kron(A, B)^T (+ lambda x)`` on the features to the block's output."""
    from torch.utils._pytree import tree_flatten

    from edgetrain.techniques.krona_block import BLOCKS

    for name, block in applied.named_modules():
        if block not in BLOCKS:
            continue
        scale, dim = BLOCKS[block]
        target = ref.get_submodule(name)
        for k in ("krona_A", "krona_B", "krona_lambda"):
            if k in block._parameters:
                target.register_parameter(k, nn.Parameter(getattr(block, k).detach().clone()))

        def hook(m: nn.Module, args, kwargs, out, scale=scale, dim=dim):  # noqa: ANN001, ANN202
            x = next(t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor))
            k = torch.kron(m.krona_A, m.krona_B)
            extra = scale * (x.movedim(dim, -1) @ k.T).movedim(-1, dim)
            if "krona_lambda" in m._parameters:
                extra = extra + m.krona_lambda * x
            return (out[0] + extra, *out[1:]) if isinstance(out, tuple) else out + extra

        target.register_forward_hook(hook, with_kwargs=True)


def lite_residual_reference(ref: nn.Module, applied: nn.Module) -> None:
    """Give ``ref`` (a plain copy of the model ``applied`` came from) independent copies of ``applied``'s TinyTL
    branches in the authors' form: each block's output plus ``interpolate(lite(x))`` (always resized, bilinear),
    the copy's parameters registered on ``ref``'s block under the technique's names (``lite_residual_<path>``)."""
    from edgetrain.techniques.lite_residual import ATTR, BRANCHES

    for name, block in applied.named_modules():
        if block not in BRANCHES:
            continue
        lite = copy.deepcopy(BRANCHES[block][0])
        target = ref.get_submodule(name)
        for path, p in lite.named_parameters():
            target.register_parameter(f"{ATTR}_{path.replace('.', '_')}", p)

        def hook(m: nn.Module, args, out, lite=lite, block=block):  # noqa: ANN001, ANN202
            lite.train(block.training)  # as the applied block runs it (ref's frozen BatchNorms are put in eval mode)
            return out + torch.nn.functional.interpolate(lite(args[0]), size=out.shape[2:], mode="bilinear",
                                                         align_corners=False)

        target.register_forward_hook(hook)
