"""KronA: Kronecker-product adapters beside frozen linear and 2-d convolution layers.

Edalati et al., *KronA: Parameter Efficient Tuning with Kronecker Adapter*, ENLSP-III @ NeurIPS 2023,
arXiv:2212.10650. A frozen weight ``W0`` (out x in) gets the trainable update ``scale * (A kron B)`` with ``A``
(a1 x a2) and ``B`` (b1 x b2), ``a1 * b1 = out`` and ``a2 * b2 = in``: a full-rank update from ``a1*a2 + b1*b2``
parameters (spec algorithms_B §5.2). It is computed without forming the Kronecker product: the input's features
are read as an (a2, b2) matrix ``X`` and the update's output is ``A @ X @ B^T`` (a1, b1), read back row-major
(``(A kron B) vec_r(X) = vec_r(A X B^T)``; tested against ``torch.kron`` in float64). For a 2-d convolution (weight
out x in x kh x kw) ``B`` carries the kernel, (b1, b2, kh, kw): the input's channels are split into a2 groups of b2,
each convolved with ``B`` (as a batch of a2 images), and ``A`` mixes the a2 results; the update equals a convolution
with ``kron(A, B)``.

Factor shapes: by default the divisor pair of each dimension nearest its square root, the larger factor of ``out``
in ``A`` and the smaller of ``in`` (so a 768 x 768 layer gets A 32 x 24 and B 24 x 32, the spec's example);
``factors=(a1, a2)`` sets A's shape for every target (each must divide the layer's out and in). Init: ``A`` zero
(the update starts at zero and the model computes what it did), ``B`` Kaiming-uniform with a = sqrt(5) (which
factor is zero is not stated in the spec, §5.2 [MEM]; this is PEFT LoKr's choice, w1 zero). ``scale`` is the fixed
factor ``s`` of §5.2 (default 1.0, our choice; §5.4: a large ``s`` with Adam can destabilise training).

What is saved for backward: the layer's input (for ``B``'s gradient) and the (a2, b1) intermediate (for ``A``'s),
through the shared adapter handler (:mod:`edgetrain.techniques._adapter`); the frozen op saves nothing for its
weight. :func:`merge` folds ``scale * kron(A, B)`` into the weight: no added latency in the deployed model.
KronA^B (beside a whole block, not mergeable) is :mod:`edgetrain.techniques.krona_block`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.ops import Undo
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._adapter import KINDS, Adapter, Conv, default_targets, install, merge

__all__ = ["KronA", "factor_pair", "kron_apply", "merge"]


def _is_int(v: object, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclasses.dataclass(frozen=True, kw_only=True)
class KronA(Technique):
    """Kronecker adapters ``scale * (A kron B)`` on linear and 2-d convolution layers; the rest of the model frozen.

    Args:
        factors: ``(a1, a2)``, the shape of ``A`` for every target (``B`` is ``(out/a1, in/a2)``); default per
            layer, each dimension split near its square root.
        scale: the update's fixed factor ``s``.
        dropout: dropout on the adapter branch's input (0: none, and nothing extra saved).
        classifier: train the classifier whole (the layer of the model's last linear op), without an adapter.
        targets: layers to adapt (globs); default every linear and non-grouped conv2d layer but the classifier.
    """

    name = "krona"
    factors: tuple[int, int] | None = None
    scale: float = 1.0
    dropout: float = 0.0
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factors, list):
            object.__setattr__(self, "factors", tuple(self.factors))
        check(self.factors is None or (isinstance(self.factors, tuple) and len(self.factors) == 2 and
                                       all(_is_int(f) for f in self.factors)), KronA, "factors",
              f"must be two ints >= 1 (A's shape), got {self.factors!r}")
        check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0, KronA,
              "scale", f"must be > 0, got {self.scale!r}")
        check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, KronA, "dropout",
              f"must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.classifier, bool), KronA, "classifier", f"must be true/false, got {self.classifier!r}")


def factor_pair(n: int) -> tuple[int, int]:
    """``(p, q)`` with ``p * q = n`` and ``p <= q`` the divisor pair nearest ``sqrt(n)``."""
    p = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return p, n // p


def shapes(out: int, inp: int, factors: tuple[int, int] | None, who: str) -> tuple[int, int, int, int]:
    """``(a1, a2, b1, b2)`` for an out x in update; a one-line error when ``factors`` do not divide them."""
    if factors is None:
        (b1, a1), (a2, b2) = factor_pair(out), factor_pair(inp)
        return a1, a2, b1, b2
    a1, a2 = factors
    if out % a1 or inp % a2:
        raise ConfigError(f"{who}: factors {list(factors)} do not divide its (out, in) = ({out}, {inp}); give "
                          "factors dividing every target's dimensions, or other targets")
    return a1, a2, out // a1, inp // a2


def kron_apply(a: Tensor, b: Tensor, x: Tensor, conv: Conv | None = None, dim: int = -1) -> Tensor:
    """``(A kron B)`` applied to the features of ``x`` (dimension ``dim``; for ``conv`` the channels, with ``B``'s
    kernel) without forming the product."""
    a1, a2 = a.shape
    b1 = b.shape[0]
    if conv is not None:
        n, _, h, w = x.shape
        z = F.conv2d(x.reshape(n * a2, -1, h, w), b, None, conv.stride, conv.padding, conv.dilation)
        z = z.view(n, a2, b1, *z.shape[2:])
        return torch.einsum("ij,njk...->nik...", a, z).reshape(n, a1 * b1, *z.shape[3:])
    x = x.movedim(dim, -1)
    lead = x.shape[:-1]
    # two 2-d products (no broadcast matmul: its expanded copies are kept outside the saved-tensor hooks)
    z = x.reshape(-1, b.shape[1]) @ b.T  # (M * a2, b1)
    z = z.view(-1, a2, b1).transpose(1, 2).reshape(-1, a2)  # (M * b1, a2)
    y = (z @ a.T).view(-1, b1, a1).transpose(1, 2)  # (M, a1, b1)
    return y.reshape(*lead, a1 * b1).movedim(-1, dim)


def _delta(layer: nn.Module) -> Tensor:
    a, b = layer.krona_A, layer.krona_B
    return torch.kron(a.view(*a.shape, *(1,) * (b.dim() - 2)), b)


def _branch(layer: nn.Module, x: Tensor, conv: Conv | None) -> Tensor:
    return kron_apply(layer.krona_A, layer.krona_B, x, conv)


def _apply(model: nn.Module, cfg: KronA, targets: list[str], structure: Structure) -> Undo:
    def make(name: str, layer: nn.Module) -> tuple[dict[str, Tensor], Adapter]:
        w = layer.weight
        a1, a2, b1, b2 = shapes(w.shape[0], w.shape[1], cfg.factors, f"KronA: {name}")
        b = torch.empty(b1, b2, *w.shape[2:], dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        a = torch.zeros(a1, a2, dtype=w.dtype, device=w.device)
        return {"krona_A": a, "krona_B": b}, Adapter(("krona_A", "krona_B"), cfg.scale, cfg.dropout, _branch, _delta)

    return install(model, "KronA", cfg.classifier, cfg.targets is not None, targets, structure, make)


register(
    TechniqueInfo(
        config=KronA,
        apply=_apply,
        summary="Kronecker adapters (s * A kron B, never formed) on frozen linear and conv2d layers; merge() folds "
                "them in",
        paper="Edalati et al., KronA: Parameter Efficient Tuning with Kronecker Adapter, ENLSP-III @ NeurIPS 2023, "
              "arXiv:2212.10650",
        reduces=frozenset({"grads", "optimizer"}),
        layer_kinds=KINDS,
        default_targets=default_targets,
        looks_for="linear or dense conv2d layers",
        limits="grouped/depthwise convs are skipped (refused when named); weights read inside "
               "nn.MultiheadAttention or transformers' Conv1D (addmm) are not reached",
        conflicts=frozenset({"freeze", "bias_only", "sparse_update", "mobiletl", "int8_frozen", "lora"}),
        # exact, but the adapters are new parameters the generic reference cannot name:
        # tests/techniques/test_krona.py checks every gradient against plain PyTorch in float64
        exact=False,
        grad_tolerance=0.0,
        examples=(KronA(), KronA(factors=(2, 1), scale=0.5, classifier=False)),
    )
)
