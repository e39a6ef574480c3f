"""Linear and Conv2d whose forward and both backward GEMMs use the approximate multiplier (ApproxTrain).

ApproxTrain (arXiv:2209.04161 §III-C; spec ``algorithms_B.md`` §1.3) runs all three GEMMs of a layer through
AMSim, with this operand order (it matters for non-commutative multipliers; the LUT row is the first operand):

* forward: ``y = x (x) W^T`` (a = activation / im2col patch, b = weight);
* input gradient: ``g_x = g (x) W`` (a = output gradient, b = weight);
* weight gradient: ``g_W^T = x^T (x) g`` (a = activation / im2col patch, b = output gradient).

Bias terms and their gradients are additions only (exact). Convolution goes through ``F.unfold`` (im2col) and the
input gradient through ``F.fold`` (col2im; additions only), group by group. Saved for backward: the layer input and
the weight, in fp32 (the unfold is recomputed in backward rather than stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.approx.amsim import check_fp32
from edgetrain.approx.gemm import amm
from edgetrain.approx.lut import LUT, get_lut
from edgetrain.errors import ConfigError


class ApproxLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with approximate products in forward and in both backward GEMMs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lut: LUT):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = amm(x2, weight.detach().t().contiguous(), lut)  # (N, out)
        if bias is not None:
            y = y + bias.detach()
        ctx.save_for_backward(x, weight)
        ctx.lut, ctx.has_bias = lut, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).contiguous()  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = amm(g2, weight.detach().contiguous(), ctx.lut).reshape(x.shape)  # (N, in)
        if ctx.needs_input_grad[1]:
            x2 = x.detach().reshape(-1, x.shape[-1])
            gw = amm(x2.t().contiguous(), g2, ctx.lut).t()  # (in, out) -> (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


class ApproxConv2dFn(torch.autograd.Function):
    """conv2d (zero padding, any stride/dilation/groups) via unfold + approximate GEMM, approximate backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                lut: LUT):  # type: ignore[override]
        n, cin, h, w = x.shape
        cout, cin_g, kh, kw = weight.shape
        cols = F.unfold(x.detach(), (kh, kw), dilation, padding, stride)  # (N, Cin*kh*kw, L)
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        kk, cog = cin_g * kh * kw, cout // groups
        wm = weight.detach().reshape(cout, kk)  # (C_out, Cin/g*kh*kw)
        ys = []
        for gi in range(groups):
            a = cols[:, gi * kk:(gi + 1) * kk, :].transpose(1, 2).reshape(-1, kk)  # (N*L, kk)
            ys.append(amm(a, wm[gi * cog:(gi + 1) * cog].t().contiguous(), lut))  # (N*L, C_out/g)
        y = torch.cat(ys, 1).reshape(n, ho * wo, cout).transpose(1, 2).reshape(n, cout, ho, wo)
        if bias is not None:
            y = y + bias.detach().view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.meta = (stride, padding, dilation, groups, lut, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, lut, has_bias = ctx.meta
        n, cin, h, w = x.shape
        cout, cin_g, kh, kw = weight.shape
        kk, cog = cin_g * kh * kw, cout // groups
        gm = g.reshape(n, cout, -1).transpose(1, 2).reshape(-1, cout)  # (N*L, C_out)
        wm = weight.detach().reshape(cout, kk)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            parts = [amm(gm[:, gi * cog:(gi + 1) * cog].contiguous(), wm[gi * cog:(gi + 1) * cog].contiguous(), lut)
                     for gi in range(groups)]  # each (N*L, kk)
            gcols = torch.cat(parts, 1).reshape(n, -1, cin * kh * kw).transpose(1, 2)  # (N, Cin*kh*kw, L)
            gx = F.fold(gcols, (h, w), (kh, kw), dilation, padding, stride)  # (N, Cin, H, W)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x.detach(), (kh, kw), dilation, padding, stride)  # (N, Cin*kh*kw, L)
            parts = []
            for gi in range(groups):
                at = cols[:, gi * kk:(gi + 1) * kk, :].transpose(0, 1).reshape(kk, -1).contiguous()  # (kk, N*L)
                parts.append(amm(at, gm[:, gi * cog:(gi + 1) * cog].contiguous(), lut).t())  # (C_out/g, kk)
            gw = torch.cat(parts, 0).reshape(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


def _lut(lut: LUT | None, multiplier: str, mantissa_bits: int) -> LUT:
    return lut if lut is not None else get_lut(multiplier, mantissa_bits)


def approx_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lut: LUT) -> Tensor:
    """Functional :class:`ApproxLinear`."""
    check_fp32(x, weight, *([] if bias is None else [bias]), what="ApproxLinear")
    return ApproxLinearFn.apply(x, weight, bias, lut)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Integer (symmetric) padding of ``conv``; ``'same'`` needing asymmetric padding is a ConfigError."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ConfigError(f"ApproxConv2d: padding='same' with kernel {conv.kernel_size} needs asymmetric padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


def approx_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                  lut: LUT) -> Tensor:
    """Functional :class:`ApproxConv2d` (zero padding; ``padding`` a pair of ints)."""
    check_fp32(x, weight, *([] if bias is None else [bias]), what="ApproxConv2d")
    if x.dim() != 4:
        raise ConfigError(f"ApproxConv2d: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    return ApproxConv2dFn.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, lut)


def conv_apply(conv: nn.Conv2d, lut: LUT, x: Tensor) -> Tensor:
    """``conv(x)`` with approximate products (the conv's own parameters; any padding mode)."""
    pad = conv_padding(conv)
    if conv.padding_mode != "zeros":
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=conv.padding_mode)
        pad = (0, 0)
    return approx_conv2d(x, conv.weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups, lut)


def conv_forward(conv: nn.Conv2d, lut: LUT):
    """An approximate forward for an existing ``nn.Conv2d`` (checks its padding once, here)."""
    conv_padding(conv)
    return lambda x: conv_apply(conv, lut, x)


class ApproxLinear(nn.Linear):
    """``nn.Linear`` computed with the approximate multiplier ``multiplier`` at ``mantissa_bits`` (or ``lut``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, multiplier: str = "mitchell",
                 mantissa_bits: int = 7, lut: LUT | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.lut = _lut(lut, multiplier, mantissa_bits)

    def forward(self, x: Tensor) -> Tensor:
        return approx_linear(x, self.weight, self.bias, self.lut)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.lut.name}, M={self.lut.M}"


class ApproxConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed with the approximate multiplier (same arguments, plus ``multiplier``, ...)."""

    def __init__(self, *args, multiplier: str = "mitchell", mantissa_bits: int = 7, lut: LUT | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lut = _lut(lut, multiplier, mantissa_bits)
        conv_padding(self)

    def forward(self, x: Tensor) -> Tensor:
        return conv_apply(self, self.lut, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.lut.name}, M={self.lut.M}"
