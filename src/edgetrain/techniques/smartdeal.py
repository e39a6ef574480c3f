"""SmartDeal: conv/linear weights re-parameterised as sparse power-of-two coefficients times a small dense basis.

Chen, Zhao, Shi, Wang, Lin, Fu, Wang, *SmartDeal: Re-Modeling Deep Network Weights for Efficient Inference and
Training*, IEEE TNNLS 2022, arXiv:2101.01163 (official code ``VITA-Group/SmartDeal``; spec algorithms_B section 2).

At apply, every target layer's weight is decomposed by SED (:mod:`edgetrain.smartdeal_sed`) into blocks
``Ce @ B``: ``Ce`` (parameter ``sd_C``) holds signed powers of two and zeros, ``B`` (``sd_B``) a dense 3x3 basis per
block, and the buffer ``sd_mask = (Ce != 0)`` is fixed for the run [CODE: ``set_mask``]. Each call of the layer's
``conv2d``/``linear`` then computes on the rebuilt weight ``W = layout^-1((Q(C) * mask) @ B)`` with Q the power-of-two
quantiser (ties up, no clip, as the training code) and a straight-through backward, so ``sd_C`` and ``sd_B`` train
(SmartDeal-Training's SE model, spec 2.5 b) and the original weight is frozen. The update of ``sd_C`` is the
training loop's choice of optimizer:

* any optimizer on the latent ``sd_C`` (STE); Q acts in the forward (call :func:`requantize` after each step for
  upstream's ``--quant-each-step``);
* :class:`BucketSwitch`, upstream's ``--switch``: ``sd_C`` stays a signed power of two and only its sign/exponent
  move (doubling/halving when a per-element counter of update signs reaches ``switch_bar``); ``sd_B`` and every other
  parameter go to an ordinary optimizer.

The original weight stays in its parameter, untouched: ``remove()`` gives it back bit for bit. :func:`merge` writes
the rebuilt dense weight into it (the export) and drops the SD parameters. Layers with another kernel (7x7, 5x5,
1x3) are left dense and said so (refused when named). What the model computes changes by SED's reconstruction error
(measured in docs/smartdeal.md); energy is reported only as proxies (bytes of weights, shift-adds), never measured.
Training memory grows: each SD layer's step saves ``Q(C) * mask`` and the rebuilt weight (resnet18 of the zoo, batch 4:
96.6 MB saved against plain PyTorch's 7.3 MB); what shrinks is the stored model (``reduces={"weights"}``).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import Tensor, nn

from edgetrain.apply import Undo, set_requires_grad
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.smartdeal_sed import MAX_C, Layout, Pow2STE, layout, pow2_quantize, sed, storage_bits
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import conv_args, explicit_padding

__all__ = ["BucketSwitch", "SmartDeal", "chain_grads", "dense_reference", "merge", "min_coefficient", "rebuilt_weight", "requantize", "sd_layers", "storage"]

KINDS = frozenset({"conv2d", "linear"})
PARAMS = ("sd_C", "sd_B")
#: SD layer -> its layout (weak keys: a dropped model takes its records with it)
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmartDeal(Technique):
    """Train conv/linear weights in SmartDeal form ``Q(Ce) * mask @ B`` (SED-initialised from the current weights).

    Args:
        threshold: Q's and SED's sparsification threshold theta, absolute (default 4e-3: upstream's training-code
            SED conversion; its inference code uses 1e-3) [CODE].
        iterations: SED's alternating least-squares iterations (30: upstream's inference main; its default 50).
        depthwise: decompose grouped/depthwise 3x3 convs too (upstream does; each output channel is then one 3x3
            block whose fp32 basis alone is as large as the dense kernel: no storage gain there).
        train_basis: ``sd_B`` trainable (upstream: plain SGD on B).
        targets: layers to re-parameterise (globs); default every 3x3, 1x1 conv2d and linear layer.
    """

    name = "smartdeal"
    threshold: float = 4e-3
    iterations: int = 30
    depthwise: bool = True
    train_basis: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.threshold
        check(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < MAX_C, SmartDeal, "threshold",
              f"must be a number in (0, {MAX_C:g}), got {t!r}")
        check(isinstance(self.iterations, int) and not isinstance(self.iterations, bool) and self.iterations >= 1,
              SmartDeal, "iterations", f"must be an int >= 1, got {self.iterations!r}")
        check(isinstance(self.depthwise, bool), SmartDeal, "depthwise", f"must be true/false, got {self.depthwise!r}")
        check(isinstance(self.train_basis, bool), SmartDeal, "train_basis",
              f"must be true/false, got {self.train_basis!r}")


def sd_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` in SmartDeal form, by qualified name."""
    return {n: m for n, m in model.named_modules() if "sd_C" in m._parameters and m in _LAYOUTS}


def rebuilt_weight(layer: nn.Module, theta: float | None = None) -> Tensor:
    """``layout^-1((Q(C) * mask) @ B)`` of an SD layer, differentiable (STE through Q), in the weight's dtype."""
    theta = layer.sd_theta if theta is None else theta
    qc = Pow2STE.apply(layer.sd_C, theta, "upper") * layer.sd_mask
    return _LAYOUTS[layer].to_weight(torch.bmm(qc, layer.sd_B)).to(layer.weight.dtype)


def _handler(layers: dict[int, nn.Module]):
    def handle(call: Call):
        w = call.arg(1, "weight")
        layer = layers.get(id(w))
        if layer is None or "sd_C" not in layer._parameters or layer._parameters.get("weight") is not w:
            return NotImplemented  # not a target, or merged
        wd = rebuilt_weight(layer)
        if call.name == "linear":
            return call.proceed(call.args[0], wd, call.arg(2, "bias"))
        x, _, b, stride, padding, dilation, groups = conv_args(call)
        x, padding = explicit_padding(x, w, padding, dilation)
        return call.proceed(x, wd, b, stride, padding, dilation, groups)

    return handle


def _plan(model: nn.Module, cfg: SmartDeal, targets: list[str], structure: Structure) -> list[tuple[str, Layout]]:
    """The (name, layout) of every layer to decompose; refuses named layers it cannot take, changing nothing."""
    modules = dict(model.named_modules())
    named = cfg.targets is not None
    out, skipped = [], []
    for n in targets:
        m = modules[n]
        w = m._parameters.get("weight")
        lay = layout(tuple(w.shape)) if isinstance(w, nn.Parameter) and w.is_floating_point() else None
        why = None
        if lay is None:
            why = f"has weight shape {tuple(w.shape) if w is not None else None}; SmartDeal takes 3x3 or 1x1 " \
                  "conv2d and linear weights (other kernels stay dense)"
        elif m in _LAYOUTS:
            why = "is already in SmartDeal form (remove the first SmartDeal)"
        elif getattr(m, "groups", 1) != 1 and not cfg.depthwise:
            why = f"is a grouped convolution ({m.groups} groups) and depthwise=False"
        if why is not None:
            if named:
                raise ConfigError(f"SmartDeal: layer {n!r} {why}")
            skipped.append(n)
            continue
        out.append((n, lay))
    if not out:
        raise ConfigError(f"SmartDeal: no 3x3/1x1 conv2d or linear weight in {structure.model} to decompose "
                          f"(targets {targets[:3]})")
    return out


def _apply(model: nn.Module, cfg: SmartDeal, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    plan = _plan(model, cfg, targets, structure)
    made = []
    for n, lay in plan:  # every decomposition before anything changes
        w = modules[n].weight
        with torch.no_grad():
            c, b = sed(lay.to_blocks(w.detach().double()), cfg.threshold, cfg.iterations)
        made.append((modules[n], lay, c.to(w.dtype), b.to(w.dtype)))
    undo = Undo()
    set_requires_grad([modules[n].weight for n, _ in plan], False, undo)
    layers: dict[int, nn.Module] = {}
    for layer, lay, c, b in made:
        layer.register_parameter("sd_C", nn.Parameter(c))
        layer.register_parameter("sd_B", nn.Parameter(b, requires_grad=cfg.train_basis))
        layer.register_buffer("sd_mask", (c != 0).to(c.dtype))
        layer.sd_theta = float(cfg.threshold)
        _LAYOUTS[layer] = lay
        layers[id(layer.weight)] = layer
        undo.changes += 1
        undo.add(lambda layer=layer: _drop(layer))
    intercept(model, tuple(KINDS), _handler(layers), undo, first=True)
    return undo


def _drop(layer: nn.Module) -> None:
    for k in PARAMS:
        layer._parameters.pop(k, None)
    layer._buffers.pop("sd_mask", None)
    layer.__dict__.pop("sd_theta", None)
    _LAYOUTS.pop(layer, None)


def merge(model: nn.Module) -> int:
    """Write every SD layer's rebuilt dense weight into its ``weight`` (the export) and drop ``sd_C``/``sd_B``/the
    mask; returns how many. Remove the handle afterwards: the merged weights stay (its ``remove()`` no longer has an
    original to restore for them)."""
    n = 0
    for layer in sd_layers(model).values():
        with torch.no_grad():
            layer.weight.copy_(rebuilt_weight(layer))
        _drop(layer)
        n += 1
    return n


@torch.no_grad()
def requantize(model: nn.Module) -> None:
    """``sd_C <- Q(sd_C) * mask`` for every SD layer (upstream's ``--quant-each-step``, after the optimizer step)."""
    for layer in sd_layers(model).values():
        layer.sd_C.copy_(pow2_quantize(layer.sd_C, layer.sd_theta, "upper") * layer.sd_mask)


def storage(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per SD layer: :func:`~edgetrain.smartdeal_sed.storage_bits` of its quantised ``Ce`` and ``B``, with the fp32 and
    int8 (per-output-channel fp32 scale) bits of its dense weight."""
    out = {}
    for name, layer in sd_layers(model).items():
        with torch.no_grad():
            qc = pow2_quantize(layer.sd_C, layer.sd_theta, "upper") * layer.sd_mask
        w = layer.weight
        out[name] = {**storage_bits(qc, layer.sd_B), "fp32": 32 * w.numel(), "int8": 8 * w.numel() + 32 * w.shape[0]}
    return out


def chain_grads(layer: nn.Module, grad_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The STE gradients of an SD layer's ``(sd_C, sd_B)`` given its rebuilt weight's gradient ``G`` (in blocks):
    ``dL/dC = mask * (G @ B^T)``, ``dL/dB = (Q(C) * mask)^T @ G`` (the hand reference tests and the zoo use)."""
    g = _LAYOUTS[layer].to_blocks(grad_weight.to(layer.sd_B.dtype))
    with torch.no_grad():
        qc = pow2_quantize(layer.sd_C, layer.sd_theta, "upper") * layer.sd_mask
        return layer.sd_mask * (g @ layer.sd_B.transpose(1, 2)), qc.transpose(1, 2) @ g


def dense_reference(ref: nn.Module, applied: nn.Module) -> None:
    """Give ``ref`` (a plain copy of the model ``applied`` came from) the rebuilt weights of ``applied``'s SD layers,
    trainable: the plain PyTorch model whose weight gradients :func:`chain_grads` maps to ``applied``'s."""
    with torch.no_grad():
        for name, layer in sd_layers(applied).items():
            w = ref.get_submodule(name).weight
            w.copy_(rebuilt_weight(layer))
            w.requires_grad_(True)


def min_coefficient(theta: float) -> float:
    """The smallest power of two >= ``theta`` (bucket-switch regrowth) [CODE]."""
    m, e = math.frexp(theta)  # theta = m * 2^e, m in [0.5, 1)
    return theta if m == 0.5 else math.ldexp(1.0, e)


class BucketSwitch(torch.optim.Optimizer):
    """Upstream's ``--switch`` update of the SD coefficients [CODE, spec 2.5 b]: ``sd_C`` stays ``±2^k`` (or 0).

    Per step, with the SGD update ``d = -lr * buf``, ``buf = momentum * buf + (grad + weight_decay * C)``:
    ``counter += sign(d)``; where ``|counter| == switch_bar`` the element fires with ``s = sign(counter)``. With
    ``q = Q(C) * mask``: a non-zero ``q`` is doubled when ``s`` points away from zero and halved when toward it
    (``q * 2^(s * sign(q))``), a zero ``q`` inside the mask (also one halved below theta before) regrows to
    ``s * min_C`` (the smallest power of two >= theta), then ``|C| <= max_c`` and the counter of fired elements is
    reset. Elements that do not fire are left at ``q`` (upstream writes ``Q(C)`` back every step).
    :meth:`reset_counters` is called each epoch upstream. Give ``sd_B`` and all other parameters to another optimizer.

    Args:
        model: a model with SmartDeal applied (its ``sd_C`` parameters are taken).
        lr, momentum, weight_decay: the SGD update whose sign drives the counters (upstream: 0.1, 0.9, 5e-4).
        switch_bar: counter value that fires (upstream default 1).
        max_c: magnitude clip (upstream ``--max-C``: none by default).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 switch_bar: int = 1, max_c: float | None = None) -> None:
        layers = list(sd_layers(model).values())
        if not layers:
            raise ConfigError("BucketSwitch: the model has no SmartDeal layer (apply SmartDeal first)")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"BucketSwitch.lr: must be > 0, got {lr!r}")
        if not (isinstance(switch_bar, int) and switch_bar >= 1):
            raise ConfigError(f"BucketSwitch.switch_bar: must be an int >= 1, got {switch_bar!r}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "switch_bar": switch_bar, "max_c": max_c}
        super().__init__([layer.sd_C for layer in layers], defaults)
        self._layer = {id(layer.sd_C): layer for layer in layers}

    def reset_counters(self) -> None:
        for st in self.state.values():
            if "counter" in st:
                st["counter"].zero_()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for c in group["params"]:
                if c.grad is None:
                    continue
                layer, st = self._layer[id(c)], self.state[c]
                g = c.grad + group["weight_decay"] * c
                buf = st.get("momentum_buffer")
                buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                st["momentum_buffer"] = buf
                counter = st.setdefault("counter", torch.zeros_like(c, dtype=torch.int32))
                counter += torch.sign(-group["lr"] * buf).to(torch.int32)
                fire = counter.abs() == group["switch_bar"]
                s = torch.sign(counter).to(c.dtype) * fire
                min_c = min_coefficient(layer.sd_theta)
                qc = pow2_quantize(c, layer.sd_theta, "upper") * layer.sd_mask  # upstream moves Q(C), not C
                moved = torch.where(qc != 0, qc * torch.exp2(s * torch.sign(qc)), layer.sd_mask * s * min_c)
                if group["max_c"] is not None:
                    moved = moved.clamp(-group["max_c"], group["max_c"])
                c.copy_(moved)
                counter[fire] = 0


def _forward_bound(cfg: SmartDeal) -> float:
    """The eval-output change ``apply_`` accepts: SED's reconstruction error is lossy by design (measured on the
    foreign zoo and pretrained MobileNetV2 in docs/smartdeal.md); no bound stated."""
    return float("inf")


register(
    TechniqueInfo(
        config=SmartDeal,
        apply=_apply,
        summary="SmartDeal: 3x3/1x1 conv and linear weights trained as sparse power-of-two coefficients @ 3x3 basis "
                "(SED init, STE or bucket-switch update); merge() exports the dense weight",
        paper="Chen et al., SmartDeal: Re-Modeling Deep Network Weights for Efficient Inference and Training, "
              "IEEE TNNLS 2022, arXiv:2101.01163",
        reduces=frozenset({"weights"}),  # of the stored model (bits of Ce + B); training keeps the original weight
        layer_kinds=KINDS,
        looks_for="3x3 or 1x1 conv2d and linear layers",
        limits="other kernel sizes (7x7, 5x5, 1x3) stay dense (refused when named); weights read inside "
               "nn.MultiheadAttention or transformers' Conv1D (addmm) are not reached",
        forward_bound=_forward_bound,
        conflicts=frozenset({"int8", "int8_frozen", "mebqat", "bnn_edge", "lora", "krona", "sparse_update",
                             "approx_multiply"}),
        # lossy forward; the gradients of sd_C/sd_B are exactly the STE chain rule (chain_grads) of plain PyTorch's
        # gradient at the rebuilt weights (dense_reference): tests/techniques/test_smartdeal.py in float64, and the
        # zoo's evaluate with that reference (relative error 5e-9 .. 7e-8 on functional, audio, mobilenetv3, bert)
        exact=False,
        grad_tolerance=0.0,
        grad_cosine=1.0,
        examples=(SmartDeal(), SmartDeal(threshold=1e-3, depthwise=False, train_basis=False)),
    )
)
