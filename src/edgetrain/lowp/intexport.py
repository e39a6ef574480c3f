"""Integer export of a MEBQAT / QAT model: packed integer weights with one scale per layer, and an integer-weight
inference path that reproduces the fake-quantized model.

At ``(w_bits, a_bits)`` every layer :class:`~edgetrain.MEBQAT` quantizes has weights ``W = scale * q`` with
integers ``q = mult * code + offset`` and unsigned codes ``0 <= code < 2^b``:

* LSQ (Esser et al., arXiv:1902.08153): ``code = clamp(round(W / s), n, p) - n``; ``mult = 1, offset = n``,
  ``scale = s`` (the learned step);
* Yu21 (Any-Precision DNN, arXiv:1911.07346): ``code = round((tanh(W) / max|tanh(W)| + 1) / 2 * K)`` with
  ``K = 2^b - 1`` (``code = [W >= 0]`` at 1 bit, ``K = 1``); ``W_hat = E * (2 code / K - 1)``, so ``mult = 2,
  offset = -K, scale = E / K`` with ``E = mean|W|``.

The codes are bit-packed with :func:`edgetrain.compress.bitpack.pack_bits` at 1, 2, 4 or 8 bits; 3 bits are stored
in 4-bit slots and 5-7 bits in bytes (the packer's widths: ``ideal_bytes`` gives the size a dense ``b``-bit packing
would have), 16 bits as ``int16``. Everything else (the full-precision first and last layers, biases, BatchNorm
parameters and statistics) stays float32. One ``.safetensors`` file holds it all; its metadata describe each
layer's codes and input quantizer.

:func:`load_integer` builds the inference model on a fresh instance of the architecture: the quantized layers'
float weights are dropped, and each of their ``conv*d``/``linear`` calls (:mod:`edgetrain.ops`) computes
``scale_w * scale_x * op(k_x, q) + bias`` from the packed codes and the input's integer codes ``k_x`` (LSQ:
``clamp(round(x / s_x), n, p)``, ``scale_x = s_x``; Yu21: ``round(clamp(x, 0, 1) * K_a)``, ``scale_x = 1 / K_a``;
a full-precision input stays float). ``op(k_x, q)`` is an integer convolution or product, evaluated on
integer-valued float64 tensors: exact while every sum stays below 2^53 (checked), so it differs from the fake
quantized float32 model only by that model's own rounding (which can move an input across a rounding boundary of
the next layer's quantizer). Measured agreement of the predictions: every sample in ``tests/test_mebqat.py``; on the
10,000 Fashion-MNIST test images of ``benchmarks/lowp/mebqat.py``, 100% in six of seven exports and 99.99% (one
image) in the seventh (``benchmarks/results/t2-mebqat-2026-12-02.json``).

Simulated, stated: the integer products run as float64 convolutions (no integer GEMM kernel), activations are
quantized per call in Python, and BatchNorm is not folded (it runs on the exported statistics, float32).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.compress.bitpack import pack_bits, unpack_bits
from edgetrain.errors import ConfigError
from edgetrain.lowp.fakequant import FP, FakeQuant, bit_state, restore_bits, set_bits
from edgetrain.ops import Call, Undo, intercept, register_state
from edgetrain.techniques._frozen import conv_args, explicit_padding

__all__ = ["container_bits", "export_integer", "layer_codes", "load_integer"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
EXACT = 2.0**53  # float64 holds every integer below this exactly


def container_bits(bits: int) -> int:
    """The storage width of ``bits``-bit codes: the smallest of 1, 2, 4, 8 (packed) or 16 (int16) that holds them."""
    return next(c for c in (1, 2, 4, 8, 16) if c >= bits)


def _wq(layer: nn.Module) -> FakeQuant:
    return layer._modules["mebqat_weight"]


def layer_codes(layer: nn.Module, bits: int) -> tuple[Tensor, float, int, int]:
    """``(codes, scale, mult, offset)`` of a quantized layer's weight at ``bits``: ``W_hat = scale * (mult * codes
    + offset)`` with ``codes`` int64 in ``[0, 2^bits)``."""
    q, w = _wq(layer), layer.weight.detach()
    if q.method == "lsq":
        n, p = q.grid(bits)
        s = float(q.step_at(bits).detach().clamp_min(1e-8))
        return (torch.clamp(torch.round(w / s), n, p) - n).long(), s, 1, n
    k = 2**bits - 1
    e = float(w.abs().mean())
    if bits == 1:
        return (w >= 0).long(), e, 2, -1
    t = torch.tanh(w)
    t = t / t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)  # as fakequant._dorefa_weight
    return torch.round((t + 1) / 2 * k).long(), e / k, 2, -k


def _pack(codes: Tensor, bits: int) -> Tensor:
    c = container_bits(bits)
    return (codes - 2**15).to(torch.int16) if c == 16 else pack_bits(codes, c)


def _unpack(data: Tensor, bits: int, numel: int) -> Tensor:
    if container_bits(bits) == 16:
        return data.long() + 2**15
    return unpack_bits(data, container_bits(bits), numel).long()


def _input_spec(layer: nn.Module, a_bits: int) -> dict[str, Any]:
    q = layer._modules["mebqat_input"]
    spec: dict[str, Any] = {"method": q.method, "bits": a_bits}
    if a_bits != FP and q.method == "lsq":
        n, p = q.grid(a_bits)
        spec.update(step=float(q.step_at(a_bits).detach().clamp_min(1e-8)), n=n, p=p)
    return spec


def export_integer(model: nn.Module, path: str | Path, w_bits: int, a_bits: int | None = None) -> dict[str, Any]:
    """Write ``model`` (MEBQAT applied; or an :class:`edgetrain.mebqat.MEBQATTraining`) at ``w_bits``-bit weights
    and ``a_bits``-bit inputs (default ``w_bits``) to ``path`` (safetensors). Returns the measured sizes: ``bytes``
    (the file), ``fp32_bytes`` (the same model's float32 state as safetensors, measured the same way),
    ``ideal_bytes`` (with dense ``b``-bit packing of the codes) and per-layer records."""
    from safetensors.torch import save_file

    from edgetrain.techniques.mebqat import quantized_layers

    net = getattr(model, "net", model)
    a_bits = w_bits if a_bits is None else a_bits
    layers = quantized_layers(net)
    if not layers:
        raise ConfigError(f"export_integer: {type(net).__name__} has no MEBQAT-quantized layer")
    if w_bits == FP or w_bits is None:
        raise ConfigError("export_integer: w_bits must be a quantized bit width (1..16), not full precision")
    computed = [n for n, layer in layers.items() if _wq(layer).computed]
    if computed:
        raise ConfigError(f"export_integer: layer {computed[0]!r} computes the weight it uses in its forward (from "
                          "its parameters): its quantized weight is not a function of the stored one alone")
    before = bit_state(net)
    set_bits(net, w_bits, a_bits)  # validates both against the candidates
    try:
        tensors, meta, ideal = {}, {}, 0
        for name, layer in layers.items():
            codes, scale, mult, offset = layer_codes(layer, w_bits)
            tensors[f"{name}.weight.codes"] = _pack(codes, w_bits)
            meta[name] = {"shape": list(layer.weight.shape), "bits": w_bits, "scale": scale, "mult": mult,
                          "offset": offset, "input": _input_spec(layer, a_bits)}
            ideal += math.ceil(codes.numel() * w_bits / 8)
        rest = {k: v.detach().contiguous() for k, v in net.state_dict().items()
                if ".mebqat_" not in k and not (k.endswith(".weight") and k[:-len(".weight")] in layers)}
        save_file({**tensors, **rest}, str(path), metadata={"edgetrain.intexport": json.dumps(meta)})
    finally:
        restore_bits(before)
    plain = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
             for k, v in net.state_dict().items() if ".mebqat_" not in k}
    with tempfile.TemporaryDirectory() as d:
        save_file(plain, os.path.join(d, "fp32.safetensors"))
        fp32 = os.path.getsize(os.path.join(d, "fp32.safetensors"))
    rest_bytes = sum(v.numel() * v.element_size() for v in rest.values())
    return {"path": str(path), "bytes": os.path.getsize(path), "fp32_bytes": fp32, "w_bits": w_bits,
            "a_bits": a_bits, "ideal_bytes": ideal + rest_bytes, "layers": meta}


def _input_codes(x: Tensor, spec: dict[str, Any]) -> tuple[Tensor, float]:
    """The input as integer codes (float64) and their scale; a full-precision input as it is."""
    if spec["bits"] == FP:
        return x.double(), 1.0
    if spec["method"] == "lsq":
        return torch.clamp(torch.round(x.double() / spec["step"]), spec["n"], spec["p"]), spec["step"]
    k = 2 ** spec["bits"] - 1
    return torch.round(torch.clamp(x.double(), 0, 1) * k), 1.0 / k


class _IntLayer:
    """One layer's packed codes and decoding (kept packed; decoded per call)."""

    def __init__(self, data: Tensor, meta: dict[str, Any]) -> None:
        self.data, self.meta = data, meta
        self.shape = tuple(meta["shape"])

    def integers(self) -> Tensor:
        m = self.meta
        codes = _unpack(self.data, m["bits"], math.prod(self.shape))
        return (m["mult"] * codes + m["offset"]).double().view(self.shape)  # (out, in, *k) integers


def _handler(layers: dict[int, _IntLayer]):  # noqa: ANN202
    def handle(call: Call):  # noqa: ANN202
        rec = layers.get(id(call.arg(1, "weight")))
        if rec is None:
            return NotImplemented
        x, bias = call.args[0], call.arg(2, "bias")
        q = rec.integers()
        k, sx = _input_codes(x, rec.meta["input"])
        bound = float(k.abs().amax()) * float(q.abs().amax()) * (q[0].numel())
        if rec.meta["input"]["bits"] != FP and bound >= EXACT:
            raise ConfigError(f"integer inference: sums up to {bound:.3g} exceed float64's exact integers")
        if call.name == "linear":
            y = F.linear(k, q)
        else:
            _, _, _, stride, padding, dilation, groups = conv_args(call)
            k, padding = explicit_padding(k, q, padding, dilation)
            y = _CONV[q.dim() - 2](k, q, None, stride, padding, dilation, groups)
        y = (y * (rec.meta["scale"] * sx)).to(x.dtype)
        if bias is not None:
            y = y + (bias if call.name == "linear" else bias.view(1, -1, *([1] * (y.dim() - 2))))
        return y

    return handle


def load_integer(path: str | Path, skeleton: nn.Module) -> Undo:
    """Make ``skeleton`` (a fresh instance of the exported model's architecture, without MEBQAT) the integer-weight
    inference model of the file at ``path``, in place: the float tensors are loaded, the quantized layers' float
    weights replaced by empty placeholders and their calls computed from the packed codes. Returns the handle
    (``remove()`` takes the handlers off; the weights stay empty)."""
    meta, tensors = _read(path)
    modules = dict(skeleton.named_modules())
    missing = [n for n in meta if n not in modules or not isinstance(getattr(modules[n], "weight", None), Tensor)]
    if missing:
        raise ConfigError(f"load_integer: the model has no layer {missing[0]!r} with a weight (another architecture?)")
    for n, m in meta.items():
        _check_layer(path, n, m, tensors, tuple(modules[n].weight.shape))
    rest = {k: v for k, v in tensors.items() if not k.endswith(".weight.codes")}
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    wrong = [k for k, v in rest.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        raise ConfigError(f"load_integer: {path} does not fit {type(skeleton).__name__}: {wrong[0]} has shape "
                          f"{tuple(rest[wrong[0]].shape)} in the file, {shapes[wrong[0]]} in the model")
    result = skeleton.load_state_dict(rest, strict=False)
    want = {f"{n}.weight" for n in meta}
    if set(result.missing_keys) != want or result.unexpected_keys:
        extra = sorted(set(result.missing_keys) - want) or result.unexpected_keys
        raise ConfigError(f"load_integer: {path} does not fit {type(skeleton).__name__} (e.g. {extra[:3]})")
    undo, layers = Undo(), {}
    for name, m in meta.items():
        layer = modules[name]
        layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # the float weight is gone
        layers[id(layer.weight)] = _IntLayer(tensors[f"{name}.weight.codes"], m)
        undo.changes += 1
    intercept(skeleton, ("conv1d", "conv2d", "conv3d", "linear"), _handler(layers), undo, first=True)
    register_state(skeleton, lambda: [r.data for r in layers.values()], undo)
    return undo


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(layer records, tensors) of an export file; a file that is not one is a one-line ConfigError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("edgetrain.intexport")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ConfigError(f"load_integer: {path} does not exist") from None
    except Exception as e:  # safetensors' own errors (truncated, not safetensors)
        raise ConfigError(f"load_integer: {path} is not a readable safetensors file "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if raw is None:
        raise ConfigError(f"load_integer: {path} was not written by export_integer")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"load_integer: {path} has corrupt export metadata ({e.msg} at character {e.pos})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"load_integer: {path} has corrupt export metadata (not a mapping of layers)")
    return meta, tensors


def _check_layer(path: str | Path, name: str, m: Any, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> None:
    """One layer's record against the file's codes and the model's layer: a one-line ConfigError on a mismatch."""
    keys = ("shape", "bits", "scale", "mult", "offset", "input")
    if not isinstance(m, dict) or any(k not in m for k in keys):
        raise ConfigError(f"load_integer: {path}: layer {name!r} has an incomplete record (needs {', '.join(keys)})")
    if tuple(m["shape"]) != shape:
        raise ConfigError(f"load_integer: {path}: layer {name!r} has shape {tuple(m['shape'])} in the file, {shape} "
                          "in the model (another architecture?)")
    bits, spec = m["bits"], m["input"]
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"load_integer: {path}: layer {name!r} has an invalid bit width {bits!r}")
    if not isinstance(spec, dict) or spec.get("method") not in ("lsq", "dorefa") or \
            (spec.get("method") == "lsq" and spec.get("bits") != FP and any(k not in spec for k in ("step", "n", "p"))):
        raise ConfigError(f"load_integer: {path}: layer {name!r} has an invalid input record {spec!r}")
    data = tensors.get(f"{name}.weight.codes")
    if data is None:
        raise ConfigError(f"load_integer: {path} has no codes for layer {name!r}")
    c, numel = container_bits(bits), math.prod(shape)
    need = numel if c == 16 else math.ceil(numel * c / 8)
    if data.numel() < need:
        raise ConfigError(f"load_integer: {path}: the codes of layer {name!r} are truncated ({data.numel()} "
                          f"elements, {need} needed)")
