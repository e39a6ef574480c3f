"""Compressed saved activations: bit packing, the codec interface and its codecs.

* :mod:`.bitpack` — 1/2/4/8-bit packing into ``uint8`` (real bytes, not ``torch.bool``).
* :mod:`.codec` — :class:`Codec` / :class:`Payload`, and :class:`SavedCompressor` (saved-tensor hooks
  that encode each unique saved tensor once and report the payload to the meter).
* :mod:`.masks` — ReLU / ReLU6 / hardtanh / LeakyReLU (and, approximately, Hardswish) ops whose backward keeps a
  packed 1-bit mask.
* :mod:`.quant` — ActNN per-group quantisation with unbiased stochastic rounding.
* :mod:`.error_bounded` — COMET-style error-bounded compression (dual quantisation + Lorenzo residuals).
"""

from edgetrain.compress.bitpack import SUPPORTED_BITS, pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask
from edgetrain.compress.codec import Codec, IdentityCodec, Payload, SavedCompressor, compress_scopes
from edgetrain.compress.masks import MASKABLE, MaskedActivation, mask_ops, masked_activation
from edgetrain.compress.quant import GroupQuantCodec, quant_payload_bytes

__all__ = [
    "SUPPORTED_BITS", "Codec", "GroupQuantCodec", "IdentityCodec", "MASKABLE", "MaskedActivation", "Payload",
    "SavedCompressor", "compress_scopes", "mask_ops", "masked_activation", "pack_bits", "pack_mask",
    "packed_nbytes", "quant_payload_bytes", "unpack_bits", "unpack_mask",
]
