"""How a technique reaches a model: it acts on the torch functions the model calls, not on its module classes.

A user's model is not ours: its convolutions may be ``nn.Conv2d`` subclasses that pad in their own ``forward``,
its activations ``F.relu6`` calls or a library's own GELU class, its blocks may sit in a ``ModuleList``. So
techniques never re-implement a module's forward from its attributes. Instead, one :class:`Dispatcher` per model
(a :class:`~torch.overrides.TorchFunctionMode`) sees every torch function the model's forward calls
(``F.conv2d``, ``F.linear``, ``F.batch_norm``, ``F.relu6``, ``Tensor.relu``, ...) with the arguments the model
really passes, and runs the handlers techniques registered for that op, in registration (recipe) order:

    def frozen_conv(call):            # call.name == "conv2d"; call.args as the model passed them
        if call.args[1].requires_grad:
            return NotImplemented      # not mine: the next handler, or the stock op, runs
        return FrozenWeightConv.apply(*call.args)

    intercept(model, ["conv1d", "conv2d"], frozen_conv, undo)

The mode is entered by a forward pre-hook of whichever module of the model is called first and left by its
forward hook (``always_call``), so it is active exactly while the model computes, including recomputation by
activation checkpointing. Forward hooks on every module keep the stack of running modules, so a handler knows
the innermost module of each call (``call.module``) and techniques can be scoped to target modules.

Limits (stated, tested): a handler sees the ops the model calls through torch's Python API. Composite Python
functions that torch dispatches as one call (``F.multi_head_attention_forward`` of ``nn.MultiheadAttention``)
are seen as that one call; the ops inside them are not (:mod:`edgetrain.structure` lists them as opaque). Calling
``model.forward(x)`` instead of ``model(x)`` skips the root's hooks: ops in the root's own forward body then run
stock (children still enter the mode).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

Handler = Callable[["Call"], Any]


class Undo:
    """A removable change: callbacks run in reverse order by :meth:`remove`, and a record of what it did:
    ``changes`` (model state changed at apply: flags, forwards, parameters) and ``hits`` (calls its handlers
    handled), which :func:`edgetrain.apply_` reads to refuse a technique that did nothing."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.changes = 0
        self.hits = 0

    def add(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

_DISPATCHERS: weakref.WeakKeyDictionary[nn.Module, Dispatcher] = weakref.WeakKeyDictionary()
_STATE: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def op_name(func: Any) -> str:
    """The name a handler registers for: ``F.relu``, ``torch.relu`` and ``Tensor.relu`` are all ``relu``;
    in-place variants (``relu_``) keep their trailing underscore."""
    return getattr(func, "__name__", "") or ""


@dataclasses.dataclass
class Call:
    """One intercepted torch function call, as the model made it.

    Attributes:
        func: the torch function (``torch.conv2d``, ``F.batch_norm``, ``Tensor.relu``, ...).
        name: its :func:`op_name`.
        args, kwargs: the arguments the model passed.
        module: qualified name of the innermost module running (``""``: the root's own forward).
    """

    func: Any
    name: str
    args: tuple
    kwargs: dict
    module: str
    _chain: tuple[tuple[object, Handler], ...] = dataclasses.field(repr=False, default=())
    _at: int = dataclasses.field(repr=False, default=0)
    _dispatcher: Dispatcher | None = dataclasses.field(repr=False, default=None)

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``key``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(key, default)

    def proceed(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rest of the handler chain (then the stock op) on ``args``/``kwargs`` (default: unchanged)."""
        if not args and not kwargs:
            args, kwargs = self.args, self.kwargs
        return self._dispatcher._run(self.func, self.name, args, kwargs, self._chain, self._at + 1)


class Dispatcher(TorchFunctionMode):
    """The per-model mode: handlers by op name, and the stack of running modules. Use :func:`intercept`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.handlers: dict[str, list[tuple[object, Handler]]] = {}
        self.any: list[tuple[object, Handler]] = []  # handlers of every op (recorders)
        self.stack: list[str] = []
        self._hooks = []
        for name, m in model.named_modules():
            self._hooks.append(m.register_forward_pre_hook(lambda *_, n=name: self._enter(n)))
            self._hooks.append(m.register_forward_hook(lambda *_: self._exit(), always_call=True))

    # -- module stack ---------------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        if not self.stack:
            self.__enter__()
        self.stack.append(name)

    def _exit(self) -> None:
        self.stack.pop()
        if not self.stack:
            self.__exit__(None, None, None)

    @property
    def module(self) -> str:
        return self.stack[-1] if self.stack else ""

    # -- dispatch -------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = op_name(func)
        chain = self.handlers.get(name)
        if self.any:
            chain = (*self.any, *(chain or ()))
        if not chain:
            return func(*args, **kwargs)
        return self._run(func, name, args, kwargs, tuple(chain), 0)

    def _run(self, func, name: str, args: tuple, kwargs: dict, chain: tuple, at: int) -> Any:  # noqa: ANN001
        while at < len(chain):
            owner, fn = chain[at]
            out = fn(Call(func, name, args, kwargs, self.module, chain, at, self))
            if out is not NotImplemented:
                if owner is not None:
                    owner.hits += 1
                return out
            at += 1
        return func(*args, **kwargs)

    def empty(self) -> bool:
        return not self.any and not any(self.handlers.values())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def dispatcher(model: nn.Module) -> Dispatcher:
    """The model's dispatcher (created with its hooks on first use)."""
    d = _DISPATCHERS.get(model)
    if d is None:
        d = _DISPATCHERS[model] = Dispatcher(model)
    return d


def intercept(model: nn.Module, ops: Iterable[str] | None, fn: Handler, undo: Undo, count: bool = True,
              first: bool = False) -> None:
    """Run ``fn(call)`` for every call of ``ops`` (op names; ``None``: every op) inside ``model``'s forward.

    ``fn`` returns the op's result, or ``NotImplemented`` to pass the call on (to later handlers, then the stock
    op). Handlers run in registration order; ``first=True`` puts ``fn`` before the others (for handlers that
    only wrap ``call.proceed()``, e.g. to choose a codec). Calls it handles count in ``undo.hits`` (unless
    ``count=False``, for recorders). ``undo.remove()`` unregisters it; the model's hooks go with its last handler.
    """
    d = dispatcher(model)
    entry = (undo if count else None, fn)
    names = None if ops is None else list(ops)
    for lst in [d.any] if names is None else [d.handlers.setdefault(n, []) for n in names]:
        lst.insert(0, entry) if first else lst.append(entry)

    def remove() -> None:
        for lst in [d.any] if names is None else [d.handlers[n] for n in names]:
            if entry in lst:
                lst.remove(entry)
        if d.empty() and _DISPATCHERS.get(model) is d and not d.stack:
            d.close()
            del _DISPATCHERS[model]

    undo.add(remove)


def register_state(model: nn.Module, tensors: Callable[[], Iterable[Any]], undo: Undo) -> None:
    """Declare tensors a technique keeps alive beside the model (a codec's buffers, a lookup table): the meter
    counts them as technique state, and its census guard (tests/test_measure.py) fails on any it is not told of."""
    _STATE.setdefault(model, []).append(tensors)
    undo.add(lambda: _STATE.get(model, []).remove(tensors) if tensors in _STATE.get(model, []) else None)


def state_tensors(model: nn.Module) -> list[Any]:
    """The tensors techniques declared for ``model`` with :func:`register_state`."""
    return [t for fn in _STATE.get(model, []) for t in fn() if t is not None]


def current_module(model: nn.Module) -> str:
    """The innermost module of ``model`` running now (``""`` outside its forward or in the root's body)."""
    d = _DISPATCHERS.get(model)
    return d.module if d is not None else ""
