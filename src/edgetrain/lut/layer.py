"""LUTNet's K-input LUT layer with 2-level residual binarisation, and the binarised-network pieces around it.

Wang, Davis, Zhao, Cheung, Constantinides, *LUTNet: Rethinking Inference in FPGA Soft Logic* (FCCM 2019,
arXiv:1904.00938) and *Logic Shrinkage: Learned FPGA Netlist Sparsity for Efficient Neural Network Inference*
(Wang, Zhang, Cheung, Constantinides, Davis; FPGA 2022, arXiv:2112.02346); spec ``algorithms_B`` section 9. Facts
below were read in the public code ``awai54st/Logic-Shrinkage`` (``MNIST-SVHN-CIFAR10/training-software/
binarization_utils.py``, ``lutnet_init.py``); the code here is ours.

A binarised dense layer computes ``y_j = sum_i XNOR(w_ij, x_i)`` (a popcount). LUTNet replaces each XNOR (each
connection ``(i, j)``) with a trainable K-input LUT that reads the *anchor* input ``x_i`` plus ``K - 1`` extra inputs
``x_{r_1(i)}, ..., x_{r_{K-1}(i)}`` (``r_k`` a random permutation of the inputs, shared by all outputs: public
code). With residual binarisation (ReBNet) the input arrives as ``levels`` binary planes ``x^l in {-g_l, +g_l}``
and each level has its own table, so a LUT holds ``levels * 2**K`` coefficients. The forward pass is the
multilinear expansion (public code)::

    y_j = |gamma| * sum_l sum_i mask_ij * sum_p B(c[l, p, i, j]) * |x^l_i| * prod_k h_{bit_k(p)}(x^l_{r_k(i)})

with ``h_0(x) = (1 + sign x) / 2`` (bit 0 = non-negative input), ``h_1(x) = (1 - sign x) / 2`` and ``r_0(i) = i``
(the anchor, which alone carries the magnitude ``|x|``). Table address bit order (public code): input ``k`` is bit
``K - 1 - k`` of the address ``p``, i.e. the anchor is the most significant bit. For binary inputs exactly one
minterm is 1, so the sum *is* the table lookup ``g_l * c[l, address(x^l), i, j]`` (tested against a slow lookup).
``B`` binarises the coefficients with the straight-through estimator (:class:`SignSTE`; the public code's
``binarize`` is ``clip(x, -1, 1)`` forward-rounded to its sign); in the full-precision phases ``B`` is the clip.

Logic Shrinkage (:mod:`edgetrain.lut.shrink`) removes LUT inputs: the removed input ``k`` of a LUT is *forgotten*
by averaging its table over bit ``k``, applied to the latent table on every forward (public code), and a LUT with all
K inputs removed is pruned (``node_mask = 0``).

Our choices: ``sign(0) = +1`` (the public code's ``K.sign(0) = 0`` would give both halves weight 1/2); the extra
inputs are drawn from a ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError

__all__ = ["K_MAX", "K_MIN", "LEVELS_MAX", "BinaryLinear", "LUTLayer", "ResidualSign", "SignSTE", "check_k",
           "minterms", "sign_ste"]

K_MIN = 2  # a 1-input LUT is a plain XNOR/wire: the brief's lower bound (our assumption)
K_MAX = 6  # the public code builds up to 5 extra inputs (rand_map_0..rand_map_4), i.e. K <= 6; also one FPGA 6-LUT
LEVELS_MAX = 3  # Residual_sign in the public code implements 1, 2 or 3 residual levels


def check_k(k: object) -> int:
    """``k`` if it is an int in ``[K_MIN, K_MAX]``; else a one-line :class:`ConfigError`."""
    if isinstance(k, bool) or not isinstance(k, int) or not K_MIN <= k <= K_MAX:
        raise ConfigError(f"LUT K: must be an int in [{K_MIN}, {K_MAX}] (inputs per LUT), got {k!r}")
    return k


def _check_levels(levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= LEVELS_MAX:
        raise ConfigError(f"LUT levels: must be an int in [1, {LEVELS_MAX}] (residual binarisation levels), "
                          f"got {levels!r}")
    return levels


class SignSTE(torch.autograd.Function):
    """``sign(x)`` forward (with ``sign(0) = +1``); backward the clipped identity ``grad * 1[|x| <= 1]``.

    The straight-through estimator of BinaryConnect/BNN (Courbariaux et al. 2016, arXiv:1602.02830), as the public
    code's ``binarize`` (``clip`` forward-rounded to its sign, gradient of the clip). ``gradcheck`` does not apply
    (the forward is piecewise constant): the tests check both passes by hand.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """:class:`SignSTE` applied to ``x``."""
    return SignSTE.apply(x)


class ResidualSign(nn.Module):
    """ReBNet residual binarisation: ``(B, F) -> (B, levels, F)`` with level ``l`` = ``sign(r_l) * |m_l|``,
    ``r_0 = x``, ``r_{l+1} = r_l - level_l``. Trainable means initialised to ``(levels, ..., 1) / sum`` (public code:
    ``ars = arange(levels) + 1`` reversed, normalised: ``(2/3, 1/3)`` for 2 levels)."""

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        ars = torch.arange(levels, 0, -1, dtype=torch.float32)
        self.means = nn.Parameter(ars / ars.sum())

    def forward(self, x: Tensor) -> Tensor:
        out, resid = [], x
        for level in range(self.levels):
            b = sign_ste(resid) * self.means[level].abs()
            out.append(b)
            resid = resid - b
        return torch.stack(out, dim=1)


class BinaryLinear(nn.Module):
    """A binarised dense layer: ``y = x @ (|gamma| * B(w) * node_mask)``, ``B`` = :func:`sign_ste` (or the clip with
    ``binary=False``). A ``(B, levels, F)`` input is summed over its levels first (public code, ``LUT=False``);
    a ``(B, F)`` input (the first layer's real pixels) is used as is. Init ``w ~ N(0, 1/sqrt(F))``, ``gamma = 1``
    (public code)."""

    def __init__(self, in_features: int, out_features: int, *, binary: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.binary = in_features, out_features, binary
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("node_mask", torch.ones(in_features, out_features))

    def effective_weight(self) -> Tensor:
        """``|gamma| * B(w) * node_mask``, shape ``(in, out)``."""
        w = sign_ste(self.weight) if self.binary else self.weight.clamp(-1, 1)
        return self.gamma.abs() * w * self.node_mask

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.sum(dim=1)
        if x.dim() != 2 or x.shape[-1] != self.in_features:
            raise ConfigError(f"BinaryLinear: input of shape {tuple(x.shape)} does not match in_features "
                              f"{self.in_features}; expected (batch, {self.in_features}) or (batch, levels, "
                              f"{self.in_features})")
        return x @ self.effective_weight()


def minterms(anchor: Tensor, extras: list[Tensor]) -> Tensor:
    """The ``2**K`` multilinear minterms of one LUT input set, address order (anchor = most significant bit).

    Args:
        anchor: ``(..., F)`` signed values; the anchor's minterm factor is ``|x| * (1 +- sign x) / 2``.
        extras: ``K - 1`` tensors ``(..., F)``; their factor is ``(1 +- sign x) / 2`` (no magnitude).

    Returns:
        ``(..., 2**K, F)``: entry ``p`` is the product over inputs of ``h_{bit_k(p)}``.
    """
    s = sign_ste(anchor)
    out = torch.stack([(1 + s) / 2 * anchor.abs(), (1 - s) / 2 * anchor.abs()], dim=-2)
    for x in extras:
        s = sign_ste(x)
        pair = torch.stack([(1 + s) / 2, (1 - s) / 2], dim=-2)  # (..., 2, F)
        out = (out.unsqueeze(-2) * pair.unsqueeze(-3)).flatten(-3, -2)  # address p_old * 2 + bit: new input = LSB
    return out


class LUTLayer(nn.Module):
    """A dense layer of K-input LUTs, one per connection ``(i, j)``: LUTNet's multilinear truth-table form.

    Args:
        in_features: inputs ``F`` (each read as the anchor of ``out_features`` LUTs).
        out_features: outputs; each is the sum of its ``in_features`` LUTs (a popcount in hardware).
        k: inputs per LUT, ``K_MIN..K_MAX``.
        levels: residual binarisation levels of the input (the table has one ``2**K`` half per level).
        binary: binarise the coefficients with the STE (else clip them to ``[-1, 1]``: the full-precision phases).
        seed: seed of the extra inputs' random permutations.
        index: optional ``(K, in_features)`` long tensor of input indices (row 0 must be ``arange``, the anchor);
            overrides ``seed``.

    Input ``(B, levels, in_features)`` (a :class:`ResidualSign` output); output ``(B, out_features)``.
    Parameters: ``table (levels, 2**K, in, out)``, ``gamma`` (scalar). Buffers: ``index``, ``node_mask (in, out)``
    (0 = LUT pruned), ``removed (K, in, out)`` (bool: input forgotten by shrinkage).
    """

    def __init__(self, in_features: int, out_features: int, k: int = 4, levels: int = 2, *, binary: bool = True,
                 seed: int = 0, index: Tensor | None = None) -> None:
        super().__init__()
        self.k, self.levels = check_k(k), _check_levels(levels)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"LUTLayer {name}: must be an int >= 1, got {v!r}")
        self.in_features, self.out_features, self.binary = in_features, out_features, binary
        if index is None:
            gen = torch.Generator().manual_seed(seed)
            index = torch.stack([torch.arange(in_features)] +
                                [torch.randperm(in_features, generator=gen) for _ in range(k - 1)])
        index = torch.as_tensor(index)
        if tuple(index.shape) != (k, in_features):
            raise ConfigError(f"LUTLayer index: shape {tuple(index.shape)} does not match (K, in_features) = "
                              f"({k}, {in_features})")
        if index.dtype not in (torch.int32, torch.int64) or int(index.min()) < 0 or \
                int(index.max()) >= in_features or not torch.equal(index[0], torch.arange(in_features)):
            raise ConfigError(f"LUTLayer index: must hold input indices in [0, {in_features}) with row 0 = "
                              "arange(in_features) (the anchor)")
        self.register_buffer("index", index.long())
        self.table = nn.Parameter(torch.randn(levels, 2 ** k, in_features, out_features) / in_features ** 0.5)
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("node_mask", torch.ones(in_features, out_features))
        self.register_buffer("removed", torch.zeros(k, in_features, out_features, dtype=torch.bool))

    def shrunk_table(self) -> Tensor:
        """The latent table with every removed input averaged out (:func:`edgetrain.lut.shrink.average_out`)."""
        from edgetrain.lut.shrink import average_out

        return average_out(self.table, self.removed)

    def effective_table(self) -> Tensor:
        """``|gamma| * B(shrunk table) * node_mask``: what the forward reads, shape ``(levels, 2**K, in, out)``."""
        t = self.shrunk_table()
        t = sign_ste(t) if self.binary else t.clamp(-1, 1)
        return self.gamma.abs() * t * self.node_mask

    def lut_inputs(self) -> Tensor:
        """``(K, in, out)`` bool: inputs still read (not removed) by an unpruned LUT."""
        return ~self.removed & (self.node_mask > 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.levels or x.shape[2] != self.in_features:
            raise ConfigError(f"LUTLayer: input of shape {tuple(x.shape)} does not match (batch, levels, "
                              f"in_features) = (batch, {self.levels}, {self.in_features})")
        feats = minterms(x, [x[..., self.index[k]] for k in range(1, self.k)])  # (B, L, 2**K, F)
        table = self.effective_table()  # (L, 2**K, F, out)
        return feats.flatten(1) @ table.reshape(-1, self.out_features)

    @torch.no_grad()
    def expand_from(self, bnn: BinaryLinear) -> None:
        """Logic expansion: a LUT table that reproduces the binarised layer ``bnn`` exactly at init.

        ``c[l, p, i, j] = w_ij * (+1 if the anchor bit of p is 0 else -1)`` for every level, so each LUT computes
        ``w_ij * x_i`` and ignores its extra inputs; ``gamma`` and ``node_mask`` are copied. The public code's
        ``lutnet_init`` also adds ``+-w`` of the extra inputs' own connections where the BNN had pruned them
        ("pruning recovery"); we do not (our simplification).
        """
        if (bnn.in_features, bnn.out_features) != (self.in_features, self.out_features):
            raise ConfigError(f"LUTLayer.expand_from: BinaryLinear {bnn.in_features}x{bnn.out_features} does not "
                              f"match this layer's {self.in_features}x{self.out_features}")
        half = 2 ** (self.k - 1)
        sign = torch.cat([torch.ones(half), -torch.ones(half)]).view(1, -1, 1, 1)
        self.table.copy_((sign * bnn.weight.clamp(-1, 1)).expand_as(self.table))
        self.gamma.copy_(bnn.gamma)
        self.node_mask.copy_(bnn.node_mask)
        self.removed.zero_()
