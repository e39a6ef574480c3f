"""The shared mechanism: a codec interface for tensors saved for backward, and the hooks that apply it.

A :class:`Codec` turns a tensor into a :class:`Payload` (``encode``) and back (``decode``). The payload's
``tensors`` are what stays alive until backward, so ``Payload.nbytes`` is the real memory cost (packed
``uint8`` data plus per-group statistics), not a modelled one.

:class:`SavedCompressor` applies codecs through :func:`torch.autograd.graph.saved_tensors_hooks`, entered
around the forward of scope modules (:func:`compress_scopes`; the whole model by default), so every eligible
tensor any op in scope saves is encoded at pack time and decoded at unpack time: functional ops, third-party
activation classes and the ops of subclasses alike. An op handler (:mod:`edgetrain.ops`) can switch the codec for
the tensors one op saves (:meth:`SavedCompressor.using`), e.g. more bits for normalisation inputs.

Eligible: floating point, at least ``min_bytes`` large, and not the storage of a parameter or buffer. A payload
that would not be smaller than the tensor's storage is dropped and the tensor kept as it is. Each unique storage
view is encoded once (a tensor saved by two layers shares one payload). Because innermost saved-tensor hooks win in
PyTorch, the meter's own hooks do not see these tensors, so the pack hook reports what it keeps alive with
:func:`edgetrain.measure.account_saved`: the payload tensors, or the tensor itself when it passes through.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.measure import account_saved


@dataclasses.dataclass(eq=False)
class Payload:
    """What a codec keeps for one tensor.

    Args:
        codec: the codec that decodes it.
        tensors: the tensors kept alive until backward (their bytes are the real cost).
        shape, dtype: of the original tensor.
        meta: small Python-side parameters (bit width, error bound, ...).
    """

    codec: Codec
    tensors: tuple[Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages in ``tensors``."""
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors}
        return sum(seen.values())

    @property
    def ratio(self) -> float:
        """Original bytes / payload bytes."""
        orig = torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        return orig / max(self.nbytes, 1)

    def decode(self) -> Tensor:
        return self.codec.decode(self)


class Codec:
    """Interface: ``encode(x) -> Payload`` and ``decode(payload) -> Tensor`` (same shape and dtype)."""

    name = "codec"

    def encode(self, x: Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload) -> Tensor:
        raise NotImplementedError


class IdentityCodec(Codec):
    """Keeps the tensor as is (the reference point; ratio 1)."""

    name = "identity"

    def encode(self, x: Tensor) -> Payload:
        return Payload(self, (x,), x.shape, x.dtype)

    def decode(self, payload: Payload) -> Tensor:
        return payload.tensors[0]


def _view_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t._version)


class SavedCompressor:
    """Saved-tensor hooks that encode eligible tensors with a codec (one instance per applied technique).

    Args:
        resident: tensors never to encode (the model's parameters and buffers; refreshed by ``refresh``).
        min_bytes: smaller tensors pass through unencoded (statistics, indices, masks, scalars).
    """

    def __init__(self, resident: Callable[[], Iterable[Tensor]] = tuple, min_bytes: int = 4096,
                 codec: Codec | None = None, owner: Any = None) -> None:
        self._resident_fn = resident
        self.min_bytes = min_bytes
        self.codec = codec  # the default codec of :meth:`hooks` without an argument
        self.override: Codec | None = None  # set by :meth:`using` while one op runs
        self.owner = owner  # its ``hits`` count the tensors encoded (``apply_``'s did-something check)
        self._resident: set[int] = set()
        self._cache: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self.encoded_bytes = 0  # running totals since construction (diagnostics, not the meter)
        self.payload_bytes = 0
        self.refresh()

    def refresh(self) -> None:
        """Re-read the storages of parameters and buffers (call if the model's tensors were replaced)."""
        self._resident = {t.untyped_storage().data_ptr() for t in self._resident_fn()}

    def eligible(self, t: Tensor) -> bool:
        return (t.is_floating_point() and not isinstance(t, nn.Parameter) and t.device.type != "meta"
                and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self._resident)

    def _lookup(self, t: Tensor, key: tuple) -> Payload | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        src, payload = hit[0](), hit[1]()
        if src is None or payload is None or src.untyped_storage().data_ptr() != key[0]:
            del self._cache[key]
            return None
        return payload

    def _remember(self, t: Tensor, key: tuple, payload: Payload) -> None:
        if len(self._cache) > 4096:  # prune entries whose tensor or payload died
            self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None and v[1]() is not None}
        self._cache[key] = (weakref.ref(t), weakref.ref(payload))

    def pack(self, t: Tensor, codec: Codec | None = None) -> Tensor | Payload:
        codec = self.override or codec or self.codec
        if codec is None or not self.eligible(t):
            account_saved(t)
            return t.detach()  # not ``t``: a saved output returned as is holds its own graph alive (a leak)
        key = _view_key(t)
        payload = self._lookup(t, key)
        if payload is None:
            with torch.no_grad():
                payload = codec.encode(t.detach())
            if payload.nbytes >= t.untyped_storage().nbytes():  # incompressible (e.g. noise): never keep more
                account_saved(t)
                return t.detach()
            self._remember(t, key, payload)
            self.encoded_bytes += t.numel() * t.element_size()
            self.payload_bytes += payload.nbytes
            if self.owner is not None:
                self.owner.hits += 1
        account_saved(*payload.tensors)
        return payload

    @staticmethod
    def unpack(obj: Tensor | Payload) -> Tensor:
        if isinstance(obj, Payload):
            with torch.no_grad():
                return obj.decode()
        return obj

    def hooks(self, codec: Codec | None = None) -> torch.autograd.graph.saved_tensors_hooks:
        """A context manager: tensors saved inside it are encoded with ``codec`` (default ``self.codec``)."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(t, codec), self.unpack)

    def using(self, codec: Codec | Callable[[], Codec]) -> Callable[[Any], Any]:
        """An op handler that runs the op with ``codec`` (or ``codec()``) for what it saves."""

        def handle(call: Any) -> Any:
            prev = self.override
            self.override = codec if isinstance(codec, Codec) else codec()
            try:
                return call.proceed()
            finally:
                self.override = prev

        return handle


def outermost(names: Iterable[str]) -> list[str]:
    """The names not inside another one of ``names`` (``""``, the root, contains everything)."""
    names = list(dict.fromkeys(names))
    if "" in names:
        return [""]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def compress_scopes(model: nn.Module, compressor: SavedCompressor, scopes: Iterable[str], undo: Any) -> list[str]:
    """Enter ``compressor.hooks()`` around every forward of the (outermost) ``scopes`` modules while grad is
    enabled; returns the scopes used. ``undo.remove()`` takes the hooks away."""
    modules = dict(model.named_modules())
    used = outermost(scopes)
    for name in used:
        active: list[Any] = []

        def pre(*_: Any, active=active) -> None:
            ctx = compressor.hooks() if torch.is_grad_enabled() else None
            if ctx is not None:
                ctx.__enter__()
            active.append(ctx)

        def post(*_: Any, active=active) -> None:
            ctx = active.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

        for h in (modules[name].register_forward_pre_hook(pre),
                  modules[name].register_forward_hook(post, always_call=True)):
            undo.add(h.remove)
    return used
