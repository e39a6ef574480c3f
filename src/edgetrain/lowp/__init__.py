"""Low-precision numerics, emulated on fp32: floating-point formats (:mod:`.formats`) and block floating point
(:mod:`.bfp`) for LightNorm."""

# MEBQAT's switchable fake quantizers (LSQ, DoReFa/Yu21); the integer export is edgetrain.lowp.intexport
from edgetrain.lowp.fakequant import FakeQuant, get_bits, set_bits  # noqa: E402

__all__ = ["FakeQuant", "get_bits", "set_bits"]
