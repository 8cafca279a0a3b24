"""Block-scaled MSE codes: ``TurboQuantMSE(..., block_scales=True)``."""

import numpy as np
import pytest

from turboquant import TurboQuantMSE, TurboQuantProd
from turboquant._errors import InvalidParameterError, NonFiniteError
from turboquant.quant._codes import CodeSpec, MSECodes

ROTATIONS = ("dense", "hadamard")


def relative_errors(quantizer, x):
    x_hat = quantizer.dequantize(quantizer.quantize(x))
    return ((x - x_hat) ** 2).sum(1) / (x ** 2).sum(1)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("dim", [64, 128])
def test_gaussian_relative_mse_at_most_4_5_bits(dim, rotation):
    quantizer = TurboQuantMSE(dim, 4, seed=3, rotation=rotation, block_scales=True)
    assert 8 * quantizer.code_bytes / dim <= 4.5
    x = np.random.default_rng(dim).standard_normal((4000, dim))
    errors = relative_errors(quantizer, x)
    mean, standard_error = errors.mean(), errors.std(ddof=1) / np.sqrt(errors.size)
    # Below rotated iq4_nl (0.0064 at 4.5 bits) with 5 standard errors to spare,
    # and within 5 standard errors of the fitted value.
    assert mean + 5 * standard_error <= 0.0060
    assert abs(mean - quantizer.expected_distortion) <= 5 * standard_error + 2e-4


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_block_scales_beat_the_norm_at_every_bit_width(bits):
    dim = 64
    x = np.random.default_rng(bits).standard_normal((1000, dim))
    blocked = relative_errors(TurboQuantMSE(dim, bits, block_scales=True), x).mean()
    plain = relative_errors(TurboQuantMSE(dim, bits), x).mean()
    # One-bit blocks gain least (0.341 against 0.359); from 2 bits the error drops by a fifth or more.
    assert blocked < (0.97 if bits == 1 else 0.85) * plain


@pytest.mark.parametrize("dim", [2, 17, 40, 96])
def test_any_dim_and_byte_count(dim):
    quantizer = TurboQuantMSE(dim, 3, block_scales=True)
    codes = quantizer.quantize(np.random.default_rng(0).standard_normal((5, dim)))
    assert codes.nbytes == 5 * quantizer.code_bytes
    assert codes.norms.dtype == np.float16
    assert codes.block_scales.shape == (5, ((dim + 15) // 16 + 1) // 2)
    assert quantizer.dequantize(codes).shape == (5, dim)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inner_products_and_weighted_sum_match_the_reconstruction(dtype):
    rng = np.random.default_rng(5)
    quantizer = TurboQuantMSE(48, 4, seed=1, block_scales=True)
    codes = quantizer.quantize(rng.standard_normal((300, 48)).astype(dtype))
    x_hat = quantizer.dequantize(codes)
    queries = rng.standard_normal((3, 48)).astype(dtype)
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(quantizer.inner_products(codes, queries), queries @ x_hat.T,
                               rtol=tolerance, atol=tolerance * 10)
    weights = rng.random((2, 300))
    np.testing.assert_allclose(quantizer.weighted_sum(codes, weights), weights @ x_hat, rtol=1e-10, atol=1e-10)


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(6)
    quantizer = TurboQuantMSE(64, 4, block_scales=True)
    x = rng.standard_normal((3000, 64))
    one = quantizer.quantize(x, n_threads=1)
    two = quantizer.quantize(x, n_threads=2)
    assert one == two
    queries = rng.standard_normal((4, 64))
    np.testing.assert_array_equal(quantizer.inner_products(one, queries, n_threads=1),
                                  quantizer.inner_products(one, queries, n_threads=2))


def test_zero_vector_and_scale_invariance():
    quantizer = TurboQuantMSE(32, 4, block_scales=True)
    x = np.random.default_rng(7).standard_normal((2, 32))
    x[0] = 0.0
    x_hat = quantizer.dequantize(quantizer.quantize(x))
    np.testing.assert_array_equal(x_hat[0], 0.0)
    # Scaling by a power of two scales the float16 scale exactly and keeps every index.
    a, b = quantizer.quantize(x[1:]), quantizer.quantize(4.0 * x[1:])
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.block_scales, b.block_scales)


def test_default_codes_are_unchanged():
    x = np.random.default_rng(8).standard_normal((10, 64))
    plain = TurboQuantMSE(64, 4, seed=2)
    codes = plain.quantize(x)
    assert codes.block_scales is None and codes.norms.dtype == np.float32
    assert codes.spec == CodeSpec("mse", 64, 4, 2, "dense")
    assert plain.code_bytes == 32 + 4


def test_codes_round_trip_through_arrays_and_specs_differ():
    quantizer = TurboQuantMSE(64, 2, block_scales=True)
    codes = quantizer.quantize(np.random.default_rng(9).standard_normal((4, 64)))
    again = MSECodes.from_arrays(codes.spec.to_dict(), **codes.to_arrays())
    assert again == codes
    with pytest.raises(Exception, match="cannot"):
        TurboQuantMSE(64, 2).dequantize(codes)


def test_bad_parameters_and_inputs_raise_our_errors():
    with pytest.raises(InvalidParameterError):
        TurboQuantMSE(64, 5, block_scales=True)
    with pytest.raises(InvalidParameterError):
        TurboQuantMSE(64, 4, block_scales="yes")
    with pytest.raises(InvalidParameterError):
        CodeSpec("prod", 64, 4, 0, "dense", "gaussian", block_scales=True)
    quantizer = TurboQuantMSE(16, 4, block_scales=True)
    with pytest.raises(NonFiniteError):
        quantizer.quantize(np.full((1, 16), 1e5))
    bad = np.ones((2, 16))
    bad[1, 3] = np.nan
    with pytest.raises(NonFiniteError):
        quantizer.quantize(bad)
    assert isinstance(TurboQuantProd(16, 3), TurboQuantProd)  # Prod has no such option
    with pytest.raises(TypeError):
        TurboQuantProd(16, 3, block_scales=True)
