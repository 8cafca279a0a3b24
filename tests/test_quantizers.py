"""TurboQuantMSE, TurboQuantProd and QJL: statistics, exactness, reproducibility, inputs.

Statistical tests use fixed seeds, and every tolerance is either a stated
margin checked to be at least 4 standard errors wide, or 4 standard errors.
"""

import math
import textwrap

import numpy as np
import pytest

from conftest import run_python, random_unit_vectors
from test_kernels import assert_ran_on
from turboquant import (
    QJL,
    DTypeError,
    IncompatibleCodesError,
    InvalidParameterError,
    MSECodes,
    NonFiniteError,
    ProdCodes,
    QJLCodes,
    ShapeError,
    TurboQuantError,
    TurboQuantMSE,
    TurboQuantProd,
    resolve_n_threads,
)

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps
ROTATIONS = ("dense", "hadamard")
SKETCHES = ("gaussian", "hadamard")
Z = 4.0                                  # standard errors allowed in statistical tests

STAT_DIM = 128


# -- numpy references used below ----------------------------------------------------
def unpack(packed, bits, dim):
    """(n, dim) integer indices of little-endian bit-packed rows."""
    n = packed.shape[0]
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : dim * bits]
    return (stream.reshape(n, dim, bits) << np.arange(bits)).sum(axis=2)


def rotation_matrix(mse):
    """``R`` with ``mse.rotate(x) == x @ R.T``, through the codec's rotate()."""
    return mse._codec.rotate(np.eye(mse.dim), 1).T


def sketch_matrix(quantizer):
    return quantizer._codec.sketch.transform.matrix


def reconstruction_parts(quantizer, codes):
    """(R, c1, S, c2): ``x_hat = R.T @ (c1 + S.T @ c2)`` row by row, from the codes alone."""
    d = quantizer.dim
    n = len(codes)
    norms = codes.norms.astype(np.float64)
    if isinstance(quantizer, QJL):
        signs = 2.0 * unpack(codes.signs, 1, d) - 1.0
        weights = norms * quantizer.scale
        return np.eye(d), np.zeros((n, d)), sketch_matrix(quantizer), signs * weights[:, None]
    mse = quantizer.mse if isinstance(quantizer, TurboQuantProd) else quantizer
    c1 = mse.codebook.centroids[unpack(codes.indices, mse.bits, d)] * norms[:, None]
    if isinstance(quantizer, TurboQuantMSE):
        return rotation_matrix(mse), c1, np.zeros((d, d)), np.zeros((n, d))
    signs = 2.0 * unpack(codes.signs, 1, d) - 1.0
    weights = norms * codes.residual_norms * quantizer.qjl_scale
    return rotation_matrix(mse), c1, sketch_matrix(quantizer), signs * weights[:, None]


def per_query_blocks(quantizer, x_blocks, queries, n_threads=None):
    """Estimates of <q_i, x> for query i against its own block of x only.

    Each query meets vectors no other query meets, so the per-query statistics
    are independent given the (fixed) rotation and sketch, and their spread
    gives an honest standard error. What it leaves out is the deviation of the
    one shared sketch from its expectation: for a Gaussian sketch the slope moves
    by mean_k ||s_k|| / sqrt(d) - 1, relative spread 1/(d sqrt(2)) ~ 0.6% of the
    QJL part, far below the per-query spread (about 2% for QJL alone), and the
    error variance by ||S||_F^2 / d^2 - 1, spread sqrt(2)/d ~ 1.1%, which the
    variance tests add to their standard errors.
    """
    m, block, dim = x_blocks.shape
    codes = quantizer.quantize(x_blocks.reshape(m * block, dim), n_threads=n_threads)
    estimates = np.stack([quantizer.inner_products(codes[i * block:(i + 1) * block], queries[i],
                                                   n_threads=n_threads) for i in range(m)])
    exact = np.einsum("qd,qnd->qn", queries, x_blocks)
    return estimates, exact


def slope_and_variance(estimates, exact):
    """Per-query regression slopes of estimate on truth, and per-query error variances."""
    centered = exact - exact.mean(axis=1, keepdims=True)
    slopes = (centered * (estimates - estimates.mean(axis=1, keepdims=True))).sum(axis=1) \
        / (centered ** 2).sum(axis=1)
    variances = ((estimates - exact) ** 2).mean(axis=1)
    return slopes, variances


def mean_and_se(values):
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


# == 1. MSE distortion =================================================================
MSE_N = 20000


@pytest.fixture(scope="module")
def unit_vectors_128():
    return random_unit_vectors(MSE_N, STAT_DIM, seed=2025)


@pytest.mark.parametrize("rotation, margin", [("dense", 0.03), ("hadamard", 0.05)])
@pytest.mark.parametrize("bits", range(1, 9))
def test_mse_distortion_matches_expected(unit_vectors_128, rotation, margin, bits):
    quantizer = TurboQuantMSE(STAT_DIM, bits, seed=bits, rotation=rotation)
    x = unit_vectors_128
    x_hat = quantizer.dequantize(quantizer.quantize(x))
    errors = np.sum((x - x_hat) ** 2, axis=1)                   # independent across vectors
    measured, se = mean_and_se(errors)
    expected = quantizer.expected_distortion
    assert Z * se < margin * expected, "the sample is too small for the margin to mean anything"
    assert abs(measured - expected) <= margin * expected, (measured, expected, se)


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_distortion_matches_expected(unit_vectors_128, sketch, bits):
    # expected_distortion = factor * D_mse(b-1) with the QJL reconstruction factor
    # (pi/2 - 1/d for the Gaussian sketch). The error is the QJL reconstruction error
    # of the residual, ||r||^2 (gamma^2 ||S^T sign(S r)||^2 - ...); one Gaussian sketch
    # is shared by all vectors, so the sample mean also carries that sketch's own
    # deviation, ||S||_F^2 / d^2 - 1, of relative spread sqrt(2)/d: it is added to the SE.
    # An orthogonal sketch has ||S^T s||^2 = d exactly, hence no such term.
    quantizer = TurboQuantProd(STAT_DIM, bits, seed=bits, rotation="dense", sketch=sketch)
    x = unit_vectors_128[:5000]
    errors = np.sum((x - quantizer.dequantize(quantizer.quantize(x))) ** 2, axis=1)
    measured, se = mean_and_se(errors)
    expected = quantizer.expected_distortion
    if sketch == "gaussian":
        se = math.hypot(se, math.sqrt(2) / STAT_DIM * expected)
    assert abs(measured - expected) <= Z * se, (measured, expected, se)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("seed", [0, 42])
def test_rotation_is_independent_of_data_drawn_with_the_same_seed(rotation, seed):
    # Users commonly draw data with default_rng(seed) and pass the same seed to the
    # quantizer. The rotation must still act as a random rotation of that data: every
    # rotated coordinate of a unit vector in R^128 is then about N(0, 1/128), and
    # |u_j| > 0.6 (6.8 standard deviations, probability ~1e-11) must never happen among
    # these 256 * 128 coordinates.
    dim, bits = STAT_DIM, 4
    x = np.random.default_rng(seed).standard_normal((256, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quantizer = TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
    rotated = quantizer._codec.rotate(x, 1)
    assert np.max(np.abs(rotated)) < 0.6, np.sort(np.abs(rotated).max(axis=1))[-5:]
    errors = np.sum((x - quantizer.dequantize(quantizer.quantize(x))) ** 2, axis=1)
    measured, se = mean_and_se(errors)
    assert abs(measured - quantizer.expected_distortion) <= Z * se, (measured, quantizer.expected_distortion)


# == 2. Inner-product estimators ==========================================================
IP_QUERIES = 32
IP_BLOCK = 2000


@pytest.fixture(scope="module")
def ip_data():
    x = random_unit_vectors(IP_QUERIES * IP_BLOCK, STAT_DIM, seed=77).reshape(IP_QUERIES, IP_BLOCK, STAT_DIM)
    queries = random_unit_vectors(IP_QUERIES, STAT_DIM, seed=78)
    return x, queries


@pytest.fixture(scope="module")
def prod_stats(ip_data):
    """(bits, sketch) -> per-query slopes and error variances of TurboQuantProd."""
    stats = {}
    for bits in (2, 3, 4):
        for sketch in SKETCHES:
            quantizer = TurboQuantProd(STAT_DIM, bits, seed=10 + bits, sketch=sketch)
            stats[bits, sketch] = slope_and_variance(*per_query_blocks(quantizer, *ip_data)) + (
                quantizer.mse.expected_distortion,)
    return stats


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_inner_products_are_unbiased(prod_stats, bits, sketch):
    slopes, _, _ = prod_stats[bits, sketch]
    slope, se = mean_and_se(slopes)
    assert abs(slope - 1.0) <= Z * se, (slope, se)
    assert se < 0.02                           # the test can see a 8% bias at b = 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_error_variance_gaussian_sketch(prod_stats, bits):
    # Var = (pi/(2d)) E||r||^2 - E<q, r>^2/d per query; E||r||^2 = D_mse(b-1) and the
    # second term is 2/(pi d) ~ 0.5% of the first, well inside the 15% margin.
    _, variances, d_mse = prod_stats[bits, "gaussian"]
    theory = math.pi / (2 * STAT_DIM) * d_mse
    measured, se = mean_and_se(variances)
    assert Z * se < 0.15 * theory
    assert abs(measured - theory) <= 0.15 * theory, (measured / theory, se / theory)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_hadamard_sketch_variance_not_larger(prod_stats, bits):
    # Measured ratio hadamard/gaussian is about 0.36 = 1 - 2/pi at d = 128: the
    # orthogonal sketch removes the spread of the Gaussian rows' norms.
    _, gaussian, _ = prod_stats[bits, "gaussian"]
    _, hadamard, _ = prod_stats[bits, "hadamard"]
    g, g_se = mean_and_se(gaussian)
    h, h_se = mean_and_se(hadamard)
    print(f"bits={bits}: Var(hadamard)/Var(gaussian) = {h / g:.3f}")
    assert h <= g + Z * math.hypot(g_se, h_se), (h / g)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_qjl_unbiased_and_variance_bound(ip_data, sketch):
    quantizer = QJL(STAT_DIM, seed=5, sketch=sketch)
    slopes, variances = slope_and_variance(*per_query_blocks(quantizer, *ip_data))
    slope, slope_se = mean_and_se(slopes)
    assert abs(slope - 1.0) <= Z * slope_se, (slope, slope_se)
    assert slope_se < 0.05
    bound = math.pi / (2 * STAT_DIM)                    # ||q|| = ||x|| = 1
    variance, variance_se = mean_and_se(variances)
    if sketch == "gaussian":                            # the shared sketch's ||S||_F^2 / d^2 - 1
        variance_se = math.hypot(variance_se, math.sqrt(2) / STAT_DIM * bound)
    assert variance <= bound + Z * variance_se, (variance / bound, variance_se / bound)
    assert Z * variance_se < 0.15 * bound


@pytest.mark.parametrize("dim", [2, 3, 16, 97, 128, 1000])
def test_qjl_scale_constants(dim):
    # The statistical tests above only see a wrong constant of a few percent; pin it.
    # Gaussian rows: E[sign(<s, r>) <s, q>] = sqrt(2/pi) <q, r>/||r||, so gamma = sqrt(pi/2)/d.
    # Orthogonal rows: E|s_1| of a uniform unit vector is the integral of |t| against the
    # coordinate density (1 - t^2)^((d - 3)/2) / B(1/2, (d - 1)/2), i.e. 2 / ((d - 1) B(1/2, (d - 1)/2)).
    log_beta = math.lgamma(0.5) + math.lgamma((dim - 1) / 2.0) - math.lgamma(dim / 2.0)
    e_abs = 2.0 / ((dim - 1) * math.exp(log_beta))
    assert QJL(dim).scale == pytest.approx(math.sqrt(math.pi / 2) / dim, rel=4 * EPS64)
    assert QJL(dim, sketch="hadamard").scale == pytest.approx(1.0 / (dim * e_abs), rel=1e-12)
    for bits in (2, 5):
        assert TurboQuantProd(dim, bits, rotation="hadamard").qjl_scale == QJL(dim).scale
        assert TurboQuantProd(dim, bits, rotation="hadamard", sketch="hadamard").qjl_scale == \
            QJL(dim, sketch="hadamard").scale


@pytest.mark.parametrize("sketch", SKETCHES)
def test_qjl_scales_with_norms(sketch):
    quantizer = QJL(64, seed=1, sketch=sketch)
    x = random_unit_vectors(20, 64, 1)
    q = random_unit_vectors(3, 64, 2)
    scores = quantizer.inner_products(quantizer.quantize(x), q)
    scaled = quantizer.inner_products(quantizer.quantize(x * 3.0), q * 2.0)
    np.testing.assert_allclose(scaled, 6.0 * scores, rtol=8 * EPS32, atol=64 * 8 * EPS32)


# == 3. inner_products equals q @ dequantize(codes).T ======================================
def make(kind, dim, bits, rotation, sketch="gaussian", seed=3):
    if kind == "mse":
        return TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
    if kind == "prod":
        return TurboQuantProd(dim, bits, seed=seed, rotation=rotation, sketch=sketch)
    return QJL(dim, seed=seed, sketch=sketch)


EXACT_DIMS = [2, 3, 97, 101, 128]
EXACT_CASES = (
    [("mse", bits, rotation, "gaussian") for bits in range(1, 9) for rotation in ROTATIONS]
    + [("prod", bits, rotation, sketch) for bits in range(2, 9) for rotation in ROTATIONS
       for sketch in SKETCHES]
    + [("qjl", 1, "dense", sketch) for sketch in SKETCHES]
)


@pytest.mark.parametrize("kind, bits, rotation, sketch", EXACT_CASES)
@pytest.mark.parametrize("dim", EXACT_DIMS)
def test_inner_products_equal_dequantized_products(kind, bits, rotation, sketch, dim):
    # One thread: this grid is about arithmetic; thread counts are covered below.
    quantizer = make(kind, dim, bits, rotation, sketch)
    rng = np.random.default_rng(dim * 100 + bits)
    x = rng.standard_normal((40, dim)) * rng.uniform(0.1, 10.0, size=(40, 1))
    codes = quantizer.quantize(x, n_threads=1)
    x_hat = quantizer.dequantize(codes, n_threads=1)
    for dtype in (np.float64, np.float32):
        queries = (rng.standard_normal((6, dim)) * 3.0).astype(dtype)
        scores = quantizer.inner_products(codes, queries, n_threads=1)
        assert scores.dtype == dtype and scores.shape == (6, 40)
        q64 = queries.astype(np.float64)
        reference = q64 @ x_hat.T
        # Componentwise rounding bound of both sides: x_hat = R^T (c1 + S^T c2), and every
        # matrix product of length d in precision eps errs by at most (d + 2) eps times
        # the same product of absolute values.
        r, c1, s, c2 = reconstruction_parts(quantizer, codes)
        rotated = np.abs(q64) @ np.abs(r).T
        magnitude = rotated @ np.abs(c1).T + (rotated @ np.abs(s).T) @ np.abs(c2).T
        tolerance = 4 * (dim + 2) * (np.finfo(dtype).eps + EPS64) * magnitude \
            + np.finfo(dtype).eps * np.abs(reference)
        assert np.all(np.abs(scores - reference) <= tolerance), np.max(np.abs(scores - reference) / tolerance)
        # a bug would not hide in the tolerance at float64
        if dtype == np.float64:
            assert np.max(tolerance) < 1e-9 * max(1.0, np.max(np.abs(reference)))


def test_reconstruction_parts_reproduce_dequantize():
    # Validates the helper used for the rounding bound above.
    for quantizer in (TurboQuantMSE(37, 5, seed=1, rotation="hadamard"),
                      TurboQuantProd(37, 3, seed=1), QJL(37, seed=1, sketch="hadamard")):
        codes = quantizer.quantize(random_unit_vectors(5, 37, 4))
        r, c1, s, c2 = reconstruction_parts(quantizer, codes)
        np.testing.assert_allclose(quantizer.dequantize(codes), (c1 + c2 @ s) @ r, atol=1e-12)


@pytest.mark.parametrize("bits", range(2, 9))
def test_prod_first_stage_is_the_mse_quantizer(bits):
    x = random_unit_vectors(50, 96, bits) * 4.0
    prod = TurboQuantProd(96, bits, seed=9, rotation="hadamard")
    mse = TurboQuantMSE(96, bits - 1, seed=9, rotation="hadamard")
    codes = prod.quantize(x)
    assert np.array_equal(codes.indices, mse.quantize(x).indices)
    # the residual norm is that of x/||x|| minus its MSE reconstruction (float32-rounded)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    residual = unit - mse.dequantize(mse.quantize(unit))
    np.testing.assert_allclose(codes.residual_norms, np.linalg.norm(residual, axis=1), rtol=2 * EPS32)


@pytest.mark.parametrize("kind", ["mse", "prod", "qjl"])
def test_dequantize_float32(kind):
    quantizer = make(kind, 101, 4, "hadamard", "hadamard")
    codes = quantizer.quantize(random_unit_vectors(30, 101, 1))
    x64 = quantizer.dequantize(codes)
    x32 = quantizer.dequantize(codes, dtype=np.float32)
    assert x64.dtype == np.float64 and x32.dtype == np.float32
    assert x32.flags.c_contiguous and x32.shape == (30, 101)
    np.testing.assert_allclose(x32, x64, rtol=0, atol=64 * EPS32 * np.abs(x64).max())


# == 4. Reproducibility ==================================================================
REPRO_SCRIPT = textwrap.dedent("""
    import numpy as np
    import turboquant as tq
    x = np.random.default_rng(123).standard_normal((64, 40))
    for q in (tq.TurboQuantMSE(40, 3, seed=5), tq.TurboQuantMSE(40, 5, seed=5, rotation="hadamard"),
              tq.TurboQuantProd(40, 4, seed=5), tq.TurboQuantProd(40, 2, seed=5, sketch="hadamard"),
              tq.QJL(40, seed=5), tq.QJL(40, seed=5, sketch="hadamard")):
        arrays = q.quantize(x).to_arrays()
        print(repr(q), *(name + "=" + arrays[name].tobytes().hex() for name in sorted(arrays)))
""")


def test_codes_identical_in_a_fresh_process():
    result = run_python("-c", REPRO_SCRIPT)
    assert result.returncode == 0, result.stderr
    lines = []
    exec(REPRO_SCRIPT, {"print": lambda *parts: lines.append(" ".join(parts))})   # same code, this process
    assert len(lines) == 6
    assert result.stdout.splitlines() == lines


THREAD_QUANTIZERS = [
    lambda: TurboQuantMSE(97, 3, seed=2),
    lambda: TurboQuantMSE(97, 7, seed=2, rotation="hadamard"),
    lambda: TurboQuantProd(97, 3, seed=2),
    lambda: TurboQuantProd(97, 5, seed=2, rotation="hadamard", sketch="hadamard"),
    lambda: QJL(97, seed=2),
    lambda: QJL(97, seed=2, sketch="hadamard"),
]


@pytest.mark.parametrize("factory", THREAD_QUANTIZERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_thread_count(factory, dtype, teams):
    # 6000 rows: above the size under which the kernels run on one thread anyway
    # (2**16 inner steps; the 1-bit sign scoring has 13 bytes per row at d = 97);
    # the team sizes of the row kernels show it.
    quantizer = factory()
    x = (random_unit_vectors(6000, 97, 8) * 5.0).astype(dtype)
    queries = random_unit_vectors(5, 97, 9).astype(dtype)
    for name in ("row_norms", "dequantize_rows", "lut_inner_products"):
        teams(name)
    results = []
    for n_threads in (1, 2, None):
        teams.sizes.clear()
        codes = quantizer.quantize(x, n_threads=n_threads)
        results.append((codes, quantizer.dequantize(codes, n_threads=n_threads),
                        quantizer.inner_products(codes, queries, n_threads=n_threads)))
        assert_ran_on(resolve_n_threads(n_threads), max(teams.sizes))
    for codes, x_hat, scores in results[1:]:
        assert codes == results[0][0]
        assert np.array_equal(x_hat, results[0][1])
        assert np.array_equal(scores, results[0][2])


GOLDEN_INPUT = np.stack([np.arange(16.0) - 7.5, np.cos(np.arange(16.0))])
GOLDEN_NORMS = [18.439088821411133, 2.851308584213257]
GOLDEN = [
    # (quantizer, packed arrays as hex, residual norms or None); computed with turboquant 0.1.0
    # from the raw-word generator of turboquant/quant/_rotation.py and float32 codebooks
    (lambda: TurboQuantMSE(16, 3, seed=7),
     {"indices": "14b77a25038761bbcdaf66d6"}, None),
    (lambda: TurboQuantMSE(16, 3, seed=7, rotation="hadamard"),
     {"indices": "12c25909e9b6185913adaa42"}, None),
    (lambda: TurboQuantProd(16, 3, seed=7),
     {"indices": "66792a8ca8d55feb", "signs": "0b27cbb9"}, [0.3631194531917572, 0.3429625630378723]),
    (lambda: TurboQuantProd(16, 4, seed=7, rotation="hadamard", sketch="hadamard"),
     {"indices": "12c25909e9b6185913adaa42", "signs": "892a820b"},
     [0.177583709359169, 0.1610892415046692]),
    (lambda: QJL(16, seed=7), {"signs": "f2021986"}, None),
    (lambda: QJL(16, seed=7, sketch="hadamard"), {"signs": "c7af139a"}, None),
]


@pytest.mark.parametrize("factory, packed, residual_norms", GOLDEN)
def test_golden_codes(factory, packed, residual_norms):
    codes = factory().quantize(GOLDEN_INPUT)
    arrays = codes.to_arrays()
    for name, hex_bytes in packed.items():
        assert arrays[name].tobytes().hex() == hex_bytes, name
    assert arrays["norms"].tolist() == GOLDEN_NORMS          # float32(sqrt(340)), float32(||cos||)
    if residual_norms is not None:
        # float32 of a value computed through BLAS: allow one float32 rounding step
        np.testing.assert_allclose(arrays["residual_norms"], residual_norms, rtol=2 * EPS32)


def test_golden_odd_width_packing():
    codes = TurboQuantMSE(5, 5, seed=3, rotation="hadamard").quantize([1.0, -2, 3, -4, 5])
    assert codes.indices.tobytes().hex() == "86a5d801"
    assert codes.norms.tolist() == [np.float32(math.sqrt(55.0)).item()]


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_float32_and_float64_inputs_agree_except_at_ties(rotation, bits):
    dim = 128
    x32 = random_unit_vectors(2000, dim, 31).astype(np.float32)
    x64 = x32.astype(np.float64)                             # the same values
    quantizer = TurboQuantMSE(dim, bits, seed=1, rotation=rotation)
    index32 = unpack(quantizer.quantize(x32).indices, bits, dim)
    index64 = unpack(quantizer.quantize(x64).indices, bits, dim)
    mismatch = index32 != index64
    assert mismatch.mean() < 1e-4
    # Each mismatch sits at a tie: float32 rotation errs by about sqrt(d) eps32 |x| ~ 1e-6.
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    u = quantizer._codec.rotate(x64, 1) / norms
    distance = np.min(np.abs(u[mismatch][:, None] - quantizer.codebook.boundaries[None, :]), axis=1,
                      initial=np.inf)
    assert np.all(distance <= 1e-5), distance
    assert np.array_equal(quantizer.quantize(x32).norms, quantizer.quantize(x64).norms)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_float32_and_float64_signs_agree_except_at_ties(sketch):
    dim = 128
    x32 = random_unit_vectors(2000, dim, 32).astype(np.float32)
    x64 = x32.astype(np.float64)
    quantizer = QJL(dim, seed=1, sketch=sketch)
    mismatch = unpack(quantizer.quantize(x32).signs, 1, dim) != unpack(quantizer.quantize(x64).signs, 1, dim)
    assert mismatch.mean() < 1e-4
    sketch_rows = sketch_matrix(quantizer)
    sketched = x64 @ sketch_rows.T
    # float32 product error bound per coordinate: (d + 2) eps32 (|S| |x|)_k
    bound = (dim + 2) * EPS32 * (np.abs(x64) @ np.abs(sketch_rows).T)
    assert np.all(np.abs(sketched[mismatch]) <= bound[mismatch])


# == 5. Parameters and inputs ===============================================================
@pytest.mark.parametrize("bits, message", [(0, "bits must be an integer in 1..8, got 0"),
                                           (9, "bits must be an integer in 1..8, got 9"),
                                           (True, "bits must be an integer, got True"),
                                           (2.5, "bits must be an integer, got 2.5"),
                                           ("3", "bits must be an integer, got '3'")])
def test_mse_rejects_bad_bits(bits, message):
    with pytest.raises(InvalidParameterError, match=message):
        TurboQuantMSE(16, bits)


@pytest.mark.parametrize("bits", [0, 1, 9, True, 2.5])
def test_prod_rejects_bad_bits(bits):
    with pytest.raises(InvalidParameterError, match="bits must be an integer"):
        TurboQuantProd(16, bits)


@pytest.mark.parametrize("factory", [lambda d: TurboQuantMSE(d, 2), lambda d: TurboQuantProd(d, 2),
                                     lambda d: QJL(d)])
@pytest.mark.parametrize("dim", [1, 0, -3, 2.0, None])
def test_rejects_bad_dim(factory, dim):
    with pytest.raises(InvalidParameterError, match="dim must be an integer"):
        factory(dim)


@pytest.mark.parametrize("factory", [lambda s: TurboQuantMSE(8, 2, seed=s),
                                     lambda s: TurboQuantProd(8, 2, seed=s), lambda s: QJL(8, seed=s)])
@pytest.mark.parametrize("seed", [-1, 1.5, None, "0"])
def test_rejects_bad_seed(factory, seed):
    with pytest.raises(InvalidParameterError, match="seed must be an integer"):
        factory(seed)


def test_rejects_unknown_rotation_and_sketch():
    with pytest.raises(InvalidParameterError, match="rotation must be one of 'dense', 'hadamard', got 'foo'"):
        TurboQuantMSE(8, 2, rotation="foo")
    with pytest.raises(InvalidParameterError, match="rotation must be one of"):
        TurboQuantProd(8, 2, rotation="foo")
    with pytest.raises(InvalidParameterError,
                       match="sketch must be one of 'gaussian', 'hadamard', got 'foo'"):
        TurboQuantProd(8, 2, sketch="foo")
    with pytest.raises(InvalidParameterError, match="sketch must be one of"):
        QJL(8, sketch="foo")


ALL_KINDS = ["mse", "prod", "qjl"]


def small(kind, dim=16, seed=0, rotation="dense", sketch="gaussian"):
    return make(kind, dim, 3, rotation, sketch, seed=seed)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("n_threads", [0, "2", 1.5, True])
def test_rejects_bad_n_threads(kind, n_threads):
    quantizer = small(kind)
    codes = quantizer.quantize(np.ones(16))
    for call in (lambda: quantizer.quantize(np.ones(16), n_threads=n_threads),
                 lambda: quantizer.dequantize(codes, n_threads=n_threads),
                 lambda: quantizer.inner_products(codes, np.ones(16), n_threads=n_threads)):
        with pytest.raises(InvalidParameterError, match="n_threads"):
            call()


BAD_ARRAYS = [
    (np.ones((2, 3, 16)), ShapeError, r"x has shape \(2, 3, 16\); expected \(16,\) or \(n, 16\)"),
    (np.float64(1.0), ShapeError, r"x has shape \(\); expected"),
    (np.ones((4, 15)), ShapeError, r"x has shape \(4, 15\); expected \(n, 16\)"),
    (np.ones(17), ShapeError, r"x has shape \(17,\); expected \(16,\)"),
    (np.ones((0, 15)), ShapeError, r"x has shape \(0, 15\)"),
    (np.where(np.arange(16) == 3, np.nan, 1.0), NonFiniteError, "x contains NaN or infinity"),
    (np.where(np.arange(32).reshape(2, 16) == 20, np.inf, 1.0), NonFiniteError, "NaN or infinity"),
    (np.full(16, -np.inf, dtype=np.float32), NonFiniteError, "NaN or infinity"),
    (np.ones(16, dtype=object), DTypeError, "x has dtype object"),
    (np.array(["a"] * 16), DTypeError, "x has dtype <U1"),
    (np.ones(16, dtype=complex), DTypeError, "x has dtype complex128"),
    (np.ones(16, dtype="datetime64[s]"), DTypeError, "x has dtype datetime64"),
]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("x, error, message", BAD_ARRAYS)
def test_quantize_rejects_bad_arrays(kind, x, error, message):
    with pytest.raises(error, match=message):
        small(kind).quantize(x)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("x, error, message", BAD_ARRAYS)
def test_inner_products_rejects_bad_queries(kind, x, error, message):
    quantizer = small(kind)
    codes = quantizer.quantize(np.ones((3, 16)))
    message = message.replace("x has", "queries has").replace("x contains", "queries contains")
    with pytest.raises(error, match=message):
        quantizer.inner_products(codes, x)


def test_errors_are_value_and_type_errors():
    assert issubclass(ShapeError, ValueError) and issubclass(NonFiniteError, ValueError)
    assert issubclass(InvalidParameterError, ValueError) and issubclass(IncompatibleCodesError, ValueError)
    assert issubclass(DTypeError, TypeError)
    for error in (ShapeError, NonFiniteError, InvalidParameterError, IncompatibleCodesError, DTypeError):
        assert issubclass(error, TurboQuantError)


OTHER_QUANTIZERS = {
    "mse": [lambda: TurboQuantMSE(16, 4), lambda: TurboQuantMSE(16, 3, seed=1),
            lambda: TurboQuantMSE(16, 3, rotation="hadamard"), lambda: TurboQuantMSE(17, 3)],
    "prod": [lambda: TurboQuantProd(16, 4), lambda: TurboQuantProd(16, 3, seed=1),
             lambda: TurboQuantProd(16, 3, rotation="hadamard"),
             lambda: TurboQuantProd(16, 3, sketch="hadamard"),
             lambda: TurboQuantProd(17, 3)],
    "qjl": [lambda: QJL(16, seed=1), lambda: QJL(16, sketch="hadamard"), lambda: QJL(17)],
}
INCOMPATIBLE = [(kind, i) for kind, factories in OTHER_QUANTIZERS.items() for i in range(len(factories))]


@pytest.mark.parametrize("kind, which", INCOMPATIBLE)
def test_codes_of_another_quantizer_are_refused(kind, which):
    codes = small(kind).quantize(np.ones((2, 16)))
    other = OTHER_QUANTIZERS[kind][which]()
    with pytest.raises(IncompatibleCodesError, match="cannot read codes made by"):
        other.dequantize(codes)
    with pytest.raises(IncompatibleCodesError, match="cannot read codes made by"):
        other.inner_products(codes, np.ones(other.dim))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_wrong_codes_type_is_refused(kind):
    quantizer = small(kind)
    wrong = {"mse": small("qjl"), "prod": small("mse"), "qjl": small("prod")}[kind].quantize(np.ones(16))
    expected = {"mse": "MSECodes", "prod": "ProdCodes", "qjl": "QJLCodes"}[kind]
    for codes, got in ((wrong, type(wrong).__name__), (np.zeros((1, 6), np.uint8), "ndarray"),
                       (None, "NoneType")):
        with pytest.raises(TurboQuantError, match=f"expected {expected}, got {got}"):
            quantizer.dequantize(codes)
        with pytest.raises(TurboQuantError, match=f"expected {expected}, got {got}"):
            quantizer.inner_products(codes, np.ones(16))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("dtype", [np.int32, "float16", np.complex64])
def test_dequantize_rejects_bad_dtype(kind, dtype):
    quantizer = small(kind)
    with pytest.raises(InvalidParameterError, match="dtype must be float32 or float64"):
        quantizer.dequantize(quantizer.quantize(np.ones(16)), dtype=dtype)


LAYOUT_QUANTIZERS = [
    lambda: TurboQuantMSE(24, 3, seed=4), lambda: TurboQuantMSE(24, 6, seed=4, rotation="hadamard"),
    lambda: TurboQuantProd(24, 3, seed=4),
    lambda: TurboQuantProd(24, 2, seed=4, rotation="hadamard", sketch="hadamard"),
    lambda: QJL(24, seed=4), lambda: QJL(24, seed=4, sketch="hadamard"),
]


@pytest.mark.parametrize("factory", LAYOUT_QUANTIZERS)
def test_non_contiguous_inputs_give_the_same_codes(factory):
    quantizer = factory()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((12, 24))
    expected = quantizer.quantize(x)
    wide = np.zeros((12, 48))
    wide[:, ::2] = x
    tall = np.zeros((24, 24))
    tall[::2] = x
    for variant in (np.asfortranarray(x), x.T.copy().T, wide[:, ::2], tall[::2], x[::-1][::-1]):
        assert quantizer.quantize(variant) == expected
    assert quantizer.quantize(x[::-1]) == quantizer.quantize(np.ascontiguousarray(x[::-1]))
    readonly = x.copy()
    readonly.setflags(write=False)
    assert quantizer.quantize(readonly) == expected
    assert quantizer.quantize(x.tolist()) == expected
    # queries too
    queries = rng.standard_normal((3, 24))
    scores = quantizer.inner_products(expected, queries)
    assert np.array_equal(quantizer.inner_products(expected, np.asfortranarray(queries)), scores)
    wide_q = np.zeros((3, 48))
    wide_q[:, 1::2] = queries
    assert np.array_equal(quantizer.inner_products(expected, wide_q[:, 1::2]), scores)


@pytest.mark.parametrize("factory", LAYOUT_QUANTIZERS)
def test_integer_bool_and_float16_inputs(factory):
    quantizer = factory()
    rng = np.random.default_rng(7)
    ints = rng.integers(-9, 10, size=(10, 24))
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        assert quantizer.quantize(ints.astype(dtype)) == quantizer.quantize(ints.astype(np.float64))
    unsigned = rng.integers(0, 200, size=(10, 24))
    assert quantizer.quantize(unsigned.astype(np.uint8)) == quantizer.quantize(unsigned.astype(np.float64))
    flags = rng.integers(0, 2, size=(10, 24)).astype(bool)
    assert quantizer.quantize(flags) == quantizer.quantize(flags.astype(np.float64))
    half = rng.standard_normal((10, 24)).astype(np.float16)
    assert quantizer.quantize(half) == quantizer.quantize(half.astype(np.float64))
    codes = quantizer.quantize(half)
    scores = quantizer.inner_products(codes, half[:2])
    assert scores.dtype == np.float64
    assert np.array_equal(scores, quantizer.inner_products(codes, half[:2].astype(np.float64)))
    assert quantizer.inner_products(codes, ints[:2]).dtype == np.float64
    assert quantizer.inner_products(codes, half[:2].astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("rotation, sketch", [("dense", "gaussian"), ("hadamard", "hadamard")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_vectors(kind, rotation, sketch, dtype):
    quantizer = make(kind, 33, 3, rotation, sketch)
    x = np.zeros((3, 33), dtype=dtype)
    x[1] = 1.0
    codes = quantizer.quantize(x)
    assert codes.norms[0] == 0.0 and codes.norms[2] == 0.0
    x_hat = quantizer.dequantize(codes)
    assert np.all(x_hat[[0, 2]] == 0.0)
    assert np.any(x_hat[1] != 0.0)
    scores = quantizer.inner_products(codes, np.ones((2, 33), dtype=dtype))
    assert np.all(scores[:, [0, 2]] == 0.0)


@pytest.mark.parametrize("factory", LAYOUT_QUANTIZERS)
@pytest.mark.parametrize("scale", [1e30, 1e-30, 2.0 ** 100])
def test_huge_and_tiny_norms(factory, scale):
    quantizer = factory()
    x = random_unit_vectors(20, 24, 3) * np.linspace(0.5, 2.0, 20)[:, None]
    codes = quantizer.quantize(x)
    scaled = quantizer.quantize(x * scale)
    arrays, scaled_arrays = codes.to_arrays(), scaled.to_arrays()
    for name in ("indices", "signs"):
        if name in arrays:
            assert np.array_equal(scaled_arrays[name], arrays[name]), name
    np.testing.assert_allclose(scaled_arrays["norms"], arrays["norms"].astype(np.float64) * scale, rtol=EPS32)
    if "residual_norms" in arrays:
        np.testing.assert_allclose(scaled_arrays["residual_norms"], arrays["residual_norms"], rtol=4 * EPS32)
    x_hat = quantizer.dequantize(codes)
    # stored norms are float32 roundings of scale * ||x||: at most 2 eps32 apart relatively
    np.testing.assert_allclose(quantizer.dequantize(scaled) / scale, x_hat, rtol=0,
                               atol=4 * EPS32 * np.abs(x_hat).max())
    queries = random_unit_vectors(2, 24, 4)
    scores = quantizer.inner_products(codes, queries)
    np.testing.assert_allclose(quantizer.inner_products(scaled, queries) / scale, scores, rtol=0,
                               atol=4 * EPS32 * np.abs(scores).max())


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("rotation, sketch", [("dense", "gaussian"), ("hadamard", "hadamard")])
def test_huge_float32_inputs(kind, rotation, sketch):
    quantizer = small(kind, rotation=rotation, sketch=sketch)
    x = random_unit_vectors(5, 16, 8)
    big = (x * 1e37).astype(np.float32)                     # squares overflow float32, norms do not
    codes = quantizer.quantize(big)
    np.testing.assert_allclose(codes.norms, 1e37, rtol=1e-6)
    assert np.all(np.isfinite(quantizer.dequantize(codes)))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("x", [np.full((2, 16), 1e38), np.full((1, 16), 1e38, dtype=np.float32),
                               np.full(16, 1e300), np.full((1, 16), np.finfo(np.float64).max)])
def test_norm_beyond_float32_range_is_refused(kind, x):
    with pytest.raises(NonFiniteError, match="float32"):
        small(kind).quantize(x)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_one_dimensional_input_and_query(kind):
    quantizer = small(kind)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16))
    single = quantizer.quantize(x[2])
    assert len(single) == 1
    assert single == quantizer.quantize(x[2:3]) == quantizer.quantize(x)[2]
    codes = quantizer.quantize(x)
    query = rng.standard_normal(16)
    scores = quantizer.inner_products(codes, query)
    assert scores.shape == (4,)
    assert np.array_equal(scores, quantizer.inner_products(codes, query[None, :])[0])
    assert quantizer.inner_products(single, query).shape == (1,)
    assert quantizer.dequantize(single).shape == (1, 16)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batches(kind, dtype):
    quantizer = small(kind)
    empty = quantizer.quantize(np.empty((0, 16), dtype=dtype))
    assert len(empty) == 0 and empty.nbytes == 0
    assert quantizer.dequantize(empty).shape == (0, 16)
    assert quantizer.inner_products(empty, np.ones((3, 16), dtype=dtype)).shape == (3, 0)
    assert quantizer.inner_products(empty, np.ones(16, dtype=dtype)).shape == (0,)
    codes = quantizer.quantize(np.ones((4, 16), dtype=dtype))
    scores = quantizer.inner_products(codes, np.empty((0, 16), dtype=dtype))
    assert scores.shape == (0, 4) and scores.dtype == dtype


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_repr_and_attributes(kind):
    quantizer = make(kind, 16, 3, "hadamard", "hadamard", seed=4)
    text = repr(quantizer)
    assert "dim=16" in text and "seed=4" in text
    assert quantizer.spec.dim == 16 and quantizer.spec.seed == 4 and quantizer.spec.kind == kind
    assert quantizer.codes_type is {"mse": MSECodes, "prod": ProdCodes, "qjl": QJLCodes}[kind]
    if kind != "qjl":
        assert "bits=3" in text and "rotation='hadamard'" in text
