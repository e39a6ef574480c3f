"""BNN training on the edge: binary activations kept binary for backward, low-precision everything else.

Wang, Davis, Moro, Zielinski, Lim, Coelho, Chatterjee, Cheung, Constantinides, *Enabling Binary Neural
Network Training on the Edge*, ACM TECS 2023 (DOI 10.1145/3626100), arXiv:2102.04270 (official code
``awai54st/Enabling-Binary-Neural-Network-Training-on-the-Edge``; spec algorithms_A §4).

The model is a standard binary network (Courbariaux & Bengio, BinaryNet, arXiv:1602.02830) built from
:class:`BinaryLinear` / :class:`BinaryConv2d` (weights binarised by ``sign`` with a clip STE),
:class:`SignActivation` (``sign`` with the hardtanh STE) and ``nn.BatchNorm1d/2d``. Its stock forwards keep
every saved tensor in fp32. The :class:`BNNEdge` technique patches them to store, for backward:

* binary layer input: ``sign(x)`` bit-packed (1 bit; the first layer keeps its real input);
* sign activation: the STE mask ``1[|x| <= 1]`` bit-packed (1 bit);
* BatchNorm -> l1 BatchNorm (beta only, gamma frozen): ``sign(x_hat)`` bit-packed plus per-channel sigma_1 and
  kappa = mean|x_hat| (fp16-rounded), with the paper's approximate backward
  ``dx = (dy - mean(dy) - s * kappa * mean(dy * s)) / sigma_1``; running statistics keep mu and sigma_1;
* binary layer weights: fp16 latent weights (so fp16 gradients and, with Adam, fp16 optimizer state);
  incoming gradients are rounded to fp16 (``x.half().float()`` emulation, spec §4.5).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, patch_forward, set_requires_grad
from edgetrain.compress.bitpack import pack_mask, unpack_mask
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check


def _sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)  # sign(0) = +1 (paper)


def _ste_sign(x: Tensor) -> Tensor:
    """sign(x) forward, hardtanh gradient (saves x in fp32 through hardtanh: the standard way)."""
    h = F.hardtanh(x)
    return h + (_sign(x) - h).detach()


class SignActivation(nn.Module):
    """Binary activation ``sign(x)`` with the straight-through estimator ``1[|x| <= 1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return _ste_sign(x)


class BinaryLinear(nn.Linear):
    """Linear layer with ``sign(clip(W))`` weights (no bias). ``first_layer`` marks a real-valued input."""

    def __init__(self, in_features: int, out_features: int, first_layer: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.first_layer = first_layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _ste_sign(self.weight).to(x.dtype))  # (N, out)


class BinaryConv2d(nn.Conv2d):
    """Conv2d with ``sign(clip(W))`` weights (no bias). ``first_layer`` marks a real-valued input."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1,
                 first_layer: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride, padding, bias=False)
        self.first_layer = first_layer

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _ste_sign(self.weight).to(x.dtype), None)  # (N, cout, H', W')


def binary_mlp(in_features: int = 784, hidden: int = 256, depth: int = 4, num_classes: int = 10) -> nn.Sequential:
    """The paper's MNIST MLP (4 x 256, ``model_architectures.py``).

    Layers: Flatten, [BinaryLinear, BatchNorm1d, SignActivation] x depth, BinaryLinear, BatchNorm1d.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for i in range(depth):
        layers += [BinaryLinear(width, hidden, first_layer=i == 0), nn.BatchNorm1d(hidden), SignActivation()]
        width = hidden
    layers += [BinaryLinear(width, num_classes), nn.BatchNorm1d(num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- edge autograd Functions


def _fp16(t: Tensor, on: bool) -> Tensor:
    return t.half().to(t.dtype) if on else t


class EdgeSign(torch.autograd.Function):
    """sign(x); saves the STE mask ``|x| <= 1`` as packed bits."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        ctx.save_for_backward(pack_mask(x.abs() <= 1))
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        return grad * unpack_mask(packed, ctx.shape)


class EdgeBinaryLayer(torch.autograd.Function):
    """Binary linear/conv: saves packed ``sign(x)`` (or the real x of a first layer); weight grad in the
    weight's dtype (fp16), masked by the clip STE ``|W| <= 1``; incoming gradient rounded to fp16."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, conv: tuple | None, first: bool,  # type: ignore[override]
                fp16_grad: bool) -> Tensor:
        wb = _sign(weight).to(x.dtype)
        ctx.conv, ctx.first, ctx.fp16_grad, ctx.shape, ctx.dtype = conv, first, fp16_grad, x.shape, x.dtype
        ctx.save_for_backward(x if first else pack_mask(x >= 0), weight)
        if conv is None:
            return F.linear(x, wb)  # (N, out)
        return F.conv2d(x, wb, None, *conv)  # (N, C_out, H', W')

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved, weight = ctx.saved_tensors
        grad = _fp16(grad, ctx.fp16_grad)
        x = saved if ctx.first else unpack_mask(saved, ctx.shape).to(ctx.dtype) * 2 - 1  # real x, or +-1
        wb = _sign(weight).to(grad.dtype)
        gx = gw = None
        if ctx.conv is None:
            if ctx.needs_input_grad[0]:
                gx = grad @ wb  # (N, in)
            gw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
        else:
            if ctx.needs_input_grad[0]:
                gx = torch.nn.grad.conv2d_input(ctx.shape, wb, grad, *ctx.conv)
            gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, *ctx.conv)
        gw = (gw * (weight.abs() <= 1)).to(weight.dtype)  # clip STE; fp16 gradient for fp16 weights
        return gx, gw, None, None, None


class EdgeL1BatchNorm(torch.autograd.Function):
    """l1 BatchNorm ``y = (x - mu) / sigma_1 + beta`` over all dims but 1; saves packed ``sign(x_hat)``,
    sigma_1 and kappa (per channel); approximate backward of the paper."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor, mu: Tensor, sigma: Tensor,  # type: ignore[override]
                fp16_grad: bool) -> Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - mu.view(view)) / sigma.view(view)  # same shape as x
        dims = [d for d in range(x.dim()) if d != 1]
        kappa = _fp16(xhat.abs().mean(dims), True)  # (C,) ~1 in training
        ctx.shape, ctx.dims, ctx.view, ctx.fp16_grad = x.shape, dims, view, fp16_grad
        ctx.save_for_backward(pack_mask(xhat >= 0), sigma, kappa)
        return xhat + beta.view(view)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        packed, sigma, kappa = ctx.saved_tensors
        grad = _fp16(grad, ctx.fp16_grad)
        s = unpack_mask(packed, ctx.shape).to(grad.dtype) * 2 - 1  # sign(x_hat), same shape as grad
        v = ctx.view
        mean = lambda t: t.mean(ctx.dims, keepdim=True)  # noqa: E731  per channel
        gx = (grad - mean(grad) - s * kappa.view(v) * mean(grad * s)) / sigma.view(v)
        return gx, grad.sum(ctx.dims), None, None, None


def l1_bn_handler(bns: set[int], fp16_grad: bool):  # noqa: ANN201
    """Handler: the ``batch_norm`` calls of the converted BatchNorms (keyed by their beta) as l1 BatchNorm."""
    momentum = 0.1  # Keras moving-average momentum 0.9 (paper code, spec §4.4)

    def handle(call: Call):  # noqa: ANN202
        x, mean, var, bias = call.args[0], call.arg(1, "running_mean"), call.arg(2, "running_var"), call.arg(4, "bias")
        if id(bias) not in bns:
            return NotImplemented
        training, eps = call.arg(5, "training", False), call.arg(7, "eps", 1e-5)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if not training:
            return (x - mean.view(view)) / var.view(view) + bias.view(view)
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            mu = _fp16(x.mean(dims), True)  # (C,)
            sigma = _fp16((x - mu.view(view)).abs().mean(dims), True).clamp_min(eps)  # (C,) l1 deviation
            mean.mul_(1 - momentum).add_(momentum * mu)
            var.mul_(1 - momentum).add_(momentum * sigma)  # holds sigma_1, not a variance
        return EdgeL1BatchNorm.apply(x, bias, mu, sigma, fp16_grad)

    return handle


@dataclasses.dataclass(frozen=True, kw_only=True)
class BNNEdge(Technique):
    """Train a binary network the paper's way: binary saved activations, l1 BatchNorm, fp16 weights.

    Args:
        targets: layers to convert (default: every BinaryLinear/BinaryConv2d/SignActivation/BatchNorm).
        fp16_weights: store binary-layer latent weights in fp16 (halves weights, gradients and Adam state;
            use Adam with ``eps >= 1e-4``, since 1e-8 underflows in fp16).
        fp16_grads: round incoming gradients to fp16 in the binary layers' and BN backward.
    """

    name = "bnn_edge"
    fp16_weights: bool = True
    fp16_grads: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("fp16_weights", "fp16_grads"):
            check(isinstance(getattr(self, f), bool), BNNEdge, f, f"must be true/false, got {getattr(self, f)!r}")


def _binary_forward(m: nn.Module, fp16_grad: bool, undo: Undo):
    """A forward for edgetrain's own binary layers (their math is this technique's: sign weights, packed inputs)."""
    conv = (m.stride, m.padding, m.dilation, m.groups) if isinstance(m, nn.Conv2d) else None

    def forward(x: Tensor) -> Tensor:
        return EdgeBinaryLayer.apply(x, m.weight, conv, m.first_layer, fp16_grad)

    return forward


def _set_dtype(p: nn.Parameter, dtype: torch.dtype, undo: Undo) -> None:
    """Store ``p`` in ``dtype``; ``remove()`` converts back (the rounding stays: no copy in the old dtype is kept,
    which would cost what the fp16 storage saves)."""
    old = p.dtype
    p.data = p.data.to(dtype)
    undo.add(lambda: setattr(p, "data", p.data.to(old)))


BINARY = (BinaryLinear, BinaryConv2d)


def tiny_binary_mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A seeded binary MLP for 1x8x8 inputs (the conformance suite's model for this technique)."""
    model = binary_mlp(in_features=64, hidden=16, depth=2, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _apply(model: nn.Module, cfg: BNNEdge, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    if not any(isinstance(modules[n], BINARY) for n in targets):
        raise ConfigError(f"BNNEdge: {structure.model} is not a binary network (no BinaryLinear/BinaryConv2d among "
                          "the targets); BNNEdge trains binary nets built from edgetrain.techniques.bnn_edge layers")
    undo = Undo()
    bns: set[int] = set()
    for name in targets:
        m = modules[name]
        if isinstance(m, BINARY):
            if m.bias is not None:
                raise ConfigError(f"BNNEdge: {name} has a bias; binary layers here are bias-free")
            if cfg.fp16_weights:
                _set_dtype(m.weight, torch.float16, undo)
            patch_forward(m, _binary_forward(m, cfg.fp16_grads, undo), undo)
            undo.changes += 1
        elif isinstance(m, SignActivation):
            patch_forward(m, EdgeSign.apply, undo)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None or m.bias is None:
                raise ConfigError(f"BNNEdge: {name} needs running statistics and a bias (beta)")
            if m.weight is not None:
                set_requires_grad([m.weight], False, undo)  # gamma is redundant before sign (paper)
            saved = (m.running_mean.clone(), m.running_var.clone())
            undo.add(lambda m=m, s=saved: (m.running_mean.copy_(s[0]), m.running_var.copy_(s[1])))
            with torch.no_grad():
                m.running_var.sqrt_().mul_(math.sqrt(2 / math.pi))  # sigma_1 of a Gaussian ~ 0.8 sigma
            bns.add(id(m.bias))
    intercept(model, ("batch_norm",), l1_bn_handler(bns, cfg.fp16_grads), undo, first=True)
    return undo


register(
    TechniqueInfo(
        config=BNNEdge,
        apply=_apply,
        summary="binary nets: 1-bit saved activations/STE masks, l1 BatchNorm with sign(x_hat), fp16 weights and grads",
        paper="Wang et al., Enabling Binary Neural Network Training on the Edge, ACM TECS 2023, arXiv:2102.04270",
        reduces=frozenset({"activations", "weights", "grads", "optimizer"}),
        default_targets=lambda model, structure: [n for n, m in model.named_modules() if n and isinstance(
            m, (BinaryLinear, BinaryConv2d, SignActivation, nn.BatchNorm1d, nn.BatchNorm2d))],
        looks_for="edgetrain binary layers (BinaryLinear, BinaryConv2d)",
        limits='refuses any model not built from its binary layers',
        forward_bound=lambda cfg: math.inf,  # l1 BatchNorm changes the function by design: shapes, finiteness checked
        remove_tolerance=2**-11,  # fp16 latent weights: remove() converts back, their rounding (2^-11 relative) stays
        exact=False,
        grad_tolerance=0.0,
        examples=(BNNEdge(), BNNEdge(fp16_weights=False, fp16_grads=False)),
        example_model=tiny_binary_mlp,
    )
)
