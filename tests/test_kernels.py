"""Every ``turboquant._core`` kernel against a small pure-numpy reference.

Shapes, bit widths and data are drawn by Hypothesis (derandomized, so runs are
reproducible); the data itself comes from ``numpy.random.default_rng`` seeded by
a drawn integer. Every kernel is also run with 1 and 2 threads and the results
must be bitwise identical.

Tolerances are rounding-error bounds: a sum of ``d`` products computed in
double differs from any other summation order by at most
``(d + 2) * eps64 * sum(|terms|)``; a result stored in float32 adds one
rounding, ``eps32 * |result|``.
"""

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant._kernels import _core

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps
DTYPES = (np.float32, np.float64)
THREADS = (1, 2)

KERNEL_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)

dims = st.integers(min_value=1, max_value=70)
rows = st.integers(min_value=0, max_value=9)
bit_widths = st.integers(min_value=1, max_value=8)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
dtypes = st.sampled_from(DTYPES)


# -- pure-numpy references -----------------------------------------------------
def packed_width(dim, bits):
    return (dim * bits + 7) // 8


def reference_pack(indices, bits):
    """Little-endian bit stream of every row, through ``np.packbits``."""
    n, dim = indices.shape
    bit_matrix = (indices[:, :, None].astype(np.uint16) >> np.arange(bits)) & 1
    packed = np.packbits(bit_matrix.reshape(n, dim * bits).astype(np.uint8), axis=1, bitorder="little")
    return packed.reshape(n, packed_width(dim, bits))


def reference_unpack(codes, bits, dim):
    n = codes.shape[0]
    bit_matrix = np.unpackbits(codes, axis=1, bitorder="little")[:, : dim * bits]
    weights = (1 << np.arange(bits)).astype(np.int64)
    return (bit_matrix.reshape(n, dim, bits) * weights).sum(axis=2).astype(np.uint8)


def reference_norms(x):
    x = np.asarray(x, dtype=np.float64)
    scale = np.abs(x).max(axis=1, initial=0.0)
    safe = np.where(scale > 0, scale, 1.0)
    return scale * np.linalg.norm(x / safe[:, None], axis=1)


def walsh_hadamard(block):
    """Orthonormal Sylvester-Hadamard matrix of a power-of-two size."""
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(block)


def fwht(v):
    """Orthonormal Walsh-Hadamard transform of every row (length a power of two),
    i.e. ``v @ walsh_hadamard(len)``, in O(len log len) with numpy reshapes."""
    n, length = v.shape
    h = 1
    while h < length:
        pairs = v.reshape(n, length // (2 * h), 2, h)
        v = np.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], axis=2)
        h *= 2
    return v.reshape(n, length) / np.sqrt(length)


def reference_hadamard(x, signs, block, inverse):
    """The documented randomized Hadamard rotation (H is symmetric and its own inverse)."""
    v = np.array(x, dtype=np.float64)
    d = v.shape[1]
    rounds = range(signs.shape[0] - 1, -1, -1) if inverse else range(signs.shape[0])
    for r in rounds:
        if not inverse:
            v *= signs[r]
            v[:, :block] = fwht(v[:, :block])
            if block < d:
                v[:, d - block:] = fwht(v[:, d - block:])
        else:
            if block < d:
                v[:, d - block:] = fwht(v[:, d - block:])
            v[:, :block] = fwht(v[:, :block])
            v *= signs[r]
    return v


def random_codebook(rng, bits):
    """Sorted centroids and the midpoints between them, as in a Lloyd-Max codebook."""
    centroids = np.sort(rng.standard_normal(1 << bits))
    return centroids, (centroids[1:] + centroids[:-1]) / 2


def random_codes(rng, n, dim, bits):
    indices = rng.integers(0, 1 << bits, size=(n, dim), dtype=np.uint8)
    return indices, reference_pack(indices, bits)


def run_threads(kernel, make_out, *args):
    """Run ``kernel(*args, out, n_threads)`` for each thread count; return the outputs."""
    outs = []
    for n_threads in THREADS:
        out = make_out()
        kernel(*args, out, n_threads)
        outs.append(out)
    return outs


def assert_ran_on(n_threads, team):
    """The last kernel call, asked for ``n_threads``, ran with a ``team`` of one
    thread for 1 and of several otherwise (when the build has OpenMP)."""
    if n_threads == 1 or not _core.openmp_enabled():
        assert team == 1
    else:
        assert team > 1, f"asked for {n_threads} threads, ran on {team}: too little work to test threads"


def assert_same_for_all_threads(outs):
    for other in outs[1:]:
        assert other.dtype == outs[0].dtype
        assert np.array_equal(other, outs[0]), "result depends on the thread count"


def readonly(array):
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


# -- tests of the references themselves ------------------------------------------
def test_reference_pack_examples():
    # bits=3: indices 5 (101), 3 (011), 7 (111) -> stream 101 110 111 (LSB first)
    # -> byte 0 = bits 0..7 = 1,0,1,1,1,0,1,1 -> 0b11011101, byte 1 = bit 8 = 1.
    assert reference_pack(np.array([[5, 3, 7]], dtype=np.uint8), 3).tolist() == [[0b11011101, 0b1]]
    assert reference_pack(np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=np.uint8), 1).tolist() == [[1, 1]]


@pytest.mark.parametrize("block", [1, 2, 4, 64, 512])
def test_reference_fwht_is_the_sylvester_matrix(block):
    x = np.random.default_rng(block).standard_normal((3, block))
    np.testing.assert_allclose(fwht(x), x @ walsh_hadamard(block), rtol=0, atol=1e-12)


# -- bit packing -------------------------------------------------------------------
@KERNEL_SETTINGS
@given(n=rows, dim=dims, bits=bit_widths, seed=seeds)
def test_pack_indices_matches_packbits(n, dim, bits, seed):
    indices, expected = random_codes(np.random.default_rng(seed), n, dim, bits)
    outs = run_threads(_core.pack_indices,
                       lambda: np.full((n, packed_width(dim, bits)), 0xAB, dtype=np.uint8),
                       readonly(indices), bits)
    assert_same_for_all_threads(outs)
    assert np.array_equal(outs[0], expected)


@KERNEL_SETTINGS
@given(n=rows, dim=dims, bits=bit_widths, seed=seeds)
def test_unpack_indices_inverts_pack(n, dim, bits, seed):
    indices, packed = random_codes(np.random.default_rng(seed), n, dim, bits)
    outs = run_threads(_core.unpack_indices, lambda: np.empty((n, dim), dtype=np.uint8),
                       readonly(packed), bits)
    assert_same_for_all_threads(outs)
    assert np.array_equal(outs[0], indices)
    assert np.array_equal(reference_unpack(packed, bits, dim), indices)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_dense(bits):
    # dim * bits is a multiple of 8 for dim = 8: no padding bits at all.
    indices = np.full((1, 8), (1 << bits) - 1, dtype=np.uint8)
    packed = np.empty((1, bits), dtype=np.uint8)
    _core.pack_indices(indices, bits, packed, 1)
    assert packed.tolist() == [[0xFF] * bits]


# -- scalar quantization -------------------------------------------------------------
@KERNEL_SETTINGS
@given(n=rows, dim=dims, bits=bit_widths, seed=seeds, dtype=dtypes, want_residual=st.booleans())
def test_quantize_pack_matches_searchsorted(n, dim, bits, seed, dtype, want_residual):
    rng = np.random.default_rng(seed)
    centroids, boundaries = random_codebook(rng, bits)
    y = (rng.standard_normal((n, dim)) * rng.uniform(0.5, 2.0)).astype(dtype)
    norms = rng.uniform(0.5, 2.0, size=n)
    if n:
        norms[0] = 0.0                                   # a zero vector quantizes as 0
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    u = y.astype(np.float64) * inv[:, None]
    expected_index = np.searchsorted(boundaries, u, side="left")   # boundaries strictly below u
    width = packed_width(dim, bits)

    results = []
    for n_threads in THREADS:
        codes = np.full((n, width), 0x5A, dtype=np.uint8)
        residual = np.full((n, dim) if want_residual else (0, 0), np.nan, dtype=dtype)
        _core.quantize_pack(readonly(y), readonly(norms), readonly(boundaries), readonly(centroids),
                            bits, codes, residual, want_residual, n_threads)
        results.append((codes, residual))
    assert_same_for_all_threads([r[0] for r in results])
    assert_same_for_all_threads([r[1] for r in results])
    codes, residual = results[0]
    assert np.array_equal(codes, reference_pack(expected_index.astype(np.uint8), bits))
    if want_residual:
        expected_residual = (u - centroids[expected_index]).astype(dtype)
        assert np.array_equal(residual, expected_residual)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_pack_ties_go_to_the_lower_cell(bits):
    centroids, boundaries = random_codebook(np.random.default_rng(bits), bits)
    y = np.concatenate([boundaries, np.nextafter(boundaries, np.inf)])[None, :]
    codes = np.empty((1, packed_width(y.shape[1], bits)), dtype=np.uint8)
    _core.quantize_pack(y, np.ones(1), boundaries, centroids, bits, codes,
                        np.empty((0, 0)), False, 1)
    levels = np.arange(len(boundaries))
    assert np.array_equal(reference_unpack(codes, bits, y.shape[1])[0],
                          np.concatenate([levels, levels + 1]))


# -- dequantization -----------------------------------------------------------------
@KERNEL_SETTINGS
@given(n=rows, dim=dims, bits=bit_widths, seed=seeds, dtype=dtypes)
def test_dequantize_rows_matches_reference(n, dim, bits, seed, dtype):
    rng = np.random.default_rng(seed)
    centroids, _ = random_codebook(rng, bits)
    indices, packed = random_codes(rng, n, dim, bits)
    scales = rng.uniform(0.0, 3.0, size=n)
    outs = run_threads(_core.dequantize_rows, lambda: np.full((n, dim), np.nan, dtype=dtype),
                       readonly(packed), bits, readonly(centroids), readonly(scales))
    assert_same_for_all_threads(outs)
    assert np.array_equal(outs[0], (scales[:, None] * centroids[indices]).astype(dtype))


# -- lookup-table inner products ------------------------------------------------------
def check_lut(n, m, dim, bits, seed, dtype, accumulate):
    rng = np.random.default_rng(seed)
    centroids, _ = random_codebook(rng, bits)
    indices, packed = random_codes(rng, n, dim, bits)
    queries = rng.standard_normal((m, dim)).astype(dtype)
    scales = rng.uniform(0.0, 3.0, size=n)
    start = rng.standard_normal((m, n)).astype(dtype)
    values = centroids[indices]                                    # (n, dim)
    q64 = queries.astype(np.float64)
    expected = (q64 @ values.T) * scales
    magnitude = (np.abs(q64) @ np.abs(values).T) * scales         # sum of |terms|
    if accumulate:
        expected = expected + start
        magnitude = magnitude + np.abs(start)
    tolerance = (dim + 2) * EPS64 * magnitude
    if dtype == np.float32:
        # float32 queries use the float32 kernels of include/tq_lut.h (every width):
        # summed in float32 (centroids rounded to float32 too); one more rounding
        # for the scale and one for the accumulation.
        tolerance = (dim + 2) * EPS32 * magnitude + 2 * EPS32 * np.abs(expected)

    outs = []
    for n_threads in THREADS:
        out = start.copy()
        _core.lut_inner_products(readonly(packed), bits, readonly(centroids), readonly(queries),
                                 readonly(scales), out, accumulate, n_threads)
        outs.append(out)
    assert_same_for_all_threads(outs)
    assert outs[0].dtype == dtype
    assert np.all(np.abs(outs[0] - expected) <= tolerance)


@KERNEL_SETTINGS
@given(n=rows, m=st.integers(0, 4), dim=dims, bits=bit_widths, seed=seeds, dtype=dtypes,
       accumulate=st.booleans())
def test_lut_inner_products_matches_reference(n, m, dim, bits, seed, dtype, accumulate):
    check_lut(n, m, dim, bits, seed, dtype, accumulate)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dim", [1, 7, 97, 128])
def test_lut_inner_products_every_bit_width(bits, accumulate, dim):
    check_lut(23, 3, dim, bits, 1000 + bits, np.float64, accumulate)
    check_lut(23, 3, dim, bits, 2000 + bits, np.float32, accumulate)


# -- weighted sums of codes ----------------------------------------------------------
def check_weighted_sum(n, m, dim, bits, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centroids, _ = random_codebook(rng, bits)
    indices, packed = random_codes(rng, n, dim, bits)
    weights = rng.standard_normal((m, n)).astype(dtype)
    weights[:, ::3] = 0.0                                  # the kernel skips zero weights
    scales = rng.uniform(0.0, 3.0, size=n)
    values = scales[:, None] * centroids[indices]          # (n, dim)
    expected = weights.astype(np.float64) @ values
    magnitude = np.abs(weights.astype(np.float64)) @ np.abs(values)
    tolerance = (n + 2) * EPS64 * magnitude
    if dtype == np.float32:
        # float32 sums within chunks: weight * scale, centroid and product each
        # rounded once, then at most n additions.
        tolerance = (n + 3) * EPS32 * magnitude
    outs = run_threads(_core.lut_weighted_sum, lambda: np.full((m, dim), np.nan),
                       readonly(packed), bits, readonly(centroids), readonly(weights), readonly(scales))
    assert_same_for_all_threads(outs)
    assert np.all(np.abs(outs[0] - expected) <= tolerance)


@KERNEL_SETTINGS
@given(n=st.integers(0, 700), m=st.integers(0, 20), dim=dims, bits=bit_widths, seed=seeds, dtype=dtypes)
def test_lut_weighted_sum_matches_reference(n, m, dim, bits, seed, dtype):
    check_weighted_sum(n, m, dim, bits, seed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_lut_weighted_sum_every_bit_width(bits, dtype):
    # 1100 tokens: several chunks; 18 queries: two query blocks; enough work for threads.
    check_weighted_sum(1100, 18, 37, bits, 3000 + bits, dtype)


# -- norms -------------------------------------------------------------------------------
@KERNEL_SETTINGS
@given(n=rows, dim=dims, seed=seeds, dtype=dtypes, exponent=st.integers(-300, 300))
def test_row_norms_matches_reference(n, dim, seed, dtype, exponent):
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        exponent = exponent // 10                       # stay inside float32's range
    x = (rng.standard_normal((n, dim)) * 10.0 ** exponent).astype(dtype)
    if n:
        x[-1] = 0.0
    outs = run_threads(_core.row_norms, lambda: np.full(n, np.nan), readonly(x))
    assert_same_for_all_threads(outs)
    expected = reference_norms(x)
    assert np.all(np.isfinite(outs[0]))
    np.testing.assert_allclose(outs[0], expected, rtol=2 * (dim + 4) * EPS64, atol=0)
    if n:
        assert outs[0][-1] == 0.0


@pytest.mark.parametrize("value, dtype", [(1e200, np.float64), (1e-200, np.float64),
                                          (1e30, np.float32), (1e-30, np.float32),
                                          (1e307, np.float64), (1e-310, np.float64)])
def test_row_norms_does_not_overflow_or_underflow(value, dtype):
    dim = 101
    x = np.full((2, dim), value, dtype=dtype)
    x[1, ::2] *= -1
    out = np.empty(2)
    _core.row_norms(x, out, 2)
    # |x_j| = v for every j, so the norm is v * sqrt(dim) (1.005e308 for v = 1e307: finite,
    # although the sum of squares overflows; 1e-310 is subnormal and its square is 0).
    expected = float(dtype(value)) * np.sqrt(dim)
    np.testing.assert_allclose(out, [expected, expected], rtol=4 * (dim + 4) * EPS64)


# -- randomized Hadamard rotation ---------------------------------------------------------
def hadamard_setup(dim, rounds, seed):
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(rounds, dim)) * 2.0 - 1.0
    block = 1 << (dim.bit_length() - 1)
    return rng, signs, block


def run_hadamard(x, signs, block, inverse, n_threads):
    out = np.full_like(x, np.nan)
    _core.hadamard_rotate(readonly(x), out, readonly(signs), block, inverse, n_threads)
    return out


HADAMARD_DIMS = [2, 3, 5, 80, 96, 128, 192, 576]


@pytest.mark.parametrize("dim", HADAMARD_DIMS)
@pytest.mark.parametrize("rounds", [1, 2])
def test_hadamard_rotate_is_orthogonal(dim, rounds):
    _, signs, block = hadamard_setup(dim, rounds, dim)
    eye = np.eye(dim)
    matrix = run_hadamard(eye, signs, block, False, 2).T        # columns are images of e_j
    inverse_matrix = run_hadamard(eye, signs, block, True, 2).T
    # Each entry is a sum of at most 2*rounds*log2(d) roundings of unit-size terms.
    tolerance = 8 * rounds * (np.log2(dim) + 2) * EPS64 * np.sqrt(dim)
    assert np.max(np.abs(matrix @ matrix.T - eye)) <= tolerance
    assert np.max(np.abs(inverse_matrix @ matrix - eye)) <= tolerance
    assert np.max(np.abs(inverse_matrix - matrix.T)) <= tolerance


@pytest.mark.parametrize("dim", HADAMARD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_rotate_matches_reference_and_inverts(dim, dtype):
    rng, signs, block = hadamard_setup(dim, 2, 7 * dim)
    x = rng.standard_normal((13, dim)).astype(dtype)
    forward = [run_hadamard(x, signs, block, False, t) for t in THREADS]
    assert_same_for_all_threads(forward)
    expected = reference_hadamard(x, signs, block, inverse=False)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    tolerance = 16 * (np.log2(dim) + 2) * EPS64 * norms
    if dtype == np.float32:
        tolerance = tolerance + EPS32 * np.abs(expected)         # one rounding of the output
    assert forward[0].dtype == dtype
    assert np.all(np.abs(forward[0] - expected) <= tolerance)

    back = [run_hadamard(forward[0], signs, block, True, t) for t in THREADS]
    assert_same_for_all_threads(back)
    expected_back = reference_hadamard(forward[0], signs, block, inverse=True)
    tolerance = 16 * (np.log2(dim) + 2) * EPS64 * norms
    if dtype == np.float32:
        tolerance = tolerance + EPS32 * np.abs(expected_back) + 2 * EPS32 * norms
    assert np.all(np.abs(back[0] - expected_back) <= tolerance)
    assert np.all(np.abs(back[0] - x) <= tolerance + (2 * EPS32 * norms if dtype == np.float32 else 0))


@KERNEL_SETTINGS
@given(n=rows, dim=st.integers(2, 300), rounds=st.integers(1, 3), seed=seeds, dtype=dtypes,
       inverse=st.booleans())
def test_hadamard_rotate_random_shapes(n, dim, rounds, seed, dtype, inverse):
    rng, signs, block = hadamard_setup(dim, rounds, seed)
    x = rng.standard_normal((n, dim)).astype(dtype)
    outs = [run_hadamard(x, signs, block, inverse, t) for t in THREADS]
    assert_same_for_all_threads(outs)
    expected = reference_hadamard(x, signs, block, inverse)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    tolerance = 8 * rounds * (np.log2(dim) + 2) * EPS64 * norms
    if dtype == np.float32:
        tolerance = tolerance + EPS32 * np.abs(expected)
    assert np.all(np.abs(outs[0] - expected) <= tolerance)
    # orthogonal: norms are preserved
    np.testing.assert_allclose(np.linalg.norm(outs[0].astype(np.float64), axis=1), norms[:, 0],
                               rtol=10 * (EPS32 if dtype == np.float32 else EPS64) * np.sqrt(dim))


# -- OpenMP introspection ------------------------------------------------------------------
def test_openmp_introspection():
    assert isinstance(_core.openmp_enabled(), bool)
    assert isinstance(_core.max_threads(), int) and _core.max_threads() >= 1
    assert isinstance(_core.num_procs(), int) and _core.num_procs() >= 1
    if not _core.openmp_enabled():
        assert _core.max_threads() == 1 and _core.num_procs() == 1


# -- thread counts on inputs large enough to run in parallel ---------------------------
# The kernels fall back to one thread below about 2**16 inner steps, and the
# float32 small-code kernels below 2**20 code bytes read (queries x rows x row
# bytes), so the randomized tests above mostly run serially; these inputs are
# above both, which each call checks with _core._last_team_size().
PARALLEL_ROWS, PARALLEL_DIM = 6000, 97
PARALLEL_QUERIES = 16                             # 1-bit codes: 16 * 6000 * 13 bytes > 2**20


def parallel_case(kernel, bits, dtype):
    """(callable(n_threads) -> (outputs, teams)) for one kernel on a large random
    input: its outputs, and the team size of each kernel call it made."""
    rng = np.random.default_rng(bits)
    n, d = PARALLEL_ROWS, PARALLEL_DIM
    centroids, boundaries = random_codebook(rng, bits)
    indices, packed = random_codes(rng, n, d, bits)
    x = rng.standard_normal((n, d)).astype(dtype)
    scales = rng.uniform(0.0, 2.0, size=n)
    signs = rng.integers(0, 2, size=(2, d)) * 2.0 - 1.0
    queries = rng.standard_normal((PARALLEL_QUERIES, d)).astype(dtype)
    start = rng.standard_normal((PARALLEL_QUERIES, n)).astype(dtype)
    weights = rng.standard_normal((PARALLEL_QUERIES, n)).astype(dtype)
    width = packed_width(d, bits)

    def run(n_threads):
        teams = []

        def noted(outputs):
            teams.append(_core._last_team_size())
            return outputs

        return outputs_of(n_threads, noted), teams

    def outputs_of(n_threads, noted):
        if kernel == "row_norms":
            out = np.empty(n)
            _core.row_norms(x, out, n_threads)
            return noted([out])
        if kernel == "hadamard_rotate":
            return [noted(run_hadamard(x, signs, 64, inverse, n_threads)) for inverse in (False, True)]
        if kernel == "hadamard_quantize_pack":
            return noted(list(hadamard_quantize(x, signs, 64, boundaries, centroids, bits, n_threads)))
        if kernel == "quantize_pack":
            codes, residual = np.empty((n, width), np.uint8), np.empty((n, d), dtype)
            _core.quantize_pack(x, scales, boundaries, centroids, bits, codes, residual, True, n_threads)
            return noted([codes, residual])
        if kernel == "pack_indices":
            codes = np.empty((n, width), np.uint8)
            _core.pack_indices(indices, bits, codes, n_threads)
            return noted([codes])
        if kernel == "unpack_indices":
            out = np.empty((n, d), np.uint8)
            _core.unpack_indices(packed, bits, out, n_threads)
            return noted([out])
        if kernel == "dequantize_rows":
            out = np.empty((n, d), dtype)
            _core.dequantize_rows(packed, bits, centroids, scales, out, n_threads)
            return noted([out])
        if kernel == "lut_inner_products":
            outs = []
            for accumulate in (False, True):
                out = start.copy()
                _core.lut_inner_products(packed, bits, centroids, queries, scales, out, accumulate, n_threads)
                outs.append(noted(out))
            return outs
        out = np.empty((PARALLEL_QUERIES, d))
        _core.lut_weighted_sum(packed, bits, centroids, weights, scales, out, n_threads)
        return noted([out])

    return run


PARALLEL_KERNELS = ["row_norms", "hadamard_rotate", "hadamard_quantize_pack", "quantize_pack",
                    "pack_indices", "unpack_indices",
                    "dequantize_rows", "lut_inner_products", "lut_weighted_sum"]


@pytest.mark.parametrize("kernel", PARALLEL_KERNELS)
@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_inputs_identical_for_every_thread_count(kernel, bits, dtype):
    run = parallel_case(kernel, bits, dtype)
    results = []
    for n_threads in (1, 2, 3):
        outputs, teams = run(n_threads)
        assert teams
        for team in teams:
            assert_ran_on(n_threads, team)
        results.append(outputs)
    for outputs in zip(*results):
        assert_same_for_all_threads(list(outputs))


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
def test_more_threads_than_rows(n_threads):
    # Two long rows and up to eight threads: per-thread scratch and static
    # chunks must still be right when most threads have no row.
    dim = 40000
    rng, signs, block = hadamard_setup(dim, 2, 3)
    x = rng.standard_normal((2, dim))
    out = np.empty_like(x)
    _core.hadamard_rotate(x, out, signs, block, False, n_threads)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    tolerance = 16 * (np.log2(dim) + 2) * EPS64 * norms
    assert np.all(np.abs(out - reference_hadamard(x, signs, block, False)) <= tolerance)


# -- fused Hadamard quantization ------------------------------------------------------------
def hadamard_quantize(x, signs, block, boundaries, centroids, bits, n_threads, want_residual=True):
    n, d = x.shape
    norms = np.full(n, np.nan)
    codes = np.full((n, packed_width(d, bits)), 0x5A, dtype=np.uint8)
    residual = np.full((n, d) if want_residual else (0, 0), np.nan, dtype=x.dtype)
    _core.hadamard_quantize_pack(readonly(x), readonly(signs), block, readonly(boundaries),
                                 readonly(centroids), bits, norms, codes, residual, want_residual,
                                 n_threads)
    return norms, codes, residual


FUSED_ROWS = [1, 15, 16, 17, 97]                    # around the 16-row tile
FUSED_DIMS = [2, 3, 5, 16, 80, 97, 128, 130]


def fused_case(n, dim, bits, dtype):
    """Signs, a codebook scaled to unit vectors in R^dim, and (n, dim) Gaussian rows."""
    rng, signs, block = hadamard_setup(dim, 2, n * dim + bits)
    centroids, boundaries = random_codebook(rng, bits)
    x = rng.standard_normal((n, dim)).astype(dtype)
    return rng, signs, block, centroids / np.sqrt(dim), boundaries / np.sqrt(dim), x


@pytest.mark.parametrize("n", FUSED_ROWS)
@pytest.mark.parametrize("dim", FUSED_DIMS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_hadamard_quantize_pack_float64_is_the_separate_kernels(n, dim, bits):
    rng, signs, block, centroids, boundaries, x = fused_case(n, dim, bits, np.float64)
    x[0] = 0.0                                          # a zero row quantizes as 0
    norms, codes, residual = hadamard_quantize(x, signs, block, boundaries, centroids, bits, 1)
    expected_norms = np.empty(n)
    _core.row_norms(x, expected_norms, 1)
    rotated = run_hadamard(x, signs, block, False, 1)
    expected_codes = np.empty_like(codes)
    expected_residual = np.empty_like(residual)
    _core.quantize_pack(rotated, expected_norms, boundaries, centroids, bits, expected_codes,
                        expected_residual, True, 1)
    assert np.array_equal(norms, expected_norms)
    assert np.array_equal(codes, expected_codes)
    assert np.array_equal(residual, expected_residual)


@pytest.mark.parametrize("n", FUSED_ROWS)
@pytest.mark.parametrize("dim", FUSED_DIMS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_hadamard_quantize_pack_float32_differs_only_at_ties(n, dim, bits):
    rng, signs, block, centroids, boundaries, x = fused_case(n, dim, bits, np.float32)
    norms, codes, residual = hadamard_quantize(x, signs, block, boundaries, centroids, bits, 1)
    expected_norms = np.empty(n)
    _core.row_norms(x, expected_norms, 1)
    assert np.array_equal(norms, expected_norms)        # summed in double either way
    u = reference_hadamard(x, signs, block, False) / expected_norms[:, None]
    index = reference_unpack(codes, bits, dim)
    expected_index = np.searchsorted(boundaries, u, side="left")
    mismatch = index != expected_index
    # float32 normalization and rotation err by about log2(d) eps32 per unit coordinate.
    distance = np.min(np.abs(u[mismatch][:, None] - boundaries[None, :]), axis=1, initial=np.inf)
    assert np.all(distance <= 32 * (np.log2(dim) + 2) * EPS32 / np.sqrt(dim) + 4 * EPS32), distance
    np.testing.assert_allclose(residual, u - centroids[index], atol=64 * (np.log2(dim) + 2) * EPS32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_quantize_pack_rows_do_not_depend_on_their_tile(dtype):
    rng, signs, block = hadamard_setup(97, 2, 5)
    centroids, boundaries = random_codebook(rng, 3)
    x = rng.standard_normal((40, 97)).astype(dtype)
    together = hadamard_quantize(x, signs, block, boundaries, centroids, 3, 2)
    for start, stop in [(0, 1), (3, 20), (17, 40)]:
        alone = hadamard_quantize(x[start:stop], signs, block, boundaries, centroids, 3, 1)
        for whole, part in zip(together, alone):
            assert np.array_equal(whole[start:stop], part)


# -- kernel variants (portable C, AVX2, AVX-512) ---------------------------------------------
def variant_outputs(dtype, bits):
    """Every variant-dispatched kernel on one input, as a list of arrays."""
    rng, signs, block = hadamard_setup(130, 2, bits)
    centroids, boundaries = random_codebook(rng, bits)
    centroids, boundaries = centroids / np.sqrt(130), boundaries / np.sqrt(130)
    x = (rng.standard_normal((37, 130)) * rng.uniform(0.1, 10.0, size=(37, 1))).astype(dtype)
    outputs = list(hadamard_quantize(x, signs, block, boundaries, centroids, bits, 2))
    outputs += list(hadamard_quantize(x[:, :128], signs[:, :128], 128, boundaries, centroids, bits, 2))
    outputs += [run_hadamard(x, signs, block, inverse, 2) for inverse in (False, True)]
    norms = rng.uniform(0.5, 2.0, size=37)
    codes = np.empty((37, packed_width(130, bits)), dtype=np.uint8)
    residual = np.empty_like(x)
    _core.quantize_pack(x, norms, boundaries, centroids, bits, codes, residual, True, 2)
    matrix = rng.standard_normal((130, 130)).astype(dtype)
    product = np.empty((5, 130), dtype=dtype)
    _core.small_product(np.ascontiguousarray(x[:5]), matrix, product)
    return outputs + [codes, residual, product]


def test_kernel_variants_are_listed():
    variants = _core._kernel_variants()
    assert variants[0] == "portable" and _core._kernel_variant() == variants[-1]
    assert set(variants) <= {"portable", "avx2", "avx512"}
    with pytest.raises(ValueError, match="kernel variant must be one of"):
        _core._use_kernel_variant("sse9")
    x, out = np.ones((2, 4)), np.empty((2, 4))
    for bad in ("sse9", 1, b"avx2"):
        with pytest.raises(ValueError, match="kernel variant must be one of"):
            _core.small_product(x, np.eye(4), out, bad)


def test_a_kernel_runs_the_variant_it_is_given():
    x, out = np.ones((2, 4)), np.empty((2, 4))
    _core.row_norms(x, np.empty(2), 1)
    assert _core._last_kernel_variant() is None                  # one implementation
    _core.small_product(x, np.eye(4), out)
    assert _core._last_kernel_variant() == _core._kernel_variant()
    for variant in _core._kernel_variants():
        _core.small_product(x, np.eye(4), out, variant)
        assert _core._last_kernel_variant() == variant
        with _core._use_kernel_variant(variant) as name:
            assert name == variant and _core._kernel_variant() == variant
            _core.small_product(x, np.eye(4), out)
            assert _core._last_kernel_variant() == variant
            with _core._use_kernel_variant("portable"):
                assert _core._kernel_variant() == "portable"
            assert _core._kernel_variant() == variant
    assert _core._kernel_variant() == _core._kernel_variants()[-1]


def test_threads_run_their_own_variants_at_once():
    """A variant chosen in one thread applies to that thread's calls only, while
    another thread runs kernels on a different one at the same time."""
    import threading
    variants = _core._kernel_variants()
    wanted = {"first": variants[0], "second": variants[-1], "default": None}
    barrier = threading.Barrier(len(wanted))
    seen, errors = {name: set() for name in wanted}, []
    x = np.random.default_rng(0).standard_normal((64, 64))
    matrix = np.eye(64)

    def work(name):
        try:
            variant = wanted[name]
            with (_core._use_kernel_variant(variant) if variant else contextlib.nullcontext()):
                barrier.wait()
                for _ in range(200):
                    out = np.empty_like(x)
                    _core.small_product(x, matrix, out)
                    seen[name].add((_core._kernel_variant(), _core._last_kernel_variant()))
                    assert np.array_equal(out, x)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in wanted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen["first"] == {(variants[0], variants[0])}
    assert seen["second"] == {(variants[-1], variants[-1])}
    assert seen["default"] == {(variants[-1], variants[-1])}


@pytest.mark.parametrize("cap, expected", [("portable", ["portable"]), ("AVX2", ["portable", "avx2"]),
                                           ("avx512", None), ("", None), ("sse9", None)])
def test_simd_environment_variable_caps_the_variants(cap, expected):
    import json

    from conftest import run_python
    result = run_python("-W", "always", "-c",
                        "import json, io, turboquant as t; from turboquant._kernels import _core; "
                        "info = t.show_config(file=io.StringIO()); "
                        "print(json.dumps([_core._kernel_variants(), info['kernels']]))",
                        TURBOQUANT_SIMD=cap)
    assert result.returncode == 0, result.stderr
    variants, in_use = json.loads(result.stdout)
    cpu = _core._kernel_variants() if not os.environ.get("TURBOQUANT_SIMD") else None
    if cpu is not None:
        assert variants == (cpu if expected is None else cpu[:len(expected)])
    assert in_use == variants[-1]
    assert ("TURBOQUANT_SIMD='sse9' is not one of" in result.stderr) == (cap == "sse9")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_kernel_variants_are_bit_identical(dtype, bits):
    results = {}
    for variant in _core._kernel_variants():
        with _core._use_kernel_variant(variant):
            results[variant] = variant_outputs(dtype, bits)
    for variant, outputs in results.items():
        for got, expected in zip(outputs, results["portable"]):
            assert got.dtype == expected.dtype
            assert np.array_equal(got, expected, equal_nan=True), variant


# -- small dense products ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 15, 16, 17, 63, 64, 65, 128, 130, 200])
@pytest.mark.parametrize("m", [0, 1, 4])
def test_small_product_matches_matmul(dtype, dim, m):
    rng = np.random.default_rng([dim, m])
    x = rng.standard_normal((m, dim)).astype(dtype)
    matrix = rng.standard_normal((dim, dim)).astype(dtype)
    eps = np.finfo(dtype).eps
    x64, m64 = x.astype(np.float64), matrix.astype(np.float64)
    out = np.full((m, dim), np.nan, dtype=dtype)
    _core.small_product(readonly(x), readonly(matrix), out)
    assert np.all(np.abs(out - x64 @ m64) <= (dim + 2) * eps * (np.abs(x64) @ np.abs(m64)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("dim", [9, 128, 300])
def test_a_few_rows_get_the_cells_they_get_in_a_tile(dtype, bits, dim):
    """Up to four rows are quantized one by one instead of in a 16-row tile: the
    same cells, packed bytes and residuals, on every kernel variant."""
    import turboquant as tq
    rng = np.random.default_rng([53, bits, dim])
    book = tq.lloyd_max_codebook(dim, bits)
    y = (rng.standard_normal((20, dim)) * rng.uniform(0.5, 3.0, size=(20, 1))).astype(dtype)
    y[3] = 0.0
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    tiled_codes = np.empty((20, packed_width(dim, bits)), dtype=np.uint8)
    tiled_residual = np.empty_like(y)
    _core.quantize_pack(y, norms, book.boundaries, book.centroids, bits, tiled_codes, tiled_residual, True, 1)
    for variant in _core._kernel_variants():
        for rows in (slice(0, 1), slice(2, 4), slice(3, 7)):
            codes = np.empty_like(tiled_codes[rows])
            residual = np.empty_like(y[rows])
            _core.quantize_pack(np.ascontiguousarray(y[rows]), norms[rows], book.boundaries, book.centroids,
                                bits, codes, residual, True, 1, variant)
            np.testing.assert_array_equal(codes, tiled_codes[rows])
            np.testing.assert_array_equal(residual, tiled_residual[rows])
