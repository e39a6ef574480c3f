"""What stock PyTorch 2.x autograd keeps for backward, per op: the rules of the cost model (:mod:`edgetrain.cost`).

Each rule was checked against the meter (``edgetrain.measure``) on the built-in models; ``tests/test_cost.py``
holds them to it. Ops not listed keep nothing of activation size (adds, views, concatenations, adaptive pooling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# op name -> what it keeps for backward: a tuple of ("in", i) / ("out",) / ("mask",) / ("stats", dim) /
# ("indices",) items. Only ops that keep activations are listed; anything else (add, view, cat, mul with a
# constant, ...) keeps nothing of activation size.
_ACT_IN = {"hardtanh", "relu6", "hardswish", "gelu", "silu", "elu", "leaky_relu", "hardsigmoid", "mish"}
_ACT_OUT = {"relu", "sigmoid", "tanh", "softmax", "log_softmax", "exp"}
_POOL_IN = {"avg_pool2d", "avg_pool1d"}  # adaptive average pooling keeps only the input's shape


def needs_grad(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def op_saves(name: str, args: tuple, kwargs: dict, out: Any) -> list[tuple[Tensor | None, int]]:
    """What stock autograd keeps for op ``name``: a list of ``(tensor or None, bytes)`` (None: a new storage)."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not torch.is_grad_enabled():
        return []
    if name == "mul" and len(args) > 1 and isinstance(args[1], Tensor):  # keeps each factor the other's grad needs
        y = args[1]
        return ([(y, 0)] if needs_grad(x) else []) + ([(x, 0)] if needs_grad(y) else [])
    if name in ("conv1d", "conv2d", "conv3d"):  # one formula: input and weight (a parameter is skipped)
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        return [(x, 0)] + ([(w, 0)] if isinstance(w, Tensor) else []) if needs_grad(x) or needs_grad(w) else []
    if name == "linear":  # input for the weight gradient, weight for the input gradient (a parameter is skipped)
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        return ([(x, 0)] if needs_grad(w) else []) + ([(w, 0)] if needs_grad(x) and isinstance(w, Tensor) else [])
    if not (needs_grad(x) or any(needs_grad(a) for a in args[1:])):
        return []
    inplace = isinstance(out, Tensor) and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    if name == "batch_norm":
        c = x.shape[1]
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        return [(x, 0), (None, 2 * c * 4 if training else 0)]
    if name in ("layer_norm", "group_norm"):
        rows = x.numel() // math.prod(args[1]) if name == "layer_norm" else x.shape[0] * args[1]
        return [(x, 0), (None, 2 * rows * 4)]
    if name in _ACT_IN or name.rstrip("_") in _ACT_IN:
        return [(None, x.numel() * x.element_size())] if inplace else [(x, 0)]  # in place: autograd keeps a clone
    if name in _ACT_OUT or name.rstrip("_") in _ACT_OUT:
        return [(out, 0)] if isinstance(out, Tensor) else []
    if name == "dropout":
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        # CPU dropout multiplies by a mask of the input's dtype and keeps it (measured: 4 bytes per fp32 element)
        return [(None, x.numel() * x.element_size())] if training and p > 0 else []
    if name in _POOL_IN:
        return [(x, 0)]
    if name == "scaled_dot_product_attention":  # CPU flash kernel: q, k, v, output and the log-sum-exp rows
        q = args[0]
        return [(q, 0), (args[1], 0), (args[2], 0), (out, 0), (None, q[..., 0].numel() * 4)]
    if name == "max_pool2d":
        return [(x, 0), (None, out.numel() * 8 if isinstance(out, Tensor) else 0)]
    return []


def op_macs(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """Forward multiply-accumulates of convs and linears (others are counted as 0)."""
    if not isinstance(out, Tensor) or len(args) < 2 or not isinstance(args[1], Tensor):
        return 0
    w = args[1]
    if name.startswith("conv"):
        return out.numel() * w[0].numel()
    if name == "linear":
        return out.numel() * w.shape[-1]
    return 0
