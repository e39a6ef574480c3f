"""LightNorm's BatchNorm: range normalisation, low-bit float arithmetic, block floating point, low-bit saved input.

Noh, Park, Park, Koo, Choi, Kung, *LightNorm: Area and Energy-Efficient Batch Normalization Hardware for On-Device
DNN Training*, ICCD 2022 (spec algorithms_A §7). Range BN is Banner et al., *Scalable Methods for 8-bit Training
of Neural Networks*, NeurIPS 2018. Per channel, over its ``n = N * spatial`` values split into ``K`` chunks
(consecutive in ``(N, *spatial)`` order, as the simulation's ``view``):

    mu = mean(x);  M = mean_k max(chunk k);  m = mean_k min(chunk k)
    sigma = (M - m) * C(n / K);  x_hat = (x - mu) / (sigma + eps);  y = gamma * x_hat + beta

with ``C(s) = 1 / sqrt(2 ln s)`` (``scale="banner"``, Banner's and the simulation's) or ``1 / d2(s)``
(``scale="d2"``, our option: ``d2(s)`` is the expected range of ``s`` standard normal samples, so sigma estimates
the standard deviation without bias on Gaussian data and a pre-trained model keeps its scale; Banner's ``C`` gives
``sigma`` of about 1.6-1.85 standard deviations, spec §7.3 pitfall 1). ``K`` is lowered so that chunks hold at
least two values; ``n`` need not be a multiple of ``K`` (the last chunk is shorter; spec pitfall 3).
``range_bn=False`` keeps the variance and square root (``sigma = sqrt(var + eps)``) with the other two pieces.

Backward (written out, tested against autograd through the forward and by gradcheck in float64): with
``h = gamma * dy`` and ``s = sigma + eps``,

    dx = (h - mean(h)) / s  -  (sum(h * x_hat) / s) * ds/dx,  ds/dx = C/K * (1[x is its chunk's max] - 1[min])
    dgamma = sum(dy * x_hat);  dbeta = sum(dy)

Numerics (the simulation's placement of ``SetPrecision``, spec §7.2): the input, gamma, beta, x_hat and y are cast
to the forward format (fp10 1-5-4 by default), the statistics to the forward format plus ``acc_bits`` mantissa bits
("+8"); the incoming gradient, dx and the parameter gradients (plus ``acc_bits``) to the backward format (fp10
1-6-3). BFP (when set) applies to the input and output in the forward pass and to dy and dx in the backward pass.
Casts pass gradients straight through.

Saved for backward: the input **as stored** (BFP codes, 1 byte per element plus 3 per block of 32 channels; or the
low-bit float's 16-bit code; or fp32 when neither is set), the per-channel mean and scale, gamma, and the chunk
extremes' positions within their chunks (``2 K`` per channel, ``uint8`` for chunks of up to 256 values): what
the meter counts is what is kept.

Running statistics (``running_mean``/``running_var`` of a module that tracks them) are updated with the momentum
the module passes; for range BN ``running_var`` takes ``sigma ** 2``, so the stock eval-mode BatchNorm computes
``(x - mu) / sqrt(sigma^2 + eps)``: the training normaliser to within ``eps / sigma`` (spec pitfall 2: the
simulation has no eval path and stores ``1 / sigma`` instead). Eval mode runs the stock op in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgetrain.lowp import bfp
from edgetrain.lowp.formats import FPFormat, cast, decode, encode

SCALES = ("banner", "d2")


@functools.lru_cache(maxsize=512)
def expected_range(s: float) -> float:
    """``d2(s)``: the expected range of ``s`` i.i.d. standard normal samples, ``int (1 - F^s - (1 - F)^s) dx``
    (real ``s >= 2``; numerical quadrature on [-12, 12], error < 1e-9). d2(2) = 2/sqrt(pi) = 1.1284."""
    x = np.linspace(-12.0, 12.0, 48001)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return float(np.trapezoid(1.0 - cdf**s - (1.0 - cdf) ** s, x))


def range_constant(s: float, scale: str) -> float:
    """``C(s)`` for chunks of ``s`` values: ``1/sqrt(2 ln s)`` (banner) or ``1/d2(s)`` (d2)."""
    return 1.0 / math.sqrt(2.0 * math.log(s)) if scale == "banner" else 1.0 / expected_range(round(s, 6))


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Where LightNorm rounds. ``None`` BFP: no block floating point."""

    fwd: FPFormat
    bwd: FPFormat
    acc_bits: int = 8
    rounding: str = "truncate"
    bfp_fwd: bfp.BFP | None = None
    bfp_bwd: bfp.BFP | None = None
    range_bn: bool = True
    num_chunks: int = 8
    scale: str = "banner"

    def f(self, t: Tensor) -> Tensor:
        return cast(t, self.fwd, self.rounding)

    def f_acc(self, t: Tensor) -> Tensor:
        return cast(t, self.fwd.plus(self.acc_bits), self.rounding)

    def b(self, t: Tensor) -> Tensor:
        return cast(t, self.bwd, self.rounding)

    def b_acc(self, t: Tensor) -> Tensor:
        return cast(t, self.bwd.plus(self.acc_bits), self.rounding)


def channels_first(x: Tensor) -> Tensor:
    """``(N, C, *)`` -> ``(C, N * prod(*))``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def channels_back(x2: Tensor, like: Tensor) -> Tensor:
    shape = (like.shape[1], like.shape[0], *like.shape[2:])
    return x2.reshape(shape).transpose(0, 1)


def chunks(n: int, k: int) -> tuple[int, int]:
    """``(K, chunk size)`` actually used for ``n`` values per channel: ``K`` lowered to keep chunks of >= 2 values
    (the last chunk, shorter when ``K`` does not divide ``n``, included: a one-value chunk has range 0)."""
    k = max(1, min(k, n // 2))
    size = -(-n // k)
    while n > 1 and n % size == 1:  # the last chunk would hold one value: larger chunks, fewer of them
        size += 1
    return -(-n // size), size  # no chunk made of padding only


def chunk_extremes(x2: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per channel and chunk: max and min values ``(C, K)`` and their positions within the chunk (int64)."""
    n = x2.shape[1]
    k, size = chunks(n, k)
    pad = k * size - n
    hi = F.pad(x2, (0, pad), value=-math.inf).view(-1, k, size).max(-1)
    lo = F.pad(x2, (0, pad), value=math.inf).view(-1, k, size).min(-1)
    return hi.values, lo.values, hi.indices, lo.indices


def position_dtype(size: int) -> torch.dtype:
    """The smallest integer type that holds a position within a chunk of ``size`` values."""
    return torch.uint8 if size <= 256 else torch.int16 if size <= 32768 else torch.int32


def _store(x: Tensor, num: Numerics) -> tuple[Tensor, list[Tensor], object]:
    """The input rounded as LightNorm reads it, and the tensors that store it (and how to read them back)."""
    xc = num.f(x)
    if num.bfp_fwd is not None:
        enc = bfp.encode(xc, num.bfp_fwd)
        return bfp.decode(enc, num.bfp_fwd).to(x.dtype), enc.tensors(), enc
    if num.fwd.bits <= 16 and not num.fwd.identity:
        return xc, [encode(xc, num.fwd)], x.shape
    return xc, [xc], None


def _fields(enc: bfp.Encoded) -> tuple[str, ...]:
    """The payload fields an encoding holds, in the order :meth:`bfp.Encoded.tensors` lists them."""
    return tuple(n for n in ("codes", "e1", "e2", "at") if getattr(enc, n) is not None)


def _load(saved: list[Tensor], how: object, num: Numerics) -> Tensor:
    if isinstance(how, tuple) and how and isinstance(how[0], bfp.Encoded):  # a BFP layout without its payload
        layout, fields = how
        enc = dataclasses.replace(layout, **dict(zip(fields, saved)))
        return bfp.decode(enc, num.bfp_fwd)
    if how is not None:
        return decode(saved[0], num.fwd)
    return saved[0]


def _view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


class LightNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm with LightNorm's numerics; returns ``(y, mean, var_for_running_stats)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, num: Numerics, eps: float):  # type: ignore[override]
        with torch.profiler.record_function("lightnorm::forward"):  # the BN-share benchmark reads these ranges
            return LightNormFunction._forward(ctx, x, weight, bias, num, eps)

    @staticmethod
    def _forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, num: Numerics, eps: float):  # noqa: ANN001, ANN205
        xq, stored, how = _store(x, num)
        x2 = channels_first(xq)
        n = x2.shape[1]
        mu = x2.mean(1)
        if num.range_bn:
            hi, lo, hi_at, lo_at = chunk_extremes(x2, num.num_chunks)
            k, _ = chunks(n, num.num_chunks)
            c = range_constant(n / k, num.scale)
            sigma = (hi.mean(1) - lo.mean(1)) * c
            s = sigma + eps
            running_var = sigma.detach() ** 2
            _, size = chunks(n, num.num_chunks)
            extremes = [hi_at.to(position_dtype(size)), lo_at.to(position_dtype(size))]
            ctx.coef = c / k
        else:
            var = x2.var(1, unbiased=False)
            s = torch.sqrt(var + eps)
            running_var = x2.var(1, unbiased=True) if n > 1 else var
            extremes = []
        # a constant channel's scale is eps, below fp10's smallest normal (2^-14): it would flush to zero and 0/0
        # make NaN, so the scale is held at the accumulation format's smallest normal
        acc = num.fwd.plus(num.acc_bits)
        mu_c, s_c = num.f_acc(mu), num.f_acc(s) if acc.identity else num.f_acc(s).clamp(min=2.0 ** acc.emin)
        g = num.f(weight) if weight is not None else None
        xhat = num.f((xq - _view(mu_c, xq)) / _view(s_c, xq))
        y = xhat if g is None else xhat * _view(g, xq)
        if bias is not None:
            y = y + _view(num.f(bias), xq)
        y = num.f(y)
        if num.bfp_fwd is not None:
            y = bfp.quantize(y, num.bfp_fwd)
        if isinstance(how, bfp.Encoded):  # ctx keeps the layout only: the payload lives (and dies) in saved_tensors
            how = (dataclasses.replace(how, codes=None, e1=None, e2=None, at=None), _fields(how))
        ctx.how, ctx.num, ctx.n_stored = how, num, len(stored)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(*stored, mu_c, s_c, *([g] if g is not None else []), *extremes)
        ctx.mark_non_differentiable(mu, running_var)
        # BFP's blocks come back as a reshape (a view): autograd forbids in-place ops on a custom Function's view
        # outputs (timm's `act(inplace=True)` after BN), so the output leaves as a plain tensor on the same storage
        return (y.detach() if y._is_view() else y), mu, running_var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmu, _dvar):  # type: ignore[override]
        with torch.profiler.record_function("lightnorm::backward"):
            return LightNormFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        num: Numerics = ctx.num
        saved = list(ctx.saved_tensors)
        stored, rest = saved[: ctx.n_stored], saved[ctx.n_stored:]
        mu_c, s_c = rest[0], rest[1]
        g = rest[2] if ctx.has_weight else None
        extremes = rest[3:] if ctx.has_weight else rest[2:]
        xq = _load(stored, ctx.how, num).to(dy.dtype)
        dy = num.b(dy)
        if num.bfp_bwd is not None:
            dy = bfp.quantize(dy, num.bfp_bwd)
        xhat = num.f((xq - _view(mu_c, xq)) / _view(s_c, xq))
        del xq
        dims = _dims(dy)
        dgamma = num.b_acc((dy * xhat).sum(dims)) if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbeta = num.b_acc(dy.sum(dims)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            h = dy * _view(g, dy) if g is not None else dy
            hx = (h * xhat).sum(dims)
            if num.range_bn:
                dx = (h - _view(h.mean(dims), h)) / _view(s_c, h)
                n = dy.numel() // dy.shape[1]
                k, size = chunks(n, num.num_chunks)
                ds = torch.zeros(dy.shape[1], k, size, dtype=dy.dtype, device=dy.device)
                w = (-hx / s_c * ctx.coef).view(-1, 1, 1).expand(-1, k, 1)
                ds.scatter_add_(2, extremes[0].to(torch.int64).unsqueeze(-1), w)
                ds.scatter_add_(2, extremes[1].to(torch.int64).unsqueeze(-1), -w)
                dx = dx + channels_back(ds.view(dy.shape[1], -1)[:, :n], dy)
            else:
                m = dy.numel() // dy.shape[1]
                dx = (h - _view(h.sum(dims) / m, h) - xhat * _view(hx / m, h)) / _view(s_c, h)
            dx = num.b(dx)
            if num.bfp_bwd is not None:
                dx = bfp.quantize(dx, num.bfp_bwd)
        return dx, dgamma, dbeta, None, None


def lightnorm_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                         bias: Tensor | None, momentum: float | None, eps: float, num: Numerics) -> Tensor:
    """``F.batch_norm(..., training=True)`` with LightNorm's numerics; updates the running statistics in place."""
    y, mu, var = LightNormFunction.apply(x, weight, bias, num, eps)
    if running_mean is not None and running_var is not None:
        mom = 0.1 if momentum is None else momentum
        with torch.no_grad():
            running_mean.mul_(1 - mom).add_(mu.to(running_mean.dtype), alpha=mom)
            running_var.mul_(1 - mom).add_(var.to(running_var.dtype), alpha=mom)
    return y
