"""Every cache configuration on the fused read path.

The fused float32 attention kernel (``small_code_attention``, include/tq_lut.h)
reads MSE codes of 1 to 8 bits: 1 to 4 from an in-register codebook, 5 to 7
bits with two-register permutes on AVX-512, 8 bits (and 5 to 8 on AVX2) with a
gather. Keys of several coded parts (outlier channels, the QJL signs of Prod
codes) add their parts' scores in the kernel; sink and recent rows are merged
into its softmax (``merge_exact_rows``). Each case is checked against the
float64 reference path of the same cache (scores from the codes, softmax,
weighted sums), on every kernel variant, for one head and grouped-query
multi-head caches, and for thread-count independence.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import turboquant as tq
from test_kernels import assert_ran_on
from test_kv_block_scales import assert_fused_close, filled, reference_output
from turboquant._kernels import _core

AVAILABLE = _core._kernel_variants()


@pytest.fixture(params=AVAILABLE)
def path(request):
    with _core._use_kernel_variant(request.param):
        yield request.param


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@SETTINGS
@given(key_bits=st.integers(1, 8), value_bits=st.integers(1, 8), dim=st.integers(2, 160),
       n=st.integers(1, 600), m=st.integers(1, 6), recent=st.sampled_from([0, 8]),
       variant=st.sampled_from(AVAILABLE), seed=st.integers(0, 2**16))
def test_fused_attention_of_every_width_equals_the_reference_path(key_bits, value_bits, dim, n, m, recent,
                                                                  variant, seed):
    config = tq.KVCacheConfig(dim, key_bits=key_bits, value_bits=value_bits, residual_tokens=recent)
    cache = filled(config, n + recent, seed)
    queries = np.random.default_rng(seed + 1).standard_normal((m, dim)).astype(np.float32)
    assert cache._small_codes(queries) is not None       # served by the fused kernel
    with _core._use_kernel_variant(variant):
        fused = cache.attention_output(queries)
        alone = cache.attention_output(queries[m - 1])
    assert fused.dtype == np.float32
    assert_fused_close(fused, reference_output(cache, queries, 1.0 / np.sqrt(dim)))
    np.testing.assert_array_equal(alone, fused[m - 1])    # a query's bits do not depend on the others


@pytest.mark.parametrize("variant", AVAILABLE)
@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("dim", [8, 64, 100, 128])
def test_wide_codes_every_variant(variant, bits, dim):
    """Whole 16-coordinate blocks, a partial last one and coordinates past it."""
    cache = filled(tq.KVCacheConfig(dim, key_bits=bits, value_bits=bits), 257, [bits, dim])
    queries = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32)
    with _core._use_kernel_variant(variant):
        fused = cache.attention_output(queries)
        scores = cache.attention_scores(queries)
    assert_fused_close(fused, reference_output(cache, queries, 1.0 / np.sqrt(dim)))
    exact = cache.attention_scores(queries.astype(np.float64))
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("bits", [(5, 3), (6, 6), (8, 8)])
def test_multi_head_wide_codes_equal_the_single_heads(bits):
    rng = np.random.default_rng(11)
    heads, query_heads, dim, n = 2, 6, 64, 300
    config = tq.KVCacheConfig(dim, key_bits=bits[0], value_bits=bits[1], residual_tokens=4)
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, config, num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim)), rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((query_heads, dim)).astype(np.float32)
    together = cache.attention_output_all(queries)
    for h in range(query_heads):
        head = cache.head(h // 3)
        np.testing.assert_allclose(together[h], head.attention_output(queries[h]), rtol=0, atol=1e-6)
        assert_fused_close(together[h], reference_output(head, queries[h][None], 1.0 / np.sqrt(dim))[0])


@pytest.mark.parametrize("variant", AVAILABLE)
def test_wide_fused_attention_is_identical_for_every_thread_count(variant, teams):
    dim, n = 128, 9000
    cache = filled(tq.KVCacheConfig(dim, key_bits=6, value_bits=8), n, 12)
    queries = np.random.default_rng(13).standard_normal((3, dim)).astype(np.float32)
    teams("small_code_attention")
    with _core._use_kernel_variant(variant):
        one = cache.attention_output(queries, n_threads=1)
        for threads in (2, 3):
            np.testing.assert_array_equal(cache.attention_output(queries, n_threads=threads), one)
    for threads, team in zip((1, 2, 3), teams.sizes):
        assert_ran_on(threads, team)


PART_CONFIGS = [
    dict(outlier_channels=4),
    dict(outlier_channels=4, center_keys=True, outlier_bits=8),
    dict(outlier_channels=(0, 5, 9), key_bits=3, outlier_bits=6, sink_tokens=2, residual_tokens=8),
    dict(key_strategy="prod"),
    dict(key_strategy="prod", key_bits=2, value_bits=6, sketch="hadamard", rotation="hadamard"),
    dict(key_strategy="prod", key_bits=5, outlier_channels=8, outlier_bits=7, center_keys=True),
    dict(key_strategy="prod", residual_tokens=16, residual_dtype="float16", sink_tokens=4),
]


@pytest.mark.parametrize("options", PART_CONFIGS)
@pytest.mark.parametrize("dim", [16, 64, 100, 128])
def test_keys_of_several_parts_equal_the_reference_path(path, options, dim):
    cache = filled(tq.KVCacheConfig(dim, **options), 400, [dim, len(options)], offset=0.5)
    queries = np.random.default_rng(dim + 1).standard_normal((6, dim)).astype(np.float32)
    assert cache._fused_output(queries, 1.0 / np.sqrt(dim), 1, cache._regions(0)) is not None
    fused = cache.attention_output(queries)
    assert fused.dtype == np.float32
    assert_fused_close(fused, reference_output(cache, queries, 1.0 / np.sqrt(dim)))
    np.testing.assert_array_equal(cache.attention_output(queries[4]), fused[4])


@pytest.mark.parametrize("options", [PART_CONFIGS[1], PART_CONFIGS[5]])
def test_multi_head_keys_of_several_parts(options):
    rng = np.random.default_rng(14)
    heads, query_heads, dim, n = 2, 4, 64, 250
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, tq.KVCacheConfig(dim, **options),
                                                   num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim)) + 0.5, rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((query_heads, 3, dim)).astype(np.float32)
    together = cache.attention_output_all(queries)
    for h in range(query_heads):
        assert_fused_close(together[h], reference_output(cache.head(h // 2), queries[h], 1.0 / np.sqrt(dim)))


def test_merge_exact_rows_is_the_softmax_over_both():
    """``merge_exact_rows`` against a float64 softmax over coded and exact logits."""
    rng = np.random.default_rng(15)
    heads, m, r, d, scale = 3, 4, 5, 8, 0.3
    coded_logits = rng.standard_normal((heads, m, 7))
    coded_values = rng.standard_normal((heads, 7, d))
    weights = np.exp(coded_logits - coded_logits.max(-1, keepdims=True))
    out = (np.matmul(weights, coded_values) / weights.sum(-1, keepdims=True)).astype(np.float32)
    lse = np.log(np.exp(coded_logits).sum(-1)).astype(np.float32)
    queries = rng.standard_normal((heads, m, d)).astype(np.float32)
    keys = rng.standard_normal((heads, r, d)).astype(np.float32)
    values = rng.standard_normal((heads, r, d)).astype(np.float32)
    center = rng.standard_normal((heads, d)).astype(np.float32)
    shift = scale * np.einsum("hmd,hd->hm", queries.astype(np.float64), center)
    logits = np.concatenate([lse.astype(np.float64)[..., None] + shift[..., None],
                             scale * np.matmul(queries.astype(np.float64), np.swapaxes(keys, 1, 2))], axis=-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = p[..., :1] * out + np.matmul(p[..., 1:], values.astype(np.float64))
    merged = out.copy()
    _core.merge_exact_rows(merged, lse, queries, keys, values, scale, center)
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="merge_exact_rows"):
        _core.merge_exact_rows(merged, lse[:2].copy(), queries, keys, values, scale, center)
