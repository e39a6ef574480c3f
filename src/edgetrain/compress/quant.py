"""ActNN-style per-group quantisation with unbiased stochastic rounding (algorithms_A §8.1).

Chen, Zheng et al., *ActNN: Reducing Training Memory Footprint via 2-Bit Activation Compressed
Training*, ICML 2021, arXiv:2104.14129. Per sample, the flattened tensor is padded to a multiple of the
group size G (256, ActNN ``conf.py``) and split into groups. Per group:

    lo, hi = min, max  (stored as bfloat16 for fp32 input, as ActNN; rounded outward so lo <= x <= hi)
    B = 2**bits - 1;  scale = B / (hi - lo)
    q = floor((x - lo) * scale + u),  u ~ U(0, 1)     ->  E[q] = (x - lo) * scale  (unbiased)
    x_hat = q / scale + lo                          ->  E[x_hat] = x,  |x_hat - x| < (hi - lo) / B

``q`` is bit-packed (``bits`` per element). Cost: ``bits + 32 / G`` bits per element (2.125 at 2 bits).

Noise. Drawing a fresh uniform per element (``noise="independent"``) costs more than the quantisation
itself on CPU (about 14 ns per element with one thread, measured), so the default ``noise="pool"`` reads
the uniforms from a pool of ``2 * 2**16`` i.i.d. U(0, 1) draws (512 KiB of fp32, allocated once and redrawn in
place every 64 encodes; declared to the meter as technique state), each chunk of ``2**16`` elements starting at a
random offset. Each element's noise is still exactly U(0, 1), so rounding stays unbiased; elements of one chunk
position in different chunks may share a draw (correlated, not biased). The pool was ``2**21`` draws (8 MiB per
codec) before the meter could see it: on small models it was most of ActNN's peak (docs/memory.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetrain.compress.bitpack import SUPPORTED_BITS, pack_bits, unpack_bits
from edgetrain.compress.codec import Codec, Payload
from edgetrain.errors import ConfigError

NOISE_MODES = ("pool", "independent", "none")
_POOL = 2**16  # noise pool size: 2 x 2^16 fp32 = 512 KiB per codec, technique state the meter counts
_POOL_REFRESH = 64


def _bf16_outward(v: Tensor, up: bool) -> Tensor:
    """fp32 -> bf16 rounded toward -inf (``up=False``) or +inf (``up=True``), returned as bf16."""
    bits = v.contiguous().view(torch.int32) & ~0xFFFF  # truncate toward zero; exact in bf16
    t = bits.view(torch.float32)
    wrong = (t < v) if up else (t > v)  # truncation moved the wrong way: step one bf16 ulp away from zero
    t = torch.where(wrong, (bits + 0x10000).view(torch.float32), t)
    return t.to(torch.bfloat16)


class GroupQuantCodec(Codec):
    """Per-group min/max quantisation to ``bits`` in {1, 2, 4, 8} with stochastic rounding.

    Args:
        bits: bits per element (1, 2, 4 or 8).
        group_size: elements per group; each group adds two statistics (4 bytes for fp32 input).
        noise: ``"pool"`` (default, cheap, unbiased), ``"independent"`` (fresh ``rand`` per element) or
            ``"none"`` (round to nearest: deterministic, biased).
        seed: seed of the codec's own generator (the global RNG stream, e.g. dropout, is not touched).
    """

    name = "actnn"

    def __init__(self, bits: int = 2, group_size: int = 256, noise: str = "pool", seed: int = 0) -> None:
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"GroupQuantCodec.bits: must be one of {SUPPORTED_BITS}, got {bits!r}")
        if not isinstance(group_size, int) or group_size < 2:
            raise ConfigError(f"GroupQuantCodec.group_size: must be an int >= 2, got {group_size!r}")
        if noise not in NOISE_MODES:
            raise ConfigError(f"GroupQuantCodec.noise: must be one of {NOISE_MODES}, got {noise!r}")
        self.bits, self.group_size, self.noise = bits, group_size, noise
        self._gen = torch.Generator().manual_seed(seed)
        self._pool: Tensor | None = None
        self._uses = 0

    def _uniform_(self, v: Tensor) -> Tensor:
        """Add U(0, 1) noise to the flat tensor ``v`` in place (or 0.5 for ``noise="none"``)."""
        if self.noise == "none":
            return v.add_(0.5)
        if self.noise == "independent":
            return v.add_(torch.rand(v.shape, dtype=v.dtype, generator=self._gen).to(v.device))
        if self._pool is None or self._pool.dtype != v.dtype:
            self._pool = torch.empty(2 * _POOL, dtype=v.dtype, device=v.device)  # (2P,), made once
        if self._uses % _POOL_REFRESH == 0:
            self._pool.uniform_(generator=self._gen)  # redrawn in place: no new allocation in a training step
        self._uses += 1
        for start in range(0, v.numel(), _POOL):
            chunk = v[start:start + _POOL]
            off = int(torch.randint(0, _POOL, (), generator=self._gen))
            chunk.add_(self._pool[off:off + chunk.numel()])
        return v

    def encode(self, x: Tensor) -> Payload:
        if not x.is_floating_point():
            raise ConfigError(f"GroupQuantCodec: needs a floating-point tensor, got {x.dtype}")
        n = _rows(tuple(x.shape), self.group_size)
        g = self.group_size
        flat = x.reshape(n, -1)  # (N, D)
        d = flat.shape[1]
        pad = (-d) % g
        if pad:
            flat = F.pad(flat, (0, pad))  # (N, D + pad), zeros as ActNN
        groups = flat.reshape(-1, g)  # (N * ng, G)
        lo, hi = groups.amin(1), groups.amax(1)  # (N * ng,)
        if x.dtype == torch.float32:
            lo_s, hi_s = _bf16_outward(lo, up=False), _bf16_outward(hi, up=True)  # bf16 statistics
        else:
            lo_s, hi_s = lo, hi
        lo_c, hi_c = lo_s.to(x.dtype), hi_s.to(x.dtype)
        levels = 2**self.bits - 1
        scale = levels / (hi_c - lo_c).clamp_min(torch.finfo(x.dtype).tiny)  # (N * ng,)
        v = (groups - lo_c[:, None]).mul_(scale[:, None])  # (N * ng, G) in [0, B]
        self._uniform_(v.view(-1))
        q = v.clamp_(0, levels).to(torch.uint8)  # floor (v >= 0): (N * ng, G)
        packed = pack_bits(q, self.bits)  # (ceil(N * ng * G * bits / 8),)
        meta = {"bits": self.bits, "n": n, "d": d}
        return Payload(self, (packed, lo_s, hi_s), x.shape, x.dtype, meta)

    def decode(self, payload: Payload) -> Tensor:
        packed, lo_s, hi_s = payload.tensors
        bits, n, d = payload.meta["bits"], payload.meta["n"], payload.meta["d"]
        g = self.group_size
        dp = d + (-d) % g
        lo, hi = lo_s.to(payload.dtype), hi_s.to(payload.dtype)
        levels = 2**bits - 1
        step = (hi - lo) / levels  # (N * ng,)
        q = _unpack_float(packed, bits, n * dp, payload.dtype).view(-1, g)  # (N * ng, G)
        x = torch.addcmul(lo[:, None], q, step[:, None])  # (N * ng, G)
        return x.view(n, dp)[:, :d].reshape(payload.shape)

    def state_dict(self) -> dict:
        """The rounding-noise state (generator, encode count, and the pool while it is still in use): what a
        resumed run needs to draw the same noise as an uninterrupted one."""
        live = self._pool is not None and self._uses % _POOL_REFRESH != 0  # else the next encode redraws it
        return {"generator": self._gen.get_state(), "uses": self._uses, "pool": self._pool if live else None}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["generator"])
        self._uses = int(state["uses"])
        self._pool = state["pool"]


def _rows(shape: tuple[int, ...], group_size: int) -> int:
    """Rows grouped separately: one per sample (ActNN's per-sample groups), unless a row is shorter than a group
    (e.g. the (tokens, features) view a Linear keeps): then the tensor is grouped as one flat row, so that short
    rows are not each padded to a whole group (4x the payload for 64-feature rows at group 256)."""
    if len(shape) < 2 or shape[0] == 0 or math.prod(shape) // shape[0] < group_size:
        return 1
    return shape[0]


def _unpack_float(packed: Tensor, bits: int, numel: int, dtype: torch.dtype) -> Tensor:
    """Unpack to floats in one gather: a 256-row table maps each byte to its ``8 // bits`` values."""
    if bits == 8:
        return unpack_bits(packed, bits, numel).to(dtype)
    table = ((torch.arange(256, device=packed.device)[:, None] >> torch.arange(0, 8, bits, device=packed.device))
             & (2**bits - 1)).to(dtype)  # (256, per)
    return F.embedding(packed.long(), table).view(-1)[:numel]  # (numel,)


def quant_bits_per_element(bits: int, group_size: int = 256, stat_bytes: int = 2) -> float:
    """Average stored bits per element, ignoring padding: ``bits + 2 * 8 * stat_bytes / group_size``."""
    return bits + 2 * 8 * stat_bytes / group_size


def quant_payload_bytes(shape: tuple[int, ...], bits: int, group_size: int = 256, stat_bytes: int = 2) -> int:
    """Exact payload bytes :class:`GroupQuantCodec` uses for a tensor of ``shape`` (with padding)."""
    n = _rows(tuple(shape), group_size)
    d = math.prod(shape) // n
    ng = math.ceil(d / group_size)
    return math.ceil(n * ng * group_size * bits / 8) + 2 * stat_bytes * n * ng
