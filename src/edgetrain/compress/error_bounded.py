"""COMET-style error-bounded lossy compression of saved activations (algorithms_A §5.2, cuSZ-style).

Jin et al., *COMET: A Novel Memory-Efficient Deep Learning Training Framework by Using Error-Bounded Lossy
Compression*, PVLDB 15(4) 2022, arXiv:2111.09562. COMET uses SZ; this is the GPU-friendly "dual
quantisation" equivalent in pure torch:

    step  = 2 ** floor(log2(2 * eb))        # a power of two <= 2 eb (choice made here, see below)
    q     = round(x / step)                 # |x - step * q| <= step / 2 <= eb   for every element
    d     = q - q[..., i-1]                 # 1-D Lorenzo predictor along the last dimension
    d is stored in b bits (b in 2/4/8, offset 2^(b-1)), values outside the range in an escape list
    (int32 index + int32 value); b is chosen per tensor to minimise the bytes.
    decode: q = cumsum(d) along the last dimension; x_hat = step * q

A power-of-two bin width makes ``x / step`` and ``step * q`` exact in floating point, so the bound holds
exactly, not up to rounding; the cost is up to one extra bit per residual (the bin is between eb and 2 eb
wide). Exact zeros decode to exact zeros (so ReLU-style masks survive), and so does any value below
``step / 2`` in magnitude. Tensors whose ``max|x| / step`` exceeds ``2**24`` (fp32 mantissa) are kept
raw, as is everything when ``eb <= 0`` (identity: training is then exactly plain).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edgetrain.compress.bitpack import pack_bits, unpack_bits
from edgetrain.compress.codec import Codec, Payload
from edgetrain.errors import ConfigError

_WIDTHS = (1, 2, 4, 8)  # residual widths (bits); a block of zeros takes 0 bits
_BLOCK = 256  # residuals per block sharing one width
_ESCAPE_BYTES = 8  # int32 flat index + int32 value per residual that does not fit its block's width


def bin_width(eb: float) -> float:
    """The power-of-two bin width used for absolute error bound ``eb`` (``eb/2 < width/2 <= eb``)."""
    return 2.0 ** math.floor(math.log2(2 * eb))


class ErrorBoundedCodec(Codec):
    """Absolute-error-bounded codec: ``|x - decode(encode(x))| <= eb`` for every element.

    Args:
        eb: absolute error bound (same units as the tensor); ``0`` stores tensors raw. Mutable: the
            adaptive controller of :mod:`edgetrain.techniques.comet` changes it between steps.
    """

    name = "comet"

    def __init__(self, eb: float) -> None:
        if not isinstance(eb, (int, float)) or isinstance(eb, bool) or not math.isfinite(eb) or eb < 0:
            raise ConfigError(f"ErrorBoundedCodec.eb: must be a finite number >= 0, got {eb!r}")
        self.eb = float(eb)

    def _raw(self, x: Tensor) -> Payload:
        return Payload(self, (x,), x.shape, x.dtype, {"raw": True})

    def state_dict(self) -> dict:
        """The (possibly adapted) error bound: the codec's only state."""
        return {"eb": self.eb}

    def load_state_dict(self, state: dict) -> None:
        self.eb = float(state["eb"])

    def encode(self, x: Tensor) -> Payload:
        if not x.is_floating_point():
            raise ConfigError(f"ErrorBoundedCodec: needs a floating-point tensor, got {x.dtype}")
        if self.eb <= 0 or x.numel() == 0:
            return self._raw(x)
        step = bin_width(self.eb)
        limit = 2.0 ** min(round(-math.log2(torch.finfo(x.dtype).eps)) + 1, 30)  # exact integers in x.dtype
        if not bool((x.abs().amax() / step < limit).item()):  # also catches inf / nan
            return self._raw(x)
        width = x.shape[-1] if x.dim() else 1
        q = torch.round(x.reshape(-1, width) / step).to(torch.int32)  # (R, W) exact quantisation
        d = torch.diff(q, dim=1, prepend=q.new_zeros(q.shape[0], 1)).reshape(-1)  # (R * W,) Lorenzo residuals
        n = d.numel()
        d = torch.nn.functional.pad(d, (0, (-n) % _BLOCK)).view(-1, _BLOCK)  # (nb, BLOCK)
        span = torch.maximum(d, -d - 1)  # (nb, BLOCK) a residual fits in b bits (offset 2^(b-1)) iff span < 2^(b-1)
        # per block, the width minimising packed bytes + escapes (8 bytes each); all-zero blocks take 0 bits
        costs = torch.stack([(span >= 2 ** (b - 1)).sum(1) * _ESCAPE_BYTES + _BLOCK * b // 8 for b in _WIDTHS])
        widths = torch.tensor(_WIDTHS, dtype=torch.int32, device=d.device)[costs.argmin(0)]  # (nb,)
        widths = torch.where((d == 0).all(1), 0, widths)
        escape = (span >= (2 ** (widths - 1).clamp_min(0))[:, None]) & (widths[:, None] > 0)  # (nb, BLOCK)
        idx = escape.view(-1).nonzero().view(-1).to(torch.int32)  # (E,) flat positions
        vals = d.view(-1)[idx.long()]  # (E,) int32
        widths = widths.to(torch.uint8)
        parts = []
        for b in _WIDTHS:
            off = 2 ** (b - 1)
            parts.append(pack_bits((d[widths == b] + off).clamp_(0, 2 * off - 1), b))  # (nb_b * BLOCK * b / 8,)
        tensors = (widths, *parts, idx, vals)
        if sum(t.numel() * t.element_size() for t in tensors) >= x.numel() * x.element_size():
            return self._raw(x)  # incompressible at this bound
        meta = {"raw": False, "step": step, "width": width, "n": n}
        return Payload(self, tensors, x.shape, x.dtype, meta)

    def decode(self, payload: Payload) -> Tensor:
        if payload.meta["raw"]:
            return payload.tensors[0]
        widths, *parts, idx, vals = payload.tensors
        step, width, n = payload.meta["step"], payload.meta["width"], payload.meta["n"]
        d = torch.zeros(widths.numel(), _BLOCK, dtype=torch.int32, device=widths.device)  # (nb, BLOCK)
        for b, packed in zip(_WIDTHS, parts):
            sel = widths == b
            count = int(sel.sum())
            if not count:
                continue
            d[sel] = unpack_bits(packed, b, count * _BLOCK).view(count, _BLOCK).to(torch.int32) - 2 ** (b - 1)
        d.view(-1)[idx.long()] = vals
        q = torch.cumsum(d.view(-1)[:n].view(-1, width), dim=1, dtype=torch.int32)  # (R, W)
        return (q.to(payload.dtype) * step).reshape(payload.shape)


class SZ3Codec(ErrorBoundedCodec):
    """The real SZ3 compressor (PyPI ``pysz``, CPU, absolute error-bound mode) as a second backend.

    SZ3 does not keep zeros exact, so a packed 1-bit zero map is stored beside the SZ3 stream and applied
    after decompression (exact zeros -> exact zeros; the bound still holds). Costs a host round trip.
    """

    name = "comet-sz3"

    def __init__(self, eb: float) -> None:
        super().__init__(eb)
        try:
            from pysz import sz, szConfig, szErrorBoundMode  # optional dependency
        except ImportError:
            raise ConfigError("Comet.backend 'sz3' needs the optional package pysz (pip install pysz)") from None
        self._sz, self._config, self._mode = sz, szConfig, szErrorBoundMode

    def encode(self, x: Tensor) -> Payload:
        if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"SZ3Codec: needs a float32/float64 tensor, got {x.dtype}")
        if self.eb <= 0 or x.numel() == 0:
            return self._raw(x)
        arr = x.detach().cpu().contiguous().numpy()
        cfg = self._config()
        cfg.errorBoundMode = self._mode.ABS
        cfg.absErrorBound = self.eb
        stream, _ = self._sz.compress(arr, cfg)
        zeros = pack_bits(x.reshape(-1) == 0, 1)  # (ceil(n / 8),) uint8
        meta = {"raw": False, "device": x.device}
        return Payload(self, (torch.from_numpy(stream), zeros), x.shape, x.dtype, meta)

    def decode(self, payload: Payload) -> Tensor:
        if payload.meta["raw"]:
            return payload.tensors[0]
        stream, zeros = payload.tensors
        np_dtype = torch.empty((), dtype=payload.dtype).numpy().dtype
        arr, _ = self._sz.decompress(stream.numpy(), np_dtype, tuple(payload.shape))
        out = torch.from_numpy(arr).reshape(-1)  # (n,)
        out[unpack_bits(zeros, 1, out.numel()).bool()] = 0
        return out.reshape(payload.shape).to(payload.meta["device"])
