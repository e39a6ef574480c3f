"""What the block-parallel branches (KronA^B, TinyTL's lite residual) share: a branch computed from a block's input
and added to its output, by hooks on the block (its own forward runs unchanged).

The branch is computed in a forward *pre*-hook, before the block runs, so a block that changes its input in place
(a leading ``ReLU(inplace=True)``) does not change what the branch reads; the post-hook adds it to the first tensor
the block returns: the output itself, the first element of a tuple, list or named tuple, or the first tensor value
of a mapping (a ``transformers`` ``ModelOutput``), the container's type kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from edgetrain.ops import Undo


def first_tensor(tree: Any) -> Tensor | None:
    return next((t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)), None)


def add_to_output(out: Any, new: Callable[[Tensor], Tensor]) -> Any:
    """``out`` with its first tensor ``y`` replaced by ``new(y)``."""
    if isinstance(out, Tensor):
        return new(out)
    if isinstance(out, Mapping):
        key = next(k for k, v in out.items() if isinstance(v, Tensor))
        copy = type(out)(out) if not hasattr(out, "__dataclass_fields__") else out
        copy[key] = new(out[key])
        return copy
    if isinstance(out, (tuple, list)):
        items = list(out)
        items[0] = new(items[0])
        if hasattr(out, "_fields"):  # a named tuple
            return type(out)(*items)
        return type(out)(items)
    raise RuntimeError(f"the block returned a {type(out).__name__}, not a tensor or a container of tensors")


def install(block: nn.Module, branch: Callable[[nn.Module, Tensor], Tensor | None],
            combine: Callable[[Tensor, Tensor], Tensor], undo: Undo) -> tuple[Any, Any]:
    """Hooks computing ``r = branch(block, x)`` from the block's first input tensor before it runs, and replacing
    the first tensor ``y`` of its output by ``combine(y, r)``; the branch returning ``None`` changes nothing."""
    pending: list[Tensor | None] = []

    def pre(module: nn.Module, args, kwargs) -> None:  # noqa: ANN001
        x = first_tensor((args, kwargs))
        pending.append(branch(module, x) if x is not None else None)

    def post(module: nn.Module, args, kwargs, out):  # noqa: ANN001, ANN202
        r = pending.pop() if pending else None
        if r is None:
            return None
        undo.hits += 1
        return add_to_output(out, lambda y: combine(y, r))

    return (block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True, always_call=False))
