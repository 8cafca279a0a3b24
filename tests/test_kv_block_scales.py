"""Block-scaled codes and float16 residual rows in the KV cache, on the fused read path.

``KVCacheConfig(block_scales=True)`` quantizes keys and values with the codes
of ``TurboQuantMSE(..., block_scales=True)``; ``residual_dtype="float16"`` holds
sink and recent tokens as float16. The fused float32 kernel
(include/tq_block.h inside ``small_code_attention``) reads the block-scaled
codes, returns each query's log-sum-exp, and the exact sink and recent rows
are merged into that softmax; every result is checked here against the
float64 reference path of the same cache (float32 rounding bounds), on every
kernel variant, for one head and for grouped-query multi-head caches.
"""

import numpy as np
import pytest

import turboquant as tq
from test_kernels import assert_ran_on
from turboquant._kernels import _core

AVAILABLE = _core._kernel_variants()
BLOCK = 16


@pytest.fixture(params=AVAILABLE)
def path(request):
    with _core._use_kernel_variant(request.param):
        yield request.param


def filled(config, n, seed, offset=1.0):
    """A cache of ``config`` holding ``n`` random tokens (keys with a common offset)."""
    rng = np.random.default_rng(seed)
    cache = tq.QuantizedKVCache(config)
    cache.append(rng.standard_normal((n, config.dim)) + offset, rng.standard_normal((n, config.dim)))
    return cache


def reference_output(cache, queries, scale):
    """The float64 reference path: scores from the codes, softmax, weighted sums."""
    return cache._weighted_values(queries.astype(np.float64), scale, 1, cache._regions(0))


def assert_fused_close(fused, reference):
    # float32 scores and sums over a few hundred rows: a few ulps of the largest output.
    np.testing.assert_allclose(fused, reference, rtol=0, atol=2e-5 * np.abs(reference).max())


CONFIGS = [
    dict(block_scales=True),
    dict(block_scales=True, key_bits=3, value_bits=2),
    dict(block_scales=True, key_bits=1, value_bits=1),
    dict(block_scales=True, center_keys=True, residual_tokens=16, residual_dtype="float16"),
    dict(block_scales=True, sink_tokens=4, residual_tokens=8, rotation="hadamard"),
    dict(sink_tokens=2, residual_tokens=8),
    dict(residual_tokens=32, residual_dtype="float16", center_keys=True),
]


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("dim", [24, 64, 80, 128])
def test_fused_attention_equals_the_reference_path(path, options, dim):
    config = tq.KVCacheConfig(dim, **options)
    cache = filled(config, 300, [dim, len(options)])
    queries = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32)
    scale = 1.0 / np.sqrt(dim)
    assert cache._small_codes(queries) is not None      # served by the fused kernel
    fused = cache.attention_output(queries)
    assert fused.dtype == np.float32
    assert_fused_close(fused, reference_output(cache, queries, scale))
    # One query alone gives the bits it gets among others.
    np.testing.assert_array_equal(cache.attention_output(queries[2]), fused[2])


@pytest.mark.parametrize("options", CONFIGS[2:5])
def test_multi_head_fused_attention_equals_the_reference_path(path, options):
    rng = np.random.default_rng(5)
    heads, query_heads, dim, n = 3, 6, 64, 200
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, tq.KVCacheConfig(dim, **options),
                                                   num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim)) + 0.5, rng.standard_normal((heads, n, dim)))
    queries = rng.standard_normal((query_heads, 2, dim)).astype(np.float32)
    together = cache.attention_output_all(queries)
    for h in range(query_heads):
        head = cache.head(h // 2)
        np.testing.assert_allclose(together[h], head.attention_output(queries[h]), rtol=0, atol=1e-6)
        assert_fused_close(together[h], reference_output(head, queries[h], 1.0 / np.sqrt(dim)))


def test_log_sum_exp_of_the_kernel():
    """``lse`` is log(sum_i exp(scale * score_i)) over the coded rows."""
    dim, n = 64, 500
    cache = filled(tq.KVCacheConfig(dim, block_scales=True), n, 7, offset=0.0)
    queries = np.random.default_rng(8).standard_normal((3, dim)).astype(np.float32)
    (key_codec, key_arrays), (value_codec, value_arrays) = cache._small_codes(queries)
    keys, values = key_codec.fused_side(key_arrays, n), value_codec.fused_side(value_arrays, n)
    out, lse = np.empty((3, dim), dtype=np.float32), np.empty(3, dtype=np.float32)
    _core.small_code_attention(
        keys.codes, keys.bits, keys.centroids, keys.norms, values.codes, values.bits, values.centroids,
        values.norms, key_codec.rotate(queries, 1), None, None, 0.125, out, 1,
        key_block_scales=keys.block_scales, key_factors=keys.factors,
        value_block_scales=values.block_scales, value_factors=values.factors, lse=lse)
    logits = 0.125 * cache.attention_scores(queries.astype(np.float64))
    expected = np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(lse, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fused_block_attention_is_identical_for_every_thread_count(path, teams):
    dim, n = 128, 9000
    cache = filled(tq.KVCacheConfig(dim, block_scales=True, residual_tokens=4), n, 9)
    queries = np.random.default_rng(10).standard_normal((5, dim)).astype(np.float32)
    teams("small_code_attention")
    one = cache.attention_output(queries, n_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(cache.attention_output(queries, n_threads=threads), one)
    for threads, team in zip((1, 2, 3), teams.sizes):
        assert_ran_on(threads, team)


@pytest.mark.parametrize("dim", [64, 128])
def test_bits_per_value_count_every_byte(dim):
    """Block-scaled codes: bits + 4/16 (factor indices) + 16/dim (a float16 scale)
    per value; float16 residual rows 16 bits per value."""
    n, recent = 1000, 16
    config = tq.KVCacheConfig(dim, key_bits=4, value_bits=3, block_scales=True, residual_tokens=recent,
                              residual_dtype="float16")
    stats = filled(config, n, 11).stats()
    side = 4 / BLOCK + 16 / dim
    quantized = n - recent
    assert stats.key_bytes * 8 == quantized * dim * (4 + side) + recent * dim * 16
    assert stats.value_bytes * 8 == quantized * dim * (3 + side) + recent * dim * 16
    assert stats.full_precision_tokens == recent and stats.quantized_tokens == quantized


def test_float16_recent_rows_are_quantized_as_stored():
    """A token ages out of a float16 window into the codes of its float16 copy."""
    dim = 64
    rng = np.random.default_rng(12)
    keys, values = rng.standard_normal((40, dim)), rng.standard_normal((40, dim))
    windowed = tq.QuantizedKVCache(tq.KVCacheConfig(dim, block_scales=True, residual_tokens=8,
                                                    residual_dtype="float16"))
    for k, v in zip(keys, values):
        windowed.push_token(k, v)
    direct = tq.QuantizedKVCache(tq.KVCacheConfig(dim, block_scales=True))
    direct.append(keys[:32].astype(np.float16).astype(np.float64), values[:32].astype(np.float16).astype(np.float64))
    np.testing.assert_array_equal(windowed.reconstruct_keys()[:32], direct.reconstruct_keys())
    np.testing.assert_array_equal(windowed.reconstruct_values()[32:], values[32:].astype(np.float16))


def test_float16_overflow_is_refused_and_leaves_the_cache_unchanged():
    dim = 16
    cache = filled(tq.KVCacheConfig(dim, residual_tokens=4, residual_dtype="float16"), 10, 13)
    before = cache.reconstruct_keys()
    big = np.zeros((2, dim))
    big[1, 3] = 70000.0
    with pytest.raises(tq.NonFiniteError, match="float16"):
        cache.append(big, np.zeros((2, dim)))
    assert cache.num_tokens == 10
    np.testing.assert_array_equal(cache.reconstruct_keys(), before)


@pytest.mark.parametrize("options, match", [
    (dict(block_scales=True, key_strategy="prod"), "MSE keys"),
    (dict(block_scales=True, outlier_channels=4), "outlier_channels"),
    (dict(block_scales=True, key_bits=5), "key_bits 1..4"),
    (dict(block_scales=True, value_bits=8), "value_bits 1..4"),
    (dict(block_scales=1), "block_scales"),
    (dict(residual_dtype="bfloat16"), "residual_dtype"),
])
def test_invalid_block_settings(options, match):
    with pytest.raises(tq.InvalidParameterError, match=match):
        tq.KVCacheConfig(64, **options)


def test_block_config_round_trips_through_json():
    config = tq.KVCacheConfig(64, block_scales=True, residual_dtype="float16", residual_tokens=16)
    assert tq.KVCacheConfig.from_json(config.to_json()) == config


def test_block_codes_beat_the_paper_codes_in_the_cache():
    """At equal bits per value (4/4 block-scaled: 4.5 at d = 64; the paper's 4/4
    with float32 norms: 4.5), attention outputs are closer to exact attention."""
    rng = np.random.default_rng(14)
    dim, n, m = 64, 2000, 64
    keys, values = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    queries = rng.standard_normal((m, dim)) * 2
    logits = queries @ keys.T / np.sqrt(dim)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    exact = (weights / weights.sum(axis=1, keepdims=True)) @ values
    errors = {}
    for block in (False, True):
        cache = tq.QuantizedKVCache(tq.KVCacheConfig(dim, block_scales=block))
        cache.append(keys, values)
        assert cache.stats().key_bits_per_channel == 4.5
        errors[block] = np.mean((cache.attention_output(queries) - exact) ** 2)
    assert errors[True] < 0.75 * errors[False]
