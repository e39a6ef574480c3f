"""Sparse layers stored sparse: a 1-D parameter of the nonzero values plus CSR index buffers.

The weight of :class:`SparseLinear` and :class:`SparseConv2d` is a CSR matrix (out, K) (K = in_features, or
in_channels * kh * kw for a conv) kept as three tensors: ``values`` (an ``nn.Parameter`` of the nnz values, in CSR
order), ``crow`` ((out + 1,) int32 row pointers) and ``col`` ((nnz,) int32 column indices), both buffers. Nothing
dense-sized is resident: weights, their gradient and any optimizer state kept per parameter are nnz-sized.

The products run through ``torch.sparse`` CSR kernels on the CPU (a custom autograd Function, :class:`_SparseMM`):

* forward ``Y = W @ X`` (``X`` = the input transposed to (K, N), or the conv input unfolded with ``F.unfold``);
* input gradient ``W^T @ dY`` (the CSR transpose is made in the backward, only when the input needs a gradient);
* value gradient: ``dY @ X^T`` sampled at the nonzeros only (``torch.sparse.sampled_addmm``, an SDDMM): the dense
  weight gradient is never made.

The conv saves its input, not the unfolded matrix (the backward unfolds again): saved bytes as a dense conv's.

RigL and DST-EE grow by the dense gradient magnitude. It is made only on a step the controller arms
(:attr:`SparseMixin.capture`, a callback given ``(dY, X)`` in the backward): see :mod:`edgetrain.sparse.dst`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError

# torch warns once per process that CSR support is beta; the layers here are tested against masked dense (float64)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

__all__ = ["SparseConv2d", "SparseLinear", "SparseMixin", "sparse_from_dense"]

INDEX = torch.int32  # CSR index dtype: torch.sparse accepts int32 or int64 (our choice: 4 bytes per index)


class _SparseMM(torch.autograd.Function):
    """``Y = W @ X`` for a CSR ``W`` given by ``(values, crow, col)``; ``X`` is ``x`` transposed (linear) or ``x``
    unfolded (conv, ``geometry`` set). Returns (out, N) for a linear, (B, out, L) for a conv."""

    @staticmethod
    def forward(ctx, values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int], x: Tensor,
                layer: SparseMixin, geometry: dict | None) -> Tensor:
        w = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
        xm = _as_matrix(x, geometry)
        y = w @ xm  # (out, N)
        ctx.save_for_backward(values, crow, col, x)
        ctx.shape, ctx.layer, ctx.geometry = shape, layer, geometry
        if geometry is not None:
            b = x.shape[0]
            return y.view(shape[0], b, -1).transpose(0, 1).contiguous()  # (B, out, L), laid out as a dense conv's
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, crow, col, x = ctx.saved_tensors
        geometry = ctx.geometry
        out = ctx.shape[0]
        gy = grad.transpose(0, 1).reshape(out, -1) if geometry is not None else grad  # (out, N)
        xm = _as_matrix(x, geometry)  # (K, N)
        w = torch.sparse_csr_tensor(crow, col, values, ctx.shape, check_invariants=False)
        grad_values = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.sparse.sampled_addmm(w.detach(), gy, xm.t(), beta=0.0).values()
        if ctx.needs_input_grad[4]:
            gxm = w.detach().t().to_sparse_csr() @ gy  # (K, N)
            grad_x = _from_matrix(gxm, x, geometry)
        capture = ctx.layer.capture
        if capture is not None:
            capture(ctx.layer, gy, xm)
        return grad_values, None, None, None, grad_x, None, None


def _as_matrix(x: Tensor, geometry: dict | None) -> Tensor:
    """(K, N): a linear input (N, K) transposed (a view), or a conv input unfolded to (K, B * L)."""
    if geometry is None:
        return x.t()
    cols = F.unfold(x, geometry["kernel_size"], geometry["dilation"], geometry["padding"], geometry["stride"])
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (B, K, L) -> (K, B * L)


def _from_matrix(gxm: Tensor, x: Tensor, geometry: dict | None) -> Tensor:
    if geometry is None:
        return gxm.t()
    b = x.shape[0]
    cols = gxm.view(gxm.shape[0], b, -1).transpose(0, 1)  # (B, K, L)
    return F.fold(cols, x.shape[-2:], geometry["kernel_size"], geometry["dilation"], geometry["padding"],
                  geometry["stride"])


class SparseMixin(nn.Module):
    """What both sparse layers share: the CSR state, the pattern's flat indices, and setting a new pattern.

    Attributes:
        values: ``nn.Parameter`` (nnz,), the nonzero weights in CSR (row-major) order.
        crow, col: int32 buffers, the CSR row pointers (out + 1,) and column indices (nnz,).
        capture: ``None``, or a callback ``capture(layer, dY, X)`` the backward calls (the controller's dense-gradient
            scorer on an update step; ``dY`` (out, N), ``X`` (K, N)).
    """

    values: nn.Parameter
    crow: Tensor
    col: Tensor
    capture: Callable[[SparseMixin, Tensor, Tensor], None] | None

    def _init_sparse(self, out: int, k: int, flat: Tensor, values: Tensor) -> None:
        self.shape2d = (out, k)
        self.values = nn.Parameter(values.detach().clone())
        crow, col = _csr_indices(flat, out, k)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.capture = None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / math.prod(self.shape2d)

    def flat_indices(self) -> Tensor:
        """The nonzeros' positions in the flattened (out, K) weight, int64, ascending (CSR order)."""
        rows = torch.repeat_interleave(torch.arange(self.shape2d[0]), self.crow.diff().long())
        return rows * self.shape2d[1] + self.col.long()

    def mask(self) -> Tensor:
        """The dense bool mask (out, K) (for tests and inspection; not used in training)."""
        m = torch.zeros(math.prod(self.shape2d), dtype=torch.bool)
        m[self.flat_indices()] = True
        return m.view(self.shape2d)

    def dense_weight(self) -> Tensor:
        """The dense weight with zeros off the pattern, in the original layer's shape (a new tensor)."""
        w = torch.zeros(math.prod(self.shape2d), dtype=self.values.dtype)
        w[self.flat_indices()] = self.values.detach()
        return w.view(self.weight_shape)

    @torch.no_grad()
    def set_pattern(self, flat: Tensor, values: Tensor) -> None:
        """A new pattern (flat indices, ascending, same count as now) and its values, in place: the parameter
        object and its size stay (the optimizer's state stays keyed to it)."""
        if flat.numel() != self.nnz:
            raise ValueError(f"set_pattern: {flat.numel()} indices for a layer of nnz {self.nnz}")
        crow, col = _csr_indices(flat, *self.shape2d)
        self.crow.copy_(crow)
        self.col.copy_(col)
        self.values.copy_(values)

    def _mm(self, x: Tensor, geometry: dict | None) -> Tensor:
        return _SparseMM.apply(self.values, self.crow, self.col, self.shape2d, x, self, geometry)


def _csr_indices(flat: Tensor, out: int, k: int) -> tuple[Tensor, Tensor]:
    rows = torch.div(flat, k, rounding_mode="floor")
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    return crow.to(INDEX), (flat - rows * k).to(INDEX)


class SparseLinear(SparseMixin):
    """``nn.Linear`` with a CSR weight (values + int32 indices); ``y = x W^T + b`` through :class:`_SparseMM`."""

    def __init__(self, in_features: int, out_features: int, flat: Tensor, values: Tensor,
                 bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_sparse(out_features, in_features, flat, values)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features), None).t()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}"


class SparseConv2d(SparseMixin):
    """``nn.Conv2d`` (groups 1, zero padding) with a CSR weight (out, in * kh * kw): im2col (``F.unfold``) and a
    sparse matmul; the backward unfolds the saved input again (what is saved is the input, as a dense conv's)."""

    def __init__(self, conv: nn.Conv2d, flat: Tensor, values: Tensor) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.geometry = {"kernel_size": conv.kernel_size, "dilation": conv.dilation, "padding": conv.padding,
                         "stride": conv.stride}
        self.weight_shape = tuple(conv.weight.shape)
        self._init_sparse(conv.out_channels, math.prod(conv.weight.shape[1:]), flat, values)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"SparseConv2d: expects a (B, C, H, W) input, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        g = self.geometry
        ho = (h + 2 * g["padding"][0] - g["dilation"][0] * (g["kernel_size"][0] - 1) - 1) // g["stride"][0] + 1
        wo = (w + 2 * g["padding"][1] - g["dilation"][1] * (g["kernel_size"][1] - 1) - 1) // g["stride"][1] + 1
        y = self._mm(x, g).reshape(b, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.geometry['kernel_size']}, nnz={self.nnz}"


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot take the sparse path (``None`` if it can): only plain ``nn.Linear`` and
    ``nn.Conv2d`` (groups 1, zero padding, numeric padding) are supported."""
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            return f"a grouped nn.Conv2d (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"an nn.Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"an nn.Conv2d with padding={module.padding!r}"
        return None
    return f"a {type(module).__name__}"


def sparse_from_dense(module: nn.Linear | nn.Conv2d, density: float, generator: torch.Generator) -> SparseMixin:
    """A sparse copy of ``module`` keeping ``round(density * numel)`` (at least 1) uniformly random positions with
    their dense initial values (RigL and SET start from a random pattern of the dense init)."""
    why = unsupported(module)
    if why is not None:
        raise ConfigError(f"sparse: {why} is not supported (nn.Linear, or nn.Conv2d with groups=1 and zero padding)")
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    numel = w.numel()
    nnz = max(1, min(numel, round(density * numel)))
    flat = torch.randperm(numel, generator=generator)[:nnz].sort().values
    vals = w.reshape(-1)[flat]
    if isinstance(module, nn.Linear):
        return SparseLinear(module.in_features, module.out_features, flat, vals, module.bias)
    return SparseConv2d(module, flat, vals)
