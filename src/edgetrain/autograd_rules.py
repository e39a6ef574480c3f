"""Multiply-accumulate counts per op for the cost model (:mod:`edgetrain.cost`).

What autograd keeps for backward is not modelled here: the cost model sees it through the meter's saved-tensor
hooks during its traced forwards, for every op and attention backend (an earlier rule table per op missed
functional calls inside non-leaf modules and the math attention path; it is gone).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def needs_grad(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def op_macs(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """Forward multiply-accumulates of convs and linears (others are counted as 0)."""
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if not isinstance(out, Tensor) or not isinstance(w, Tensor):
        return 0
    if name.startswith("conv"):
        return out.numel() * w[0].numel()
    if name == "linear":
        return out.numel() * w.shape[-1]
    return 0
