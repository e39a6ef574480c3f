"""Int8: int8 training of convs with quantization-aware scaling (QAS), as in the Tiny Training Engine.

Lin et al., *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472, §2.1 (QAS) and the
official ``algorithm/quantize/quantized_ops_diff.py`` / ``sgd_scale.py`` (specs/algorithms_A.md §6.1-6.2).

Emulated on the CPU with real quantise/dequantise:

* **Weights**: per-output-channel symmetric int8, ``s_W[co] = max|W[co]| / 127``. The trained parameter is
  ``W̄ = W / s_W`` (an fp32 master copy; the forward uses ``clamp(round(W̄), -127, 127) · s_W``, with a
  straight-through round), exactly TTE's parameterisation. Its gradient is therefore ``s_W · G_W``: the
  weight/gradient norm ratio is off by ``s_W^-2`` against fp32 training, which is what QAS corrects.
* **QAS** (``qas=True``): ``G_W̄ ← G_W̄ · s_W^-2`` per output channel, applied in the layer's backward, i.e.
  after any gradient masking and before the optimizer step. ``qas=False`` is plain int8 SGD.
* **Activations**: each targeted conv quantises its input per tensor to int8 (asymmetric, the batch's own
  min/max) and computes on the dequantised values; for backward it keeps **only the int8 input** (1 byte per
  element: the meter sees a 4x smaller saved tensor) and two scalars. Straight-through for the input gradient.
  ReLU/ReLU6 after the first int8 conv keep a packed 1-bit mask (TTE's clamp mask), not an fp32 tensor.
* **Biases** (and BatchNorms, the classifier) stay fp32: TTE keeps int32-valued biases scaled by ``s_x s_W``
  and rescales their gradients by ``(s_W s_x)^-2``; with fp32 biases there is no mismatch to correct.

Simulation gaps (stated, as the spec asks): the fp32 master weight hides the sub-LSB update problem of a pure
int8 device (which needs an fp32 accumulator or stochastic rounding); the cost model counts the emulation's
fp32 master weights, not int8 ones.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.apply import Undo, classifier, patch_forward, under
from edgetrain.compress.masks import mask_activations_from
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check

QMAX = 127  # symmetric int8 weights in [-127, 127] (TTE/PyTorch per-channel symmetric convention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(Technique):
    """Train the targeted convs as an int8 graph (int8 weights and saved inputs), optionally with QAS.

    Args:
        qas: quantization-aware scaling of the weight gradients (TTE's fix; ``False`` = plain int8 SGD).
        targets: convs to quantise (default: every Conv2d whose weight trains, as left by earlier techniques).
    """

    name = "int8"
    qas: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.qas, bool), Int8, "qas", f"must be true/false, got {self.qas!r}")


def quantize_input(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor asymmetric int8: ``x ≈ (q - z) · s`` with q in [-128, 127]."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)  # the range always holds 0 exactly
    s = ((hi - lo) / 255).clamp(min=1e-12)
    z = (-128 - torch.round(lo / s)).clamp(-128, 127)
    q = torch.clamp(torch.round(x / s) + z, -128, 127).to(torch.int8)
    return q, s, z


def dequantize_input(q: Tensor, s: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.to(dtype) - z) * s


def weight_from_master(wbar: Tensor, scale: Tensor) -> Tensor:
    return torch.clamp(torch.round(wbar.detach()), -QMAX, QMAX) * scale.view(-1, *([1] * (wbar.dim() - 1)))


class Int8Conv2d(torch.autograd.Function):
    """conv2d of the int8-quantised input and weight; keeps the int8 input for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, wbar: Tensor, scale: Tensor, bias: Tensor | None, stride, padding, dilation,
                groups: int, qas: bool):  # type: ignore[override]
        q, s, z = quantize_input(x)
        w = weight_from_master(wbar, scale)
        ctx.save_for_backward(q if ctx.needs_input_grad[1] else None, s, z, wbar, scale)
        ctx.meta = (tuple(x.shape), x.dtype, stride, padding, dilation, groups, qas, bias is not None)
        return F.conv2d(dequantize_input(q, s, z, x.dtype), w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, s, z, wbar, scale = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups, qas, has_bias = ctx.meta
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # straight through the input quantisation
            gx = torch.nn.grad.conv2d_input(shape, weight_from_master(wbar, scale), g, stride, padding, dilation,
                                            groups)
        if ctx.needs_input_grad[1]:
            gW = torch.nn.grad.conv2d_weight(dequantize_input(q, s, z, dtype), wbar.shape, g, stride, padding,
                                             dilation, groups)  # dL/dW
            per_channel = scale.view(-1, 1, 1, 1)
            gw = gW * per_channel  # dL/dW̄ = s_W · dL/dW (straight-through round)
            if qas:
                gw = gw / per_channel**2  # QAS: · s_W^-2
        if has_bias and ctx.needs_input_grad[3]:
            gb = g.sum((0, 2, 3))
        return gx, gw, None, gb, None, None, None, None, None


def _forward(conv: nn.Conv2d, qas: bool):
    def forward(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            q, s, z = quantize_input(x)
            return F.conv2d(dequantize_input(q, s, z, x.dtype), weight_from_master(conv.weight, conv.weight_scale),
                            conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return Int8Conv2d.apply(x, conv.weight, conv.weight_scale, conv.bias, conv.stride, conv.padding,
                                conv.dilation, conv.groups, qas)

    return forward


def default_targets(model: nn.Module) -> list[str]:
    head = classifier(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad
            and not under(n, [head])]


def _apply(model: nn.Module, cfg: Int8, targets: list[str]) -> Undo:
    modules = dict(model.named_modules())
    targets = targets or default_targets(model)
    if not targets:
        raise ConfigError("Int8: no trainable Conv2d to quantise (freeze less, or give targets)")
    undo = Undo()
    for name in targets:
        conv = modules[name]
        if "forward" in conv.__dict__ or hasattr(conv, "weight_part"):
            raise ConfigError(f"Int8: conv {name!r} is already changed by another technique (e.g. a partial-channel "
                              "sparse update); int8 of such layers is not supported")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(f"Int8: conv {name!r} with padding {conv.padding!r}/{conv.padding_mode} is not supported")
        if conv.weight.dtype != torch.float32 and conv.weight.dtype != torch.float64:
            raise ConfigError(f"Int8: conv {name!r} has {conv.weight.dtype} weights; expected float32/float64")
        original = conv.weight.detach().clone()
        scale = (original.abs().amax(dim=(1, 2, 3)) / QMAX).clamp(min=1e-12)  # (C_out,)
        conv.register_buffer("weight_scale", scale)
        with torch.no_grad():
            conv.weight.div_(scale.view(-1, 1, 1, 1))
        start = conv.weight.detach().clone()
        patch_forward(conv, _forward(conv, cfg.qas), undo)

        def restore(conv=conv, original=original, start=start) -> None:
            with torch.no_grad():
                if torch.equal(conv.weight, start):
                    conv.weight.copy_(original)  # untouched: give back the exact original
                else:
                    conv.weight.mul_(conv.weight_scale.view(-1, 1, 1, 1))  # trained: W = W̄ · s_W
            del conv.weight_scale

        undo.add(restore)
    # ReLU/ReLU6 after the first int8 conv keep a 1-bit mask (TTE's int8 graph clamps with a saved 1-bit mask)
    mask_activations_from(model, targets, undo)
    return undo


def estimate(table, cfg: Int8, targets: list[str], model: nn.Module) -> None:  # noqa: ANN001
    """Cost model: each int8 conv keeps its input as int8 (1 byte per element) plus two scalars."""
    import math

    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and "weight_scale" in m._buffers]
    for name in convs:
        row = table.row(name)
        row.saved_per_sample += math.prod(table.shapes[name][0])
        row.saved_fixed += 8
        row.technique = "int8"
    # its 1-bit ReLU masks are counted by the cost model's trace (edgetrain.compress.masks)


register(
    TechniqueInfo(
        config=Int8,
        apply=_apply,
        summary="int8 conv training (per-channel int8 weights, int8 saved inputs) with quantization-aware scaling",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472 (QAS)",
        reduces=frozenset({"activations"}),
        layer_types=(nn.Conv2d,),
        default_targets=default_targets,
        exact=False,  # lossy by design: tests/techniques/test_int8.py checks it against a float64 reference
        grad_tolerance=0.0,
        examples=(Int8(), Int8(qas=False)),
        estimate=estimate,
    )
)
