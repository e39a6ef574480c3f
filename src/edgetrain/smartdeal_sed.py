"""SmartDeal's numerics: the power-of-two quantiser Q, the weight layouts, the SED decomposition, storage counts.

Chen, Zhao, Shi, Wang, Lin, Fu, Wang, *SmartDeal: Re-Modeling Deep Network Weights for Efficient Inference and
Training*, IEEE TNNLS 2022, arXiv:2101.01163 (journal extension of SmartExchange, Zhao et al., ISCA 2020); official
code ``VITA-Group/SmartDeal`` (spec: /work/shared/specs/algorithms_B.md section 2). Facts carried over from that code
are marked [CODE]; choices of ours [OURS].

A weight block ``A`` (n x 3, "tall") is stored as ``Ce @ B``: ``B`` a dense 3 x 3 basis, ``Ce`` (n x 3) structurally
sparse with every non-zero a signed power of two. Layouts (:class:`Layout`):

* 3x3 conv ``(C_out, C_in/groups, 3, 3)``: per output channel the kernel rows ``(C_in/groups * 3, 3)``, in blocks of
  at most 64 input channels (192 rows) [CODE: ``size_splits=64``]; a channel count that does not split evenly is
  zero-padded to equal blocks [OURS; upstream needs divisibility];
* 1x1 conv and linear ``(C_out, n)``: each weight row zero-padded to ``3 * splits * size`` and viewed as rows of 3,
  ``size <= 192`` rows per block [OURS generalisation of upstream's ``VEC_2_SHAPE`` table; it reproduces the table's
  entries 512->(1,171), 1024->(2,171), 2048->(4,171), 64->(1,22), 576->(1,192)];
* any other kernel (the 7x7 stem, 5x5, 1x3): no layout; left dense [CODE: the decomposition skips them].
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import Tensor

#: |c| < theta - EPS is zeroed by Q [CODE: ``sparsify_and_nearestpow2``'s 1e-5 slack]
EPS = 1e-5
#: SED clips |Ce| <= MAX_C [CODE: ``max_C = 32``]
MAX_C = 32.0
#: SED's convergence tolerance on ||Q(Ce) - Q(Ce)_prev||_F and lstsq's rcond [CODE: 1e-10 both]
TOL = 1e-10
RCOND = 1e-10
#: a 3x3 conv's blocks hold at most this many input channels [CODE: ``size_splits=64``]
CONV_CHANNELS = 64
#: a 1x1 conv's / linear's blocks hold at most this many rows of 3 [OURS, spec 2.7: the largest VEC_2_SHAPE entry]
VECTOR_ROWS = 192
M = 3  # basis size [CODE: 3x3 basis]
#: row directions the row start tries triples of [OURS: C(6, 3) = 20 cheap one-step fits]
CANDIDATES = 6


def pow2_quantize(c: Tensor, theta: float, tie: str = "upper", max_c: float | None = None) -> Tensor:
    """Q: zero below ``theta - EPS``, else ``sign(c)`` times the power of two nearer to ``|c|`` in linear distance.

    Args:
        c: any float tensor.
        theta: the sparsification threshold (absolute).
        tie: exactly half-way (``|c| = 1.5 * 2^k``) goes ``"upper"`` (training code) or ``"lower"`` (SED) [CODE].
        max_c: clip the magnitude (SED: :data:`MAX_C`); ``None``: no clip (training code).
    """
    a = c.abs()
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): lo = 2^(e-1) <= a < 2 lo, exact
    lo = torch.ldexp(torch.ones_like(a), e - 1)
    hi = 2 * lo
    below, above = a - lo, hi - a  # both exact (Sterbenz)
    up = (below > above) | ((below == above) & (tie == "upper"))
    mag = torch.where(up, hi, lo)
    if max_c is not None:
        mag = mag.clamp(max=max_c)
    return torch.where(a >= theta - EPS, torch.sign(c) * mag, torch.zeros_like(c))


class Pow2STE(torch.autograd.Function):
    """Q in the forward, the identity in the backward (straight-through, ``dL/dc = dL/dQ(c)``) [CODE]."""

    @staticmethod
    def forward(ctx, c: Tensor, theta: float, tie: str) -> Tensor:  # type: ignore[override]
        return pow2_quantize(c, theta, tie)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight of ``shape`` is cut into ``(C_out * splits, size, 3)`` blocks (``kind`` ``"conv3x3"`` or
    ``"vector"``; ``size`` rows per block; ``padded`` input channels (conv) or row length (vector) after padding)."""

    kind: str
    shape: tuple[int, ...]
    splits: int
    size: int
    padded: int

    @property
    def blocks_shape(self) -> tuple[int, int, int]:
        return (self.shape[0] * self.splits, self.size, M)

    def to_blocks(self, w: Tensor) -> Tensor:
        """The weight as blocks ``(C_out * splits, size, 3)`` (zero padding appended)."""
        cout, n = self.shape[0], self.shape[1]
        if self.kind == "conv3x3":
            w = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, self.padded - n))  # (C_out, padded, 3, 3)
        else:
            w = torch.nn.functional.pad(w.reshape(cout, n), (0, self.padded - n))  # (C_out, padded)
        return w.reshape(self.blocks_shape)

    def to_weight(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`to_blocks`: crop the padding, back to ``shape``."""
        cout, n = self.shape[0], self.shape[1]
        if self.kind == "conv3x3":
            return blocks.reshape(cout, self.padded, M, M)[:, :n]
        return blocks.reshape(cout, self.padded)[:, :n].reshape(self.shape)


def layout(shape: tuple[int, ...]) -> Layout | None:
    """The SD layout of a weight shape: 3x3 conv or 1x1 conv / linear; ``None`` for any other (left dense)."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[2:] == (3, 3):
        splits = math.ceil(shape[1] / CONV_CHANNELS)
        ch = math.ceil(shape[1] / splits)
        return Layout("conv3x3", shape, splits, ch * M, splits * ch)
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        rows = math.ceil(shape[1] / M)
        splits = math.ceil(rows / VECTOR_ROWS)
        size = math.ceil(rows / splits)
        return Layout("vector", shape, splits, size, splits * size * M)
    return None


def _lstsq(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``argmin_X ||a X - b||_F`` for ``a`` (N, n, 3): ``X = pinv(a^T a) a^T b``, the minimum-norm solution
    where ``a`` is rank-deficient (eigenvalues below ``RCOND`` times the largest are dropped). Solving through the 3x3
    Gram matrix is what makes SED fast on a CPU (thousands of tiny problems); float64 keeps it accurate."""
    at = a.transpose(1, 2)
    return torch.linalg.pinv(at @ a, rtol=RCOND, hermitian=True) @ (at @ b)


def _row_init(a: Tensor, theta: float) -> Tensor:
    """A basis made of three rows of each block [OURS]: among the :data:`CANDIDATES` row directions (up to sign and a
    power-of-two scale, compared exactly) that repeat most often, the three whose one-step fit ``Q(A B^-1) B`` is
    best. A block already in SD form has rows ``±2^k B[j]`` for every basis row its ``Ce`` uses alone, so this start
    recovers its basis up to powers of two; other blocks get three of their rows."""
    n = a.shape[1]
    norm = a.norm(dim=2)  # (N, n); scaling a row by 2^k scales its norm by 2^k exactly
    first = torch.gather(a, 2, (a != 0).to(torch.int8).argmax(2, keepdim=True))  # first non-zero of each row
    d = a / norm.clamp_min(1e-300).unsqueeze(2) * torch.sign(first)  # the row's direction, bitwise equal per cluster
    probe = torch.tensor([0.5772156649, 0.7071067812, 0.3183098862], dtype=a.dtype)  # any fixed generic vector
    key = torch.where(norm > 0, d @ probe, torch.full_like(norm, float("inf")))  # (N, n); zero rows last
    sk, order = key.sort(dim=1)
    start = torch.ones_like(sk, dtype=torch.bool)
    start[:, 1:] = sk[:, 1:] != sk[:, :-1]
    run = start.long().cumsum(1) - 1  # (N, n) run index of each sorted row
    count = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))  # rows per run
    first_of_run = torch.full_like(run, n - 1).scatter_reduce_(1, run, torch.arange(n).expand_as(run), "amin")
    count = torch.where(torch.isinf(sk.gather(1, first_of_run)), torch.zeros_like(count), count)
    k = min(CANDIDATES, n)
    top = count.topk(k, dim=1).indices  # (N, k) the most repeated directions
    rows = a.gather(1, order.gather(1, first_of_run.gather(1, top)).unsqueeze(2).expand(-1, -1, M))  # (N, k, 3)
    best, best_err = torch.eye(M, dtype=a.dtype).expand(a.shape[0], M, M).clone(), None
    for triple in itertools.combinations(range(k), M):  # the triple whose one-step projection fits best
        b = rows[:, list(triple)]
        c = pow2_quantize(a @ torch.linalg.pinv(b, rtol=RCOND), theta, "lower", MAX_C)
        err = (a - c @ b).flatten(1).norm(dim=1)
        better = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
        best = torch.where(better.view(-1, 1, 1), b, best)
        best_err = torch.where(better, err, best_err) if best_err is not None else err
    return best


def _sed_from(a: Tensor, b: Tensor, theta: float, iterations: int) -> tuple[Tensor, Tensor]:
    """SED's alternating least squares from the basis ``b`` [CODE, spec 2.4]; blocks stop one by one on converging."""
    ce = _lstsq(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)  # Ce = A B^-1 (= A for B = I)
    prev = None
    active = torch.ones(a.shape[0], dtype=torch.bool)
    for _ in range(iterations):
        q = pow2_quantize(ce, theta, "lower", MAX_C)
        if prev is not None:
            active &= (q - prev).flatten(1).norm(dim=1) > TOL
            if not active.any():
                break
        prev = q
        idx = active.nonzero()[:, 0]
        bb = _lstsq(q[idx], a[idx])
        cc = _lstsq(bb.transpose(1, 2), a[idx].transpose(1, 2)).transpose(1, 2)
        cc = torch.where(cc.abs() < theta, torch.zeros_like(cc), cc)
        b, ce = b.index_copy(0, idx, bb), ce.index_copy(0, idx, cc)
    ce = pow2_quantize(ce, theta, "lower", MAX_C)
    return ce, _lstsq(ce, a)


def sed(a: Tensor, theta: float, iterations: int = 30) -> tuple[Tensor, Tensor]:
    """Decompose blocks ``a`` (N, n, 3) into ``Ce`` (N, n, 3; signed powers of two and zeros) and ``B`` (N, 3, 3).

    Upstream's SED starts from ``B = I`` [CODE]; ours also starts from :func:`_row_init` and keeps, per block, the
    result with the smaller error [OURS]. Computed in float64; returns float64.
    """
    a = a.double()
    eye = torch.eye(M, dtype=a.dtype).expand(a.shape[0], M, M).clone()
    best_c, best_b = _sed_from(a, eye, theta, iterations)
    c2, b2 = _sed_from(a, _row_init(a, theta), theta, iterations)
    err1 = (a - best_c @ best_b).flatten(1).norm(dim=1)
    err2 = (a - c2 @ b2).flatten(1).norm(dim=1)
    better = (err2 < err1).view(-1, 1, 1)
    return torch.where(better, c2, best_c), torch.where(better, b2, best_b)


def exponent_bits(c: Tensor) -> int:
    """Bits of the exponent code of ``c``'s non-zeros: ``ceil(log2(#exponents from the smallest to the largest))``,
    at least 1 [OURS: a dense code over the range the layer uses]."""
    nz = c[c != 0].abs()
    if nz.numel() == 0:
        return 1
    _, e = torch.frexp(nz)
    span = int(e.max() - e.min()) + 1
    return max(1, math.ceil(math.log2(span)))


def storage_bits(c: Tensor, b: Tensor, basis_bits: int = 32) -> dict[str, int]:
    """Bits to store one layer in SD form: each non-zero of ``Ce`` as sign + exponent, a 1-bit mask over every
    ``Ce`` entry (padding included), ``B`` at ``basis_bits`` (fp32) [spec 2.6]."""
    nnz = int((c != 0).sum())
    e = exponent_bits(c)
    return {"nnz": nnz, "exponent_bits": e, "coefficient_bits": nnz * (1 + e), "mask_bits": c.numel(),
            "basis_bits": b.numel() * basis_bits, "total": nnz * (1 + e) + c.numel() + b.numel() * basis_bits}
