"""Low-precision numerics, emulated on fp32: floating-point formats (:mod:`.formats`) and block floating point
(:mod:`.bfp`) for LightNorm."""
