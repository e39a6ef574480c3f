"""Int8: int8 training of convs with quantization-aware scaling (QAS), as in the Tiny Training Engine.

Lin et al., *On-Device Training Under 256KB Memory*, NeurIPS 2022, arXiv:2206.15472, §2.1 (QAS) and the
official ``algorithm/quantize/quantized_ops_diff.py`` / ``sgd_scale.py`` (specs/algorithms_A.md §6.1-6.2).

Emulated on the CPU with real quantise/dequantise, on the conv (1-, 2-, 3-d) and linear layers it targets
(whatever their module class: the layer's own ``conv``/``linear`` call is intercepted, :mod:`edgetrain.ops`):

* **Weights**: per-output-channel symmetric int8, ``s_W[co] = max|W[co]| / 127``. The trained parameter is
  ``W̄ = W / s_W`` (an fp32 master copy; the forward uses ``clamp(round(W̄), -127, 127) · s_W``, with a
  straight-through round), exactly TTE's parameterisation. Its gradient is therefore ``s_W · G_W``: the
  weight/gradient norm ratio is off by ``s_W^-2`` against fp32 training, which is what QAS corrects.
* **QAS** (``qas=True``): ``G_W̄ ← G_W̄ · s_W^-2`` per output channel, applied in the layer's backward, i.e.
  after any gradient masking and before the optimizer step. ``qas=False`` is plain int8 SGD.
* **Activations**: each targeted layer quantises its input per tensor to int8 (asymmetric, the batch's own
  min/max) and computes on the dequantised values; for backward it keeps **only the int8 input** (1 byte per
  element: the meter sees a 4x smaller saved tensor) and two scalars. Straight-through for the input gradient.
  ReLU-family activations where gradients flow keep a packed 1-bit mask (TTE's clamp mask), not an fp32 tensor.
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

from edgetrain.apply import Undo
from edgetrain.compress.masks import mask_ops
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import CONV_OPS, conv_args, explicit_padding

QMAX = 127  # symmetric int8 weights in [-127, 127] (TTE/PyTorch per-channel symmetric convention)
KINDS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(Technique):
    """Train the targeted conv/linear layers as an int8 graph (int8 weights and saved inputs), optionally with QAS.

    Args:
        qas: quantization-aware scaling of the weight gradients (TTE's fix; ``False`` = plain int8 SGD).
        targets: layers to quantise (default: every conv/linear layer whose weight trains, as left by earlier
            techniques, the classifier excepted).
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


def _forward(x: Tensor, w: Tensor, bias: Tensor | None, conv: tuple | None) -> Tensor:
    return F.linear(x, w, bias) if conv is None else _CONV[w.dim() - 2](x, w, bias, *conv)


class Int8Layer(torch.autograd.Function):
    """conv (``conv`` = (stride, padding, dilation, groups)) or linear (``conv=None``) of the int8-quantised input
    and weight; keeps the int8 input for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, wbar: Tensor, scale: Tensor, bias: Tensor | None, conv: tuple | None,  # type: ignore[override]
                qas: bool):
        q, s, z = quantize_input(x)
        w = weight_from_master(wbar, scale)
        ctx.save_for_backward(q if ctx.needs_input_grad[1] else None, s, z, wbar, scale)
        ctx.meta = (tuple(x.shape), x.dtype, conv, qas, bias is not None)
        return _forward(dequantize_input(q, s, z, x.dtype), w, bias, conv)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, s, z, wbar, scale = ctx.saved_tensors
        shape, dtype, conv, qas, has_bias = ctx.meta
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # straight through the input quantisation
            w = weight_from_master(wbar, scale)
            gx = g @ w if conv is None else _CONV_INPUT[wbar.dim() - 2](shape, w, g, *conv)
        if ctx.needs_input_grad[1]:
            x = dequantize_input(q, s, z, dtype)
            if conv is None:
                gW = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # dL/dW (out, in)
            else:
                gW = _CONV_WEIGHT[wbar.dim() - 2](x, wbar.shape, g, *conv)  # dL/dW
            per_channel = scale.view(-1, *([1] * (wbar.dim() - 1)))
            gw = gW * per_channel  # dL/dW̄ = s_W · dL/dW (straight-through round)
            if qas:
                gw = gw / per_channel**2  # QAS: · s_W^-2
        if has_bias and ctx.needs_input_grad[3]:
            gb = g.sum(tuple(range(g.dim() - 1))) if conv is None else g.sum((0, *range(2, g.dim())))
        return gx, gw, None, gb, None, None


def int8_handler(layers: dict[int, nn.Module], qas: bool):  # noqa: ANN201
    """Handler: a ``conv*d``/``linear`` call whose weight is an int8 layer's master weight ``W̄``."""

    def handle(call: Call):  # noqa: ANN202
        w = call.arg(1, "weight")
        layer = layers.get(id(w))
        if layer is None:
            return NotImplemented
        if call.name == "linear":
            x, b, conv = call.args[0], call.arg(2, "bias"), None
        else:
            x, w, b, stride, padding, dilation, groups = conv_args(call)
            x, padding = explicit_padding(x, w, padding, dilation)
            conv = (stride, padding, dilation, groups)
        if not torch.is_grad_enabled():
            q, s, z = quantize_input(x)
            return _forward(dequantize_input(q, s, z, x.dtype), weight_from_master(w, layer.weight_scale), b, conv)
        return Int8Layer.apply(x, w, layer.weight_scale, b, conv, qas)

    return handle


def default_targets(model: nn.Module, structure: Structure) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in structure.layers_of(KINDS) if n != structure.classifier
            and getattr(modules[n], "weight", None) is not None and modules[n].weight.requires_grad]


def _apply(model: nn.Module, cfg: Int8, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    targets = targets or default_targets(model, structure)
    if not targets:
        raise ConfigError("Int8: no trainable conv/linear layer to quantise (freeze less, or give targets)")
    undo = Undo()
    layers: dict[int, nn.Module] = {}
    for name in targets:
        layer = modules[name]
        w = getattr(layer, "weight", None)
        if not isinstance(w, nn.Parameter) or hasattr(layer, "weight_part"):
            raise ConfigError(f"Int8: layer {name!r} is already changed by another technique (e.g. a partial-channel "
                              "sparse update) or has no weight parameter; int8 of such layers is not supported")
        if w.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"Int8: layer {name!r} has {w.dtype} weights; expected float32/float64")
        scale = (w.detach().abs().flatten(1).amax(dim=1) / QMAX).clamp(min=1e-12)  # (C_out,)
        view = (-1, *([1] * (w.dim() - 1)))
        layer.register_buffer("weight_scale", scale)
        with torch.no_grad():
            w.div_(scale.view(view))
        layers[id(w)] = layer
        undo.changes += 1

        def restore(layer=layer, view=view) -> None:  # W = W̄ · s_W (no fp32 copy of W is kept: remove_tolerance)
            with torch.no_grad():
                layer.weight.mul_(layer.weight_scale.view(view))
            del layer.weight_scale

        undo.add(restore)
    intercept(model, (*CONV_OPS, "linear"), int8_handler(layers, cfg.qas), undo, first=True)
    # ReLU-family activations where gradients flow keep a 1-bit mask (TTE's int8 graph clamps with a saved mask)
    mask_ops(model, undo)
    return undo


register(
    TechniqueInfo(
        config=Int8,
        apply=_apply,
        summary="int8 conv/linear training (per-channel int8 weights, int8 saved inputs) with quantization-aware "
                "scaling",
        paper="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022, arXiv:2206.15472 (QAS)",
        reduces=frozenset({"activations"}),
        layer_kinds=KINDS,
        default_targets=default_targets,
        looks_for="conv/linear layers whose weights train",
        limits="not layers already sliced by sparse_update; addmm layers (transformers' Conv1D) are not reached",
        forward_bound=lambda cfg: 0.1,  # per-tensor int8 inputs, per-channel int8 weights (measured on the zoo)
        remove_tolerance=1e-6,  # remove() gives W̄·s_W back: W/s·s, a rounding of fp32 (no copy of W is kept)
        exact=False,  # lossy by design: tests/techniques/test_int8.py checks it against a float64 reference
        grad_tolerance=0.0,
        # per-tensor int8 inputs: measured 0.52 on EfficientNet (SiLU/SE activations), 0.91-1.0 elsewhere
        grad_cosine=0.5,
        examples=(Int8(), Int8(qas=False)),
    )
)
