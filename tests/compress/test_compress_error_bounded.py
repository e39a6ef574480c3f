"""COMET codec: the absolute error bound holds on every element, zeros stay zero, error statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.compress.error_bounded import ErrorBoundedCodec, SZ3Codec, bin_width
from edgetrain.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(eb=st.floats(1e-5, 10.0), scale=st.floats(1e-3, 1e4), rows=st.integers(1, 9), cols=st.integers(1, 300),
       sparsity=st.floats(0, 0.9), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_bound_holds_on_every_element_and_zeros_stay_zero(eb, scale, rows, cols, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, dtype=dtype) * scale).cumsum(1)  # smooth-ish rows
    x[torch.rand(rows, cols, generator=g) < sparsity] = 0
    codec = ErrorBoundedCodec(eb)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).abs() <= eb).all()
    assert (y[x == 0] == 0).all()


def test_raw_when_eb_is_zero_or_range_too_large():
    x = torch.randn(64, 64)
    assert ErrorBoundedCodec(0).encode(x).tensors[0] is x
    big = x * 1e9
    p = ErrorBoundedCodec(1e-3).encode(big)
    assert p.meta["raw"] and torch.equal(p.decode(), big)


def test_smooth_data_compresses_and_payload_is_real():
    x = torch.linspace(0, 1, 64 * 256).reshape(64, 256).relu()  # Lorenzo residuals are tiny
    p = ErrorBoundedCodec(1e-3).encode(x)
    assert p.ratio > 10
    assert p.nbytes == sum(t.untyped_storage().nbytes() for t in p.tensors)


def test_weight_gradient_error_std_matches_the_model():
    # Spec §5.3: G = A^T Delta; error std eb' * sqrt(sum_k Delta_kj^2 / 3) with eb' = bin / 2 the
    # effective bound (uniform error on [-eb', eb']). Within 10% on random data.
    torch.manual_seed(0)
    a = torch.randn(4096, 32, dtype=torch.float64)
    delta = torch.randn(4096, 16, dtype=torch.float64)
    eb = 0.03
    codec = ErrorBoundedCodec(eb)
    err = (codec.decode(codec.encode(a)) - a).T @ delta  # (32, 16)
    predicted = bin_width(eb) / 2 * (delta.square().sum(0).mean() / 3).sqrt()
    assert float(err.std() / predicted) == pytest.approx(1.0, abs=0.1)


def test_errors():
    with pytest.raises(ConfigError, match="ErrorBoundedCodec.eb"):
        ErrorBoundedCodec(-1.0)
    with pytest.raises(ConfigError, match="floating-point"):
        ErrorBoundedCodec(0.1).encode(torch.ones(3, dtype=torch.int32))


def test_sz3_backend_bound_and_zeros():
    pytest.importorskip("pysz")
    torch.manual_seed(0)
    x = torch.randn(16, 32, 8, 8).relu()
    codec = SZ3Codec(0.01)
    p = codec.encode(x)
    y = codec.decode(p)
    assert ((y - x).abs() <= 0.01 * (1 + 1e-6)).all() and (y[x == 0] == 0).all()
    assert p.nbytes < x.numel() * 4
