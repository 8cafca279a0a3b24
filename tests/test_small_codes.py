"""The float32 kernels for codes of 1 to 4 bits (``include/tq_lut.h``), on every variant.

float32 queries (scores) and float32 weights (weighted sums) of codes with at
most 4 bits run in float32 on the best kernel variant the processor has
(AVX-512, AVX2 with FMA, or portable C); unlike the quantization kernels these
variants round differently (FMA, partial sums). Each variant is checked here against a float64 numpy
reference with float32 rounding-error bounds (see ``tests/test_kernels.py``),
for whole and partial 16-row blocks, dims that are not multiples of 8 or 16,
several queries per pass and the row tails of 3-bit codes, and is checked to
give each row the same bits wherever it sits among the rows of a call.
"""

import numpy as np
import pytest

import turboquant as tq
from kv_model import exact_attention
from test_kernels import assert_ran_on
from turboquant._kernels import _core

EPS32 = np.finfo(np.float32).eps
AVAILABLE = _core._kernel_variants()


@pytest.fixture(params=AVAILABLE)
def path(request):
    """Run the test's kernel calls on one kernel variant."""
    with _core._use_kernel_variant(request.param):
        assert _core._kernel_variant() == request.param
        yield request.param


def random_case(rng, n, dim, bits):
    centroids = np.sort(rng.standard_normal(1 << bits))
    indices = rng.integers(0, 1 << bits, size=(n, dim), dtype=np.uint8)
    packed = np.empty((n, (dim * bits + 7) // 8), dtype=np.uint8)
    _core.pack_indices(indices, bits, packed, 1)
    scales = rng.uniform(0.0, 3.0, size=n)
    return centroids, indices, packed, scales


def scores(packed, bits, centroids, queries, scales, n_threads=1):
    out = np.full((queries.shape[0], packed.shape[0]), np.nan, dtype=np.float32)
    _core.lut_inner_products(packed, bits, centroids, queries, scales, out, False, n_threads)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [1, 5, 8, 15, 16, 17, 31, 32, 40, 97, 128, 200])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 300])
def test_scores_match_reference(path, bits, dim, n):
    rng = np.random.default_rng([bits, dim, n])
    centroids, indices, packed, scales = random_case(rng, n, dim, bits)
    queries = rng.standard_normal((5, dim)).astype(np.float32)   # a pass of 4 and one of 1
    values = centroids[indices]
    q64 = queries.astype(np.float64)
    expected = (q64 @ values.T) * scales
    magnitude = (np.abs(q64) @ np.abs(values).T) * scales
    out = scores(packed, bits, centroids, queries, scales)
    assert out.dtype == np.float32
    assert np.all(np.abs(out - expected) <= (dim + 2) * EPS32 * magnitude + EPS32 * np.abs(expected))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [7, 48, 128])
def test_a_rows_score_does_not_depend_on_its_neighbours(path, bits, dim):
    """The same row gets the same bits alone, in any block position, for any number of queries."""
    rng = np.random.default_rng([7, bits, dim])
    centroids, _, packed, scales = random_case(rng, 300, dim, bits)
    queries = rng.standard_normal((6, dim)).astype(np.float32)
    together = scores(packed, bits, centroids, queries, scales)
    for i in (0, 5, 15, 16, 255, 256, 299):
        alone = scores(packed[i:i + 1], bits, centroids, queries, scales[i:i + 1])
        np.testing.assert_array_equal(alone[:, 0], together[:, i])
        shifted = scores(packed[i:], bits, centroids, queries[2:3], scales[i:])
        assert shifted[0, 0] == together[2, i]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_scores_identical_for_every_thread_count(path, bits):
    rng = np.random.default_rng([11, bits])
    centroids, _, packed, scales = random_case(rng, 40_000, 64, bits)
    queries = rng.standard_normal((5, 64)).astype(np.float32)   # 1 bit: 5 * 40000 * 8 bytes > 2**20
    one = scores(packed, bits, centroids, queries, scales, 1)
    assert_ran_on(1, _core._last_team_size())
    for threads in (2, 3):
        np.testing.assert_array_equal(one, scores(packed, bits, centroids, queries, scales, threads))
        assert_ran_on(threads, _core._last_team_size())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [1, 9, 16, 33, 128, 144])
@pytest.mark.parametrize("n", [1, 17, 700, 3000])
def test_weighted_sums_match_reference(path, bits, dim, n):
    rng = np.random.default_rng([13, bits, dim, n])
    centroids, indices, packed, scales = random_case(rng, n, dim, bits)
    weights = rng.random((3, n)).astype(np.float32)
    values = scales[:, None] * centroids[indices]
    w64 = weights.astype(np.float64)
    expected = w64 @ values
    out = np.full((3, dim), np.nan)
    _core.lut_weighted_sum(packed, bits, centroids, weights, scales, out, 1)
    assert np.all(np.abs(out - expected) <= (n + 3) * EPS32 * (np.abs(w64) @ np.abs(values)))
    again = np.full((3, dim), np.nan)
    _core.lut_weighted_sum(packed, bits, centroids, weights, scales, again, 2)
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [33, 96, 128, 144])
def test_a_querys_weighted_sum_does_not_depend_on_the_other_queries(path, bits, dim):
    """Up to four queries share each decoded row; each one's sums are the bits it
    gets alone, for every number of queries in a call."""
    rng = np.random.default_rng([19, bits, dim])
    n = 600
    centroids, _, packed, scales = random_case(rng, n, dim, bits)
    weights = rng.random((9, n)).astype(np.float32)
    alone = np.empty((9, dim))
    for q in range(9):
        _core.lut_weighted_sum(packed, bits, centroids, weights[q:q + 1], scales, alone[q:q + 1], 1)
    for m in range(2, 10):
        together = np.empty((m, dim))
        _core.lut_weighted_sum(packed, bits, centroids, weights[:m], scales, together, 1)
        np.testing.assert_array_equal(together, alone[:m])


def test_paths_agree_to_float32_rounding():
    """Every path scores a real quantizer's codes like the float64 path, to float32 rounding."""
    rng = np.random.default_rng(5)
    quantizer = tq.TurboQuantMSE(128, 4, seed=1)
    codes = quantizer.quantize(rng.standard_normal((2000, 128)))
    queries = rng.standard_normal((2, 128))
    exact = quantizer.inner_products(codes, queries)
    results = {}
    for name in AVAILABLE:
        with _core._use_kernel_variant(name):
            results[name] = quantizer.inner_products(codes, queries.astype(np.float32))
    for result in results.values():
        np.testing.assert_allclose(result, exact, rtol=0, atol=200 * EPS32 * np.abs(exact).max())


# -- fused float32 attention of the KV cache ---------------------------------------------
@pytest.mark.parametrize("key_bits, value_bits", [(4, 4), (2, 3), (3, 1), (1, 2)])
@pytest.mark.parametrize("n", [1, 37, 3000])
@pytest.mark.parametrize("center_keys", [False, True])
def test_float32_attention_matches_float64(path, key_bits, value_bits, n, center_keys):
    """float32 queries take the fused kernel (scores, float32 exponential, weighted
    sums); the result is the float64 attention over the same codes to float32 rounding."""
    rng = np.random.default_rng([17, key_bits, value_bits, n])
    dim = 96
    cache = tq.QuantizedKVCache(tq.KVCacheConfig(dim, key_bits=key_bits, value_bits=value_bits,
                                                 center_keys=center_keys))
    cache.append(rng.standard_normal((n, dim)) + 0.5, rng.standard_normal((n, dim)))
    queries = (2.0 * rng.standard_normal((20, dim))).astype(np.float32)   # two blocks of 16
    scale = 1.0 / np.sqrt(dim)
    out = cache.attention_output(queries)
    assert out.dtype == np.float32 and out.shape == (20, dim)
    expected, _ = exact_attention(queries, cache.reconstruct_keys(), cache.reconstruct_values(), scale)
    # Relative errors of a few float32 roundings in each logit (times its size, up to
    # ~30 here) and in the weighted sums: 1e-4 of the largest value is far outside them.
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # One query or a block: the same up to the float32 rounding of the BLAS rotation.
    np.testing.assert_allclose(cache.attention_output(queries[2]), out[2], rtol=0,
                               atol=1e-5 * np.abs(out[2]).max())
    np.testing.assert_array_equal(cache.attention_output(queries, n_threads=1),
                                  cache.attention_output(queries, n_threads=2))


def test_float32_attention_agrees_with_the_general_path(path):
    """Sinks send float32 queries down the general path; with the sink token's
    weight removed the two paths agree to float32 rounding."""
    rng = np.random.default_rng(23)
    dim, n = 64, 2000
    keys, values = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    query = rng.standard_normal(dim).astype(np.float32)
    fused = tq.QuantizedKVCache(tq.KVCacheConfig(dim))
    fused.append(keys, values)
    general = tq.QuantizedKVCache(tq.KVCacheConfig(dim, sink_tokens=1))
    general.append(np.vstack([np.zeros((1, dim)), keys]), np.vstack([np.zeros((1, dim)), values]))
    general_weights = general.attention_weights(query)
    expected = (general_weights[1:] / general_weights[1:].sum()) @ general.reconstruct_values()[1:]
    np.testing.assert_allclose(fused.attention_output(query), expected, rtol=0, atol=1e-5)


def test_float32_attention_of_an_empty_cache_is_zero():
    cache = tq.QuantizedKVCache(tq.KVCacheConfig(16))
    np.testing.assert_array_equal(cache.attention_output(np.ones(16, dtype=np.float32)), np.zeros(16))


@pytest.mark.parametrize("query_shape", [(), (3,)])
def test_multi_head_float32_attention_is_each_heads_own(path, query_shape):
    """All heads in one fused call (heads in parallel) give each head's own
    single-head result, bit for bit, for any thread count."""
    rng = np.random.default_rng(29)
    heads, query_heads, dim, n = 4, 8, 48, 700
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, tq.KVCacheConfig(dim), num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim)), rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((query_heads, *query_shape, dim)).astype(np.float32)
    together = cache.attention_output_all(queries)
    assert together.dtype == np.float32 and together.shape == queries.shape
    group = query_heads // heads
    for h in range(query_heads):
        np.testing.assert_array_equal(together[h], cache.head(h // group).attention_output(queries[h]))
    np.testing.assert_array_equal(cache.attention_output_all(queries, n_threads=1),
                                  cache.attention_output_all(queries, n_threads=2))
    exact = cache.attention_output_all(queries.astype(np.float64))
    np.testing.assert_allclose(together, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
@pytest.mark.parametrize("m", [1, 20, 200])
def test_fused_attention_rotates_like_the_quantizers(path, rotation, m):
    """A few queries under a dense rotation are rotated (and the output rotated
    back) inside the kernel; that gives the bits of the quantizers' own rotate and
    unrotate, which run outside it for the Hadamard rotation and for many queries."""
    rng = np.random.default_rng([31, m])
    dim, n = 96, 500
    cache = tq.QuantizedKVCache(tq.KVCacheConfig(dim, key_bits=3, value_bits=4, rotation=rotation))
    cache.append(rng.standard_normal((n, dim)), rng.standard_normal((n, dim)))
    queries = rng.standard_normal((m, dim)).astype(np.float32)
    (key_codec, key_arrays), (value_codec, value_arrays) = cache._small_codes(queries)
    inside = key_codec.small_rotation(m) is not None
    assert inside == (rotation == "dense" and m * dim * dim <= 1 << 20)
    assert (value_codec.small_rotation(m, inverse=True) is not None) == inside
    rotated = np.empty((m, dim), dtype=np.float32)
    _core.small_code_attention(
        key_arrays["indices"], key_codec.bits, key_codec.codebook.centroids, key_arrays["norms"],
        value_arrays["indices"], value_codec.bits, value_codec.codebook.centroids, value_arrays["norms"],
        key_codec.rotate(queries, 1), None, None, 1.0 / np.sqrt(dim), rotated, 1)
    np.testing.assert_array_equal(cache.attention_output(queries), value_codec.unrotate(rotated, 1))


@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
def test_multi_head_fused_attention_with_either_rotation(path, rotation):
    rng = np.random.default_rng(37)
    heads, dim, n = 3, 40, 300
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, tq.KVCacheConfig(dim, rotation=rotation),
                                                   num_query_heads=6))
    cache.append_all(rng.standard_normal((heads, n, dim)), rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((6, 2, dim)).astype(np.float32)
    together = cache.attention_output_all(queries)
    for h in range(6):
        np.testing.assert_array_equal(together[h], cache.head(h // 2).attention_output(queries[h]))


def test_fused_attention_refuses_mismatched_operands():
    """The kernels' own shape checks: rotations must be (d, d), one address per head."""
    rng = np.random.default_rng(41)
    dim, n = 16, 20
    codes = rng.integers(0, 256, size=(n, dim // 2), dtype=np.uint8)
    centroids = np.linspace(-0.5, 0.5, 16)
    norms = np.ones(n, dtype=np.float32)
    queries = np.ones((1, dim), dtype=np.float32)
    out = np.empty((1, dim), dtype=np.float32)
    with pytest.raises(ValueError, match=r"a rotation must be \(16, 16\)"):
        _core.small_code_attention(codes, 4, centroids, norms, codes, 4, centroids, norms, queries,
                                   np.eye(15, dtype=np.float32), None, 1.0, out, 1)
    addresses = np.array([codes.ctypes.data], dtype=np.uintp)
    norm_addresses = np.array([norms.ctypes.data], dtype=np.uintp)
    with pytest.raises(ValueError, match="expected 2 addresses, got 1"):
        _core.small_code_attention_heads(addresses, norm_addresses, dim // 2, 4, centroids, addresses,
                                         norm_addresses, dim // 2, 4, centroids, n,
                                         np.ones((2, 1, dim), dtype=np.float32), None, None, 1.0,
                                         np.empty((2, 1, dim), dtype=np.float32), 1)


def test_fused_attention_is_identical_for_every_thread_count(path, teams):
    """Large enough for a team of threads (chunks handed out dynamically): the
    chunks are combined in order, so the bits do not depend on the team."""
    rng = np.random.default_rng(43)
    dim, n = 128, 9000
    cache = tq.QuantizedKVCache(tq.KVCacheConfig(dim))
    cache.append(rng.standard_normal((n, dim)), rng.standard_normal((n, dim)))
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    teams("small_code_attention")
    teams("lut_inner_products")
    one = cache.attention_output(queries, n_threads=1)
    one_scores = cache.attention_scores(queries, n_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(cache.attention_output(queries, n_threads=threads), one)
        np.testing.assert_array_equal(cache.attention_scores(queries, n_threads=threads), one_scores)
    assert len(teams.sizes) == 6
    for threads, team in zip((1, 1, 2, 2, 3, 3), teams.sizes):
        assert_ran_on(threads, team)


def test_multi_head_fused_attention_is_identical_for_every_thread_count(path, teams):
    """Heads spread over a team of threads give the bits of one thread."""
    rng = np.random.default_rng(44)
    heads, query_heads, dim, n = 4, 8, 64, 3000
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, tq.KVCacheConfig(dim), num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim)), rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((query_heads, dim)).astype(np.float32)
    teams("small_code_attention_heads")
    one = cache.attention_output_all(queries, n_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(cache.attention_output_all(queries, n_threads=threads), one)
    assert len(teams.sizes) == 3
    for threads, team in zip((1, 2, 3), teams.sizes):
        assert_ran_on(threads, team)


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_weighted_sums_identical_for_every_thread_count(path, bits):
    rng = np.random.default_rng([47, bits])
    centroids, _, packed, scales = random_case(rng, 40_000, 64, bits)
    weights = rng.random((6, 40_000)).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        out = np.empty((6, 64))
        _core.lut_weighted_sum(packed, bits, centroids, weights, scales, out, threads)
        assert_ran_on(threads, _core._last_team_size())
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
