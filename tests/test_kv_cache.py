"""Tests of the quantized KV cache (:class:`QuantizedKVCache`, :class:`MultiHeadKVCache`).

The first section ports, one for one and under the same names, the 34 tests of
the Rust reference design (``kv_cache.rs``); the differences are by design:
MSE keys by default, any finite vector accepted (so transactionality is shown
with NaN instead of a non-unit vector), ``scale=None`` instead of
``temperature <= 0``, typed exceptions instead of ``Err``, ``IndexError`` from
``head(i)``, and repr instead of ``Debug``. Everything after that section covers
what the reference does not have: batched queries, sinks, the recent window,
outlier channels, grouped-query attention, transactionality, byte-exact stats
and thread-count independence; a Hypothesis state machine checks the eviction
logic against a plain Python model.

Loops over single tokens or single queries (and the state machine) pass
``n_threads=1``: results do not depend on the thread count (tested exactly in
the thread-count section), and for such tiny calls the start-up of an OpenMP
team would dominate the run time.

Equalities "to 1e-10" follow the reference; they are really bitwise up to BLAS
reassociation, because every token is quantized on its own (rows are
independent) and the read path is deterministic.
"""

import dataclasses
import math

import numpy as np
import pytest
from conftest import random_unit_vectors
from kv_model import assert_same_snapshot, snapshot, softmax
from test_kernels import assert_ran_on

from turboquant import (
    CacheStats,
    DTypeError,
    InvalidParameterError,
    KVCacheConfig,
    LengthMismatchError,
    MultiHeadCacheStats,
    MultiHeadConfig,
    MultiHeadKVCache,
    NonFiniteError,
    QuantizedKVCache,
    QuantStrategy,
    ShapeError,
    TurboQuantError,
    lloyd_max_codebook,
)


# -- helpers ------------------------------------------------------------------------
def mse_config(dim, **kwargs):
    """The reference's ``KVCacheConfig::new(dim).with_key_strategy(MSE)`` plus ``kwargs``."""
    return KVCacheConfig(dim, key_strategy=QuantStrategy.MSE, **kwargs)


def unit_query(dim, seed):
    return random_unit_vectors(1, dim, seed)[0]


def float32_exact(x):
    """``x`` rounded to float32 and held as float64 (what the full-precision regions store)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def head_blocks(num_heads, n, dim, seed):
    """(num_heads, n, dim) unit vectors, head ``h`` drawn with seed ``seed + h``."""
    return np.stack([random_unit_vectors(n, dim, seed + h) for h in range(num_heads)])


def rows(*ranges):
    """Integer row indices of the concatenated ``(start, stop)`` ranges (possibly empty)."""
    return np.concatenate([np.arange(start, stop, dtype=np.intp) for start, stop in ranges])


def expected_regions(n_appended, sink_tokens, residual_tokens, max_tokens):
    """(sinks, quantized, recent) token counts after ``n_appended`` tokens (no clear)."""
    kept = min(n_appended, max_tokens) if max_tokens else n_appended
    sinks = min(sink_tokens, kept)
    recent = min(residual_tokens, kept - sinks)
    return sinks, kept - sinks - recent, recent


# =====================================================================================
# Ports of the 34 reference tests (same names, same sizes, same assertions).
# =====================================================================================
def test_kv_cache_basic_mse():
    cache = QuantizedKVCache(mse_config(64, key_bits=4, value_bits=4))
    assert cache.num_tokens == 0
    keys = random_unit_vectors(8, 64, 1)
    values = random_unit_vectors(8, 64, 2)
    cache.append(keys, values)
    assert cache.num_tokens == 8
    query = unit_query(64, 3)
    scores = cache.attention_scores(query)
    assert scores.shape == (8,)
    true_ip = keys @ query
    assert np.all(np.abs(true_ip - scores) < 0.2), np.c_[true_ip, scores]


def test_kv_cache_basic_prod():
    cache = QuantizedKVCache(KVCacheConfig(64, key_bits=3, key_strategy=QuantStrategy.PROD))
    keys = random_unit_vectors(8, 64, 10)
    values = random_unit_vectors(8, 64, 20)
    cache.append(keys, values)
    scores = cache.attention_scores(unit_query(64, 30))
    assert scores.shape == (8,)
    assert np.all(np.isfinite(scores))


def test_kv_cache_incremental_append():
    cache = QuantizedKVCache(mse_config(64, key_bits=4, value_bits=4))
    cache.append(random_unit_vectors(4, 64, 1), random_unit_vectors(4, 64, 2))
    assert cache.num_tokens == 4
    cache.append(random_unit_vectors(3, 64, 3), random_unit_vectors(3, 64, 4))
    assert cache.num_tokens == 7
    assert len(cache) == 7


def test_kv_cache_attention_output():
    cache = QuantizedKVCache(mse_config(64, key_bits=4, value_bits=4))
    cache.append(random_unit_vectors(8, 64, 1), random_unit_vectors(8, 64, 2))
    output = cache.attention_output(unit_query(64, 3), None)
    assert output.shape == (64,)
    assert np.all(np.isfinite(output)), "output contains non-finite value"


def test_kv_cache_stats():
    cache = QuantizedKVCache(mse_config(128, key_bits=4, value_bits=4))
    cache.append(random_unit_vectors(16, 128, 1), random_unit_vectors(16, 128, 2))
    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    assert stats.num_tokens == 16
    assert stats.dim == 128
    assert stats.compression_ratio > 1.0
    assert stats.total_bytes > 0
    assert stats.total_bytes < stats.uncompressed_bytes


def test_kv_cache_clear():
    cache = QuantizedKVCache(mse_config(64))
    cache.append(random_unit_vectors(4, 64, 1), random_unit_vectors(4, 64, 2))
    assert cache.num_tokens == 4
    cache.clear()
    assert cache.num_tokens == 0
    assert cache.attention_scores(unit_query(64, 3)).shape == (0,)


def test_kv_cache_empty_attention():
    cache = QuantizedKVCache(mse_config(64))
    query = unit_query(64, 1)
    assert cache.attention_scores(query).shape == (0,)
    output = cache.attention_output(query, None)
    assert output.shape == (64,)
    assert np.all(output == 0.0)


def test_kv_cache_dimension_mismatch():
    cache = QuantizedKVCache(mse_config(64))
    cache.append(random_unit_vectors(4, 64, 1), random_unit_vectors(4, 64, 2))
    with pytest.raises(ShapeError, match=r"query has shape \(32,\); expected \(64,\)"):
        cache.attention_scores(np.zeros(32))


def test_kv_cache_reconstruct_values():
    cache = QuantizedKVCache(mse_config(64, value_bits=4))
    values = random_unit_vectors(4, 64, 2)
    cache.append(random_unit_vectors(4, 64, 1), values)
    recon = cache.reconstruct_values()
    assert recon.shape == (4, 64)
    mse = np.mean((values - recon) ** 2, axis=1)
    assert np.all(mse < 0.1), f"value reconstruction MSE {mse} too large"


def test_kv_cache_incremental_scores_match():
    dim = 64
    config = mse_config(dim, key_bits=4, value_bits=4, seed=42)
    keys1, vals1 = random_unit_vectors(4, dim, 1), random_unit_vectors(4, dim, 2)
    keys2, vals2 = random_unit_vectors(3, dim, 3), random_unit_vectors(3, dim, 4)
    bulk = QuantizedKVCache(config)
    bulk.append(np.concatenate([keys1, keys2]), np.concatenate([vals1, vals2]))
    incr = QuantizedKVCache(config)
    incr.append(keys1, vals1)
    incr.append(keys2, vals2)
    query = unit_query(dim, 99)
    bulk_scores, incr_scores = bulk.attention_scores(query), incr.attention_scores(query)
    assert bulk_scores.shape == incr_scores.shape == (7,)
    np.testing.assert_allclose(incr_scores, bulk_scores, rtol=0, atol=1e-10)


def test_kv_cache_append_empty():
    cache = QuantizedKVCache(mse_config(64))
    cache.append(np.empty((0, 64)), np.empty((0, 64)))
    assert cache.num_tokens == 0
    cache.append(random_unit_vectors(2, 64, 1), random_unit_vectors(2, 64, 2))
    assert cache.num_tokens == 2
    cache.append(np.empty((0, 64)), np.empty((0, 64)))
    assert cache.num_tokens == 2


def test_multi_head_basic():
    cache = MultiHeadKVCache(MultiHeadConfig(4, mse_config(32, key_bits=4, value_bits=4)))
    assert cache.num_heads == 4
    assert cache.head_dim == 32
    assert cache.num_tokens == 0
    cache.append_all(head_blocks(4, 6, 32, 100), head_blocks(4, 6, 32, 200))
    assert cache.num_tokens == 6
    queries = np.stack([unit_query(32, 300 + h) for h in range(4)])
    scores = cache.attention_scores_all(queries)
    assert scores.shape == (4, 6)


def test_multi_head_attention_output():
    cache = MultiHeadKVCache(MultiHeadConfig(2, mse_config(32, key_bits=4, value_bits=4)))
    cache.append_all(head_blocks(2, 4, 32, 10), head_blocks(2, 4, 32, 20))
    queries = np.stack([unit_query(32, 30 + h) for h in range(2)])
    outputs = cache.attention_output_all(queries, None)
    assert outputs.shape == (2, 32)
    assert np.all(np.isfinite(outputs))
    concat = cache.concat_outputs(outputs)
    assert concat.shape == (64,)


def test_multi_head_stats():
    cache = MultiHeadKVCache(MultiHeadConfig(4, mse_config(64, key_bits=4, value_bits=4)))
    cache.append_all(head_blocks(4, 8, 64, 0), head_blocks(4, 8, 64, 100))
    stats = cache.stats()
    assert isinstance(stats, MultiHeadCacheStats)
    assert stats.num_heads == 4
    assert stats.num_tokens == 8
    assert stats.head_dim == 64
    assert stats.compression_ratio > 1.0
    assert len(stats.head_stats) == 4


def test_multi_head_incremental_append():
    cache = MultiHeadKVCache(MultiHeadConfig(2, mse_config(32, key_bits=4)))
    cache.append_all(head_blocks(2, 3, 32, 0), head_blocks(2, 3, 32, 50))
    assert cache.num_tokens == 3
    cache.append_all(head_blocks(2, 5, 32, 100), head_blocks(2, 5, 32, 150))
    assert cache.num_tokens == 8


def test_multi_head_clear():
    cache = MultiHeadKVCache(MultiHeadConfig(2, mse_config(32)))
    cache.append_all(head_blocks(2, 4, 32, 0), head_blocks(2, 4, 32, 10))
    assert cache.num_tokens == 4
    cache.clear()
    assert cache.num_tokens == 0
    assert all(head.num_tokens == 0 for head in cache.heads)


def test_multi_head_prod_strategy():
    cache = MultiHeadKVCache(MultiHeadConfig(2, KVCacheConfig(64, key_bits=3, key_strategy="prod")))
    cache.append_all(head_blocks(2, 4, 64, 0), head_blocks(2, 4, 64, 10))
    queries = np.stack([unit_query(64, 20 + h) for h in range(2)])
    scores = cache.attention_scores_all(queries)
    assert scores.shape == (2, 4)


def test_push_token():
    cache = QuantizedKVCache(mse_config(64, key_bits=4, value_bits=4))
    assert cache.num_tokens == 0
    keys, values = random_unit_vectors(5, 64, 1), random_unit_vectors(5, 64, 2)
    for key, value in zip(keys, values):
        cache.push_token(key, value)
    assert cache.num_tokens == 5
    assert cache.attention_scores(unit_query(64, 99)).shape == (5,)


def test_sliding_window_eviction():
    cache = QuantizedKVCache(mse_config(64, key_bits=4, value_bits=4, max_tokens=5))
    assert cache.max_tokens == 5
    cache.append(random_unit_vectors(5, 64, 1), random_unit_vectors(5, 64, 2))
    assert cache.num_tokens == 5
    cache.append(random_unit_vectors(3, 64, 3), random_unit_vectors(3, 64, 4))
    assert cache.num_tokens == 5
    assert cache.attention_scores(unit_query(64, 99)).shape == (5,)


def test_sliding_window_token_by_token():
    cache = QuantizedKVCache(mse_config(32, key_bits=4, value_bits=4, max_tokens=3))
    keys, values = random_unit_vectors(10, 32, 1), random_unit_vectors(10, 32, 2)
    for i in range(10):
        cache.push_token(keys[i], values[i])
        assert cache.num_tokens <= 3, f"token {i}: count={cache.num_tokens}, expected <= 3"
    assert cache.num_tokens == 3
    assert cache.reconstruct_values().shape == (3, 32)


def test_sliding_window_prod_strategy():
    cache = QuantizedKVCache(KVCacheConfig(64, key_bits=3, key_strategy="prod", max_tokens=4))
    cache.append(random_unit_vectors(6, 64, 1), random_unit_vectors(6, 64, 2))
    assert cache.num_tokens == 4
    assert cache.attention_scores(unit_query(64, 99)).shape == (4,)


def test_unlimited_capacity():
    cache = QuantizedKVCache(mse_config(32, max_tokens=0))
    cache.append(random_unit_vectors(100, 32, 1), random_unit_vectors(100, 32, 2))
    assert cache.num_tokens == 100


def test_push_token_dimension_mismatch():
    cache = QuantizedKVCache(mse_config(64))
    good = unit_query(64, 1)
    with pytest.raises(ShapeError, match=r"key has shape \(32,\); expected \(64,\)"):
        cache.push_token(np.zeros(32), good)
    with pytest.raises(ShapeError, match=r"value has shape \(32,\); expected \(64,\)"):
        cache.push_token(good, np.zeros(32))
    assert cache.num_tokens == 0


def test_multi_head_zero_heads():
    with pytest.raises(InvalidParameterError, match=r"num_heads must be an integer >= 1, got 0"):
        MultiHeadKVCache(MultiHeadConfig(0, mse_config(32)))


def test_kv_cache_invalid_dimension():
    with pytest.raises(InvalidParameterError, match=r"dim must be an integer >= 2, got 0"):
        QuantizedKVCache(KVCacheConfig(0))


def test_kv_cache_keys_values_length_mismatch():
    cache = QuantizedKVCache(mse_config(64))
    with pytest.raises(LengthMismatchError, match=r"keys has 3 rows but values has 5"):
        cache.append(random_unit_vectors(3, 64, 1), random_unit_vectors(5, 64, 2))
    assert cache.num_tokens == 0


def test_append_is_transactional_on_value_failure():
    # The reference rejects a non-unit value; here any finite vector is valid, so NaN fails.
    cache = QuantizedKVCache(mse_config(8))
    keys = random_unit_vectors(2, 8, 1)
    values = random_unit_vectors(2, 8, 2)
    values[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"values contains NaN or infinity"):
        cache.append(keys, values)
    assert cache.num_tokens == 0
    assert cache.attention_scores(unit_query(8, 3)).shape == (0,)

    # And on a non-empty cache: same num_tokens, same scores, same stats.
    cache.append(random_unit_vectors(3, 8, 4), random_unit_vectors(3, 8, 5))
    query = unit_query(8, 3)
    before = snapshot(cache, query)
    with pytest.raises(NonFiniteError, match=r"values contains NaN or infinity"):
        cache.append(keys, values)
    assert_same_snapshot(before, snapshot(cache, query))


def test_multi_head_head_count_mismatch():
    cache = MultiHeadKVCache(MultiHeadConfig(2, mse_config(32)))
    with pytest.raises(LengthMismatchError, match=r"keys has 3 heads; expected 2"):
        cache.append_all(head_blocks(3, 2, 32, 0), head_blocks(2, 2, 32, 10))
    assert cache.num_tokens == 0


def test_multi_head_requires_matching_token_counts():
    # Per-head blocks as a list (the reference's Vec<Vec<Vec<f64>>>): head 1 has 3 tokens.
    cache = MultiHeadKVCache(MultiHeadConfig(2, mse_config(32)))
    keys = [random_unit_vectors(2, 32, 1), random_unit_vectors(3, 32, 2)]
    values = [random_unit_vectors(2, 32, 3), random_unit_vectors(3, 32, 4)]
    with pytest.raises(LengthMismatchError, match=r"head"):
        cache.append_all(keys, values)
    assert cache.num_tokens == 0
    assert all(head.num_tokens == 0 for head in cache.heads)


def test_kv_cache_debug_trait():
    # Debug -> repr: it shows the settings that matter.
    text = repr(QuantizedKVCache(mse_config(32)))
    assert text.startswith("QuantizedKVCache(")
    for part in ("dim=32", "tokens=0", "key=mse@4b", "value=mse@4b"):
        assert part in text


def test_multi_head_debug_trait():
    text = repr(MultiHeadKVCache(MultiHeadConfig(2, mse_config(32))))
    assert text.startswith("MultiHeadKVCache(kv_heads=2, query_heads=2, head_dim=32, tokens=0")
    assert "QuantizedKVCache(dim=32" in text


def test_quant_strategy_serde():
    strategy = QuantStrategy.PROD
    assert QuantStrategy("prod") is strategy
    assert QuantStrategy.parse("PROD") is strategy
    assert QuantStrategy.parse(strategy.value) is strategy
    config = KVCacheConfig(16, key_strategy=strategy)
    assert KVCacheConfig.from_json(config.to_json()).key_strategy is strategy


def test_multi_head_head_access():
    cache = MultiHeadKVCache(MultiHeadConfig(4, mse_config(32)))
    assert isinstance(cache.head(0), QuantizedKVCache)
    assert isinstance(cache.head(3), QuantizedKVCache)
    with pytest.raises(IndexError, match=r"head 4 is out of range for 4 heads"):
        cache.head(4)
    with pytest.raises(IndexError, match=r"head -1 is out of range"):
        cache.head(-1)
    assert cache.head(np.int64(2)) is cache.heads[2]
    with pytest.raises(InvalidParameterError, match=r"head index must be an integer"):
        cache.head(1.0)


def test_sliding_window_values_are_newest():
    dim = 32
    cache = QuantizedKVCache(mse_config(dim, key_bits=4, value_bits=4, max_tokens=2))
    keys, values = random_unit_vectors(3, dim, 1), random_unit_vectors(3, dim, 2)
    for i in range(3):
        cache.push_token(keys[i], values[i])
    assert cache.num_tokens == 2
    fresh = QuantizedKVCache(mse_config(dim, key_bits=4, value_bits=4))
    fresh.append(keys[1:3], values[1:3])
    query = unit_query(dim, 99)
    scores, fresh_scores = cache.attention_scores(query), fresh.attention_scores(query)
    assert scores.shape == fresh_scores.shape
    np.testing.assert_allclose(scores, fresh_scores, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cache.reconstruct_values(), fresh.reconstruct_values(), rtol=0, atol=1e-10)


# =====================================================================================
# Beyond the reference.
# =====================================================================================
# Layouts exercising every token region; "outliers" uses explicit channels so that
# fresh caches choose the same ones.
LAYOUTS = {
    "plain": {},
    "sinks": {"sink_tokens": 3},
    "recent": {"residual_tokens": 4},
    "outliers": {"outlier_channels": (1, 7, 12)},
    "all": {"sink_tokens": 2, "residual_tokens": 3, "max_tokens": 11, "outlier_channels": (0, 5)},
}
STRATEGIES = ["mse", "prod"]


def filled_cache(strategy, layout, *, dim=16, n=14, seed=0):
    cache = QuantizedKVCache(KVCacheConfig(dim, key_strategy=strategy, **LAYOUTS[layout]))
    rng = np.random.default_rng(seed)
    # Non-unit keys and values: the cache accepts any finite vector.
    cache.append(rng.standard_normal((n, dim)) * 1.5, rng.standard_normal((n, dim)))
    return cache


# -- batched queries ---------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_queries_match_row_by_row(strategy, layout):
    cache = filled_cache(strategy, layout)
    queries = np.random.default_rng(1).standard_normal((5, 16))
    scores = cache.attention_scores(queries)
    outputs = cache.attention_output(queries)
    weights = cache.attention_weights(queries)
    assert scores.shape == weights.shape == (5, cache.num_tokens)
    assert outputs.shape == (5, 16)
    for i, query in enumerate(queries):
        np.testing.assert_allclose(scores[i], cache.attention_scores(query, n_threads=1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(outputs[i], cache.attention_output(query, n_threads=1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(weights[i], cache.attention_weights(query, n_threads=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_queries_give_float32_results(strategy):
    cache = filled_cache(strategy, "all")
    queries64 = np.random.default_rng(2).standard_normal((3, 16))
    queries32 = queries64.astype(np.float32)
    for query32, query64 in ((queries32, queries64), (queries32[0], queries64[0])):
        scores = cache.attention_scores(query32)
        output = cache.attention_output(query32)
        assert scores.dtype == np.float32 and output.dtype == np.float32
        assert output.shape == query32.shape
        np.testing.assert_allclose(scores, cache.attention_scores(query64), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(output, cache.attention_output(query64), rtol=1e-4, atol=1e-4)
        assert cache.attention_scores(query64).dtype == np.float64
        assert cache.attention_output(query64).dtype == np.float64


def test_zero_queries_give_empty_results():
    cache = filled_cache("mse", "all")
    assert cache.attention_scores(np.empty((0, 16))).shape == (0, cache.num_tokens)
    assert cache.attention_output(np.empty((0, 16))).shape == (0, 16)


# -- attention output equals its definition ----------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_output_is_softmax_of_scores_times_values(strategy, layout, scale):
    cache = filled_cache(strategy, layout)
    queries = np.random.default_rng(3).standard_normal((4, 16))
    factor = 1.0 / math.sqrt(16) if scale is None else scale
    expected_weights = softmax(cache.attention_scores(queries) * factor)
    expected = expected_weights @ cache.reconstruct_values()
    np.testing.assert_allclose(cache.attention_output(queries, scale), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.attention_output(queries[0], scale), expected[0], rtol=0, atol=1e-12)
    weights = cache.attention_weights(queries, scale)
    np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(weights >= 0)


def test_default_scale_is_inverse_sqrt_dim():
    cache = filled_cache("mse", "plain")
    query = np.random.default_rng(4).standard_normal(16)
    np.testing.assert_array_equal(cache.attention_output(query), cache.attention_output(query, 0.25))
    np.testing.assert_array_equal(cache.attention_weights(query), cache.attention_weights(query, 0.25))


@pytest.mark.parametrize("scale, error", [(math.nan, NonFiniteError), (math.inf, NonFiniteError),
                                          ("0.5", InvalidParameterError), (True, InvalidParameterError)])
def test_bad_scale_is_refused(scale, error):
    cache = filled_cache("mse", "plain")
    with pytest.raises(error, match=r"scale must be"):
        cache.attention_output(np.ones(16), scale)
    with pytest.raises(error, match=r"scale must be"):
        cache.attention_weights(np.ones(16), scale)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_cache_results(strategy):
    cache = QuantizedKVCache(KVCacheConfig(16, key_strategy=strategy, sink_tokens=2, residual_tokens=2))
    query, queries = np.ones(16), np.ones((3, 16))
    assert cache.attention_scores(query).shape == (0,)
    assert cache.attention_scores(queries).shape == (3, 0)
    assert cache.attention_weights(query).shape == (0,)
    assert cache.attention_weights(queries).shape == (3, 0)
    np.testing.assert_array_equal(cache.attention_output(query), np.zeros(16))
    np.testing.assert_array_equal(cache.attention_output(queries), np.zeros((3, 16)))
    assert cache.reconstruct_keys().shape == cache.reconstruct_values().shape == (0, 16)
    stats = cache.stats()
    assert (stats.num_tokens, stats.total_bytes, stats.compression_ratio) == (0, 0, 0.0)


# -- sinks -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sink_tokens_stay_exact_and_are_never_evicted(strategy):
    dim, sinks = 16, 4
    cache = QuantizedKVCache(KVCacheConfig(dim, key_strategy=strategy, sink_tokens=sinks, max_tokens=10))
    keys = random_unit_vectors(30, dim, 1) * 3.0
    values = random_unit_vectors(30, dim, 2)
    for start in range(0, 30, 7):  # blocks of 7 that straddle the sink boundary
        cache.append(keys[start:start + 7], values[start:start + 7])
        np.testing.assert_array_equal(
            cache.reconstruct_keys()[:sinks], keys[:sinks].astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(
            cache.reconstruct_values()[:sinks], values[:sinks].astype(np.float32).astype(np.float64))
    assert cache.num_tokens == 10
    assert cache.stats().full_precision_tokens == sinks
    assert cache.stats().quantized_tokens == 6
    np.testing.assert_array_equal(cache.reconstruct_keys(dtype=np.float32)[:sinks], keys[:sinks].astype(np.float32))


@pytest.mark.parametrize("residual", [0, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinks_after_eviction_equal_fresh_cache_of_sinks_and_newest(strategy, residual):
    dim, sinks, max_tokens, n = 16, 3, 8, 25
    config = KVCacheConfig(dim, key_strategy=strategy, sink_tokens=sinks, residual_tokens=residual,
                           max_tokens=max_tokens)
    # float32-exact inputs: see test_recent_window_quantizes_streamed_and_bulk_tokens_alike.
    keys = float32_exact(random_unit_vectors(n, dim, 1) * 2.0)
    values = float32_exact(random_unit_vectors(n, dim, 2))
    cache = QuantizedKVCache(config)
    for key, value in zip(keys, values):
        cache.push_token(key, value, n_threads=1)
    kept = rows((0, sinks), (n - (max_tokens - sinks), n))
    fresh = QuantizedKVCache(dataclasses.replace(config, max_tokens=0))
    fresh.append(keys[kept], values[kept])
    query = np.random.default_rng(5).standard_normal(dim)
    assert cache.num_tokens == fresh.num_tokens == max_tokens
    np.testing.assert_allclose(cache.attention_scores(query), fresh.attention_scores(query), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cache.reconstruct_keys(), fresh.reconstruct_keys(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cache.reconstruct_values(), fresh.reconstruct_values(), rtol=0, atol=1e-10)


# -- recent window -------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recent_window_is_exact_and_older_tokens_are_quantized(strategy):
    dim, residual, n = 16, 5, 12
    cache = QuantizedKVCache(KVCacheConfig(dim, key_strategy=strategy, residual_tokens=residual))
    keys = float32_exact(random_unit_vectors(n, dim, 1) * 2.0)
    values = float32_exact(random_unit_vectors(n, dim, 2))
    cache.append(keys, values)
    np.testing.assert_array_equal(cache.reconstruct_keys()[-residual:], keys[-residual:])
    np.testing.assert_array_equal(cache.reconstruct_values()[-residual:], values[-residual:])
    older = slice(0, n - residual)
    kq, vq = cache.key_quantizer, cache.value_quantizer
    np.testing.assert_allclose(cache.reconstruct_keys()[older], kq.dequantize(kq.quantize(keys[older])),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.reconstruct_values()[older], vq.dequantize(vq.quantize(values[older])),
                               rtol=0, atol=1e-12)
    assert not np.allclose(cache.reconstruct_keys()[older], keys[older], atol=1e-3)
    stats = cache.stats()
    assert (stats.quantized_tokens, stats.full_precision_tokens) == (n - residual, residual)
    query = np.random.default_rng(6).standard_normal(dim)
    np.testing.assert_allclose(cache.attention_scores(query)[-residual:], keys[-residual:] @ query,
                               rtol=0, atol=1e-12)


STREAM_CASES = [
    # (sink_tokens, residual_tokens, max_tokens)
    (0, 0, 0), (0, 4, 0), (2, 0, 0), (2, 4, 0),
    (0, 0, 5), (2, 0, 5), (0, 4, 5), (2, 4, 9), (2, 3, 6), (4, 2, 5),
    (0, 10, 5), (3, 20, 4),          # residual_tokens > max_tokens
    (0, 1, 1), (1, 1, 2), (1, 0, 2), (0, 0, 1), (5, 0, 6),  # tiny windows
    (30, 2, 0), (0, 30, 0),          # regions longer than the stream
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sinks, residual, max_tokens", STREAM_CASES)
def test_token_by_token_equals_bulk_append(sinks, residual, max_tokens, strategy):
    dim, n = 16, 23
    config = KVCacheConfig(dim, key_strategy=strategy, sink_tokens=sinks, residual_tokens=residual,
                           max_tokens=max_tokens)
    rng = np.random.default_rng(7)
    keys = float32_exact(rng.standard_normal((n, dim)) * rng.uniform(0.5, 4.0, (n, 1)))
    values = float32_exact(rng.standard_normal((n, dim)))
    streamed, bulk, chunked = (QuantizedKVCache(config) for _ in range(3))
    for key, value in zip(keys, values):
        streamed.push_token(key, value, n_threads=1)
    bulk.append(keys, values)
    for start in range(0, n, 3):
        chunked.append(keys[start:start + 3], values[start:start + 3], n_threads=1)

    n_sinks, n_quantized, n_recent = expected_regions(n, sinks, residual, max_tokens)
    query = rng.standard_normal((2, dim))
    for cache in (streamed, chunked):
        assert cache.num_tokens == bulk.num_tokens == n_sinks + n_quantized + n_recent
        assert cache.stats() == bulk.stats()
        np.testing.assert_allclose(cache.attention_scores(query), bulk.attention_scores(query), rtol=0, atol=1e-10)
        np.testing.assert_allclose(cache.attention_output(query), bulk.attention_output(query), rtol=0, atol=1e-10)
        np.testing.assert_allclose(cache.reconstruct_keys(), bulk.reconstruct_keys(), rtol=0, atol=1e-10)
    stats = bulk.stats()
    assert stats.quantized_tokens == n_quantized
    assert stats.full_precision_tokens == n_sinks + n_recent
    # The cache holds the sinks and the newest tokens, in order: exact rows where
    # they are full precision, the key quantizer's reconstruction elsewhere.
    held = n_sinks + n_quantized + n_recent
    kept = rows((0, n_sinks), (n - n_quantized - n_recent, n))
    exact = rows((0, n_sinks), (held - n_recent, held))
    quantized = rows((n_sinks, n_sinks + n_quantized))
    recon = bulk.reconstruct_keys()
    np.testing.assert_array_equal(recon[exact], keys[kept][exact])
    kq = bulk.key_quantizer
    np.testing.assert_allclose(recon[quantized], kq.dequantize(kq.quantize(keys[kept][quantized])),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recent_window_quantizes_streamed_and_bulk_tokens_alike(strategy):
    """Tokens that age out of the float32 recent window are quantized from their float32
    copy; a bulk append must quantize the same float32 rows, or pushing tokens one at a
    time and appending them at once give different caches (float64 inputs)."""
    dim, n = 32, 64
    config = KVCacheConfig(dim, key_strategy=strategy, residual_tokens=4)
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((n, dim)) * rng.uniform(0.5, 20.0, (n, 1))
    values = rng.standard_normal((n, dim))
    streamed, bulk = QuantizedKVCache(config), QuantizedKVCache(config)
    for key, value in zip(keys, values):
        streamed.push_token(key, value, n_threads=1)
    bulk.append(keys, values)
    query = rng.standard_normal(dim)
    np.testing.assert_allclose(streamed.attention_scores(query), bulk.attention_scores(query), rtol=0, atol=1e-10)
    np.testing.assert_allclose(streamed.reconstruct_values(), bulk.reconstruct_values(), rtol=0, atol=1e-10)


# -- outlier channels --------------------------------------------------------------------
def keys_with_large_channels(n, dim, channels, seed, factor=10.0):
    keys = np.random.default_rng(seed).standard_normal((n, dim))
    keys[:, list(channels)] *= factor
    return keys


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_outlier_count_picks_largest_channels_of_first_block(strategy):
    dim = 32
    cache = QuantizedKVCache(KVCacheConfig(dim, key_strategy=strategy, outlier_channels=3))
    assert cache.outlier_channels is None
    assert cache.outlier_key_quantizer.dim == 3 and cache.key_quantizer.dim == dim - 3
    values = np.zeros((20, dim))
    cache.append(keys_with_large_channels(20, dim, (29, 3, 17), seed=1), values)
    np.testing.assert_array_equal(cache.outlier_channels, [3, 17, 29])
    # Later blocks do not change the choice.
    cache.append(keys_with_large_channels(20, dim, (0, 1, 2), seed=2), values)
    np.testing.assert_array_equal(cache.outlier_channels, [3, 17, 29])
    assert not cache.outlier_channels.flags.writeable
    # clear() forgets the automatic choice; the next first block decides again.
    cache.clear()
    assert cache.outlier_channels is None
    cache.append(keys_with_large_channels(20, dim, (5, 30, 8), seed=3), values)
    np.testing.assert_array_equal(cache.outlier_channels, [5, 8, 30])


def test_outlier_count_uses_mean_magnitude_not_peak():
    dim = 16
    keys = np.ones((10, dim))
    keys[0, 4] = 50.0          # one huge entry: mean |key| of channel 4 is 5.9
    keys[:, 9] = -7.0          # consistently large (negative): mean 7
    keys[:, 11] = 6.5
    cache = QuantizedKVCache(KVCacheConfig(dim, outlier_channels=2))
    cache.append(keys, np.zeros((10, dim)))
    np.testing.assert_array_equal(cache.outlier_channels, [9, 11])


def test_explicit_outlier_channels_survive_clear():
    dim = 32
    cache = QuantizedKVCache(KVCacheConfig(dim, outlier_channels=(9, 1, 5)))
    assert cache.config.outlier_channels == (1, 5, 9)
    np.testing.assert_array_equal(cache.outlier_channels, [1, 5, 9])
    # Explicit channels are used even when others are larger.
    cache.append(keys_with_large_channels(8, dim, (20, 21, 22), seed=1), np.zeros((8, dim)))
    np.testing.assert_array_equal(cache.outlier_channels, [1, 5, 9])
    cache.clear()
    np.testing.assert_array_equal(cache.outlier_channels, [1, 5, 9])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_outlier_reconstruction_uses_both_quantizers(strategy):
    dim, channels = 32, (2, 11, 23, 30)
    cache = QuantizedKVCache(KVCacheConfig(dim, key_strategy=strategy, key_bits=3, outlier_bits=6,
                                           outlier_channels=channels))
    keys = keys_with_large_channels(12, dim, channels, seed=4)
    cache.append(keys, np.zeros((12, dim)))
    main, outlier = cache.key_quantizer, cache.outlier_key_quantizer
    assert (main.bits, outlier.bits) == (3, 6)
    assert main.seed == cache.config.seed and outlier.seed == cache.config.seed + 1
    assert cache.value_quantizer.seed == cache.config.seed + 2
    rest = np.setdiff1d(np.arange(dim), channels)
    recon = cache.reconstruct_keys()
    np.testing.assert_allclose(recon[:, list(channels)],
                               outlier.dequantize(outlier.quantize(keys[:, list(channels)])), rtol=0, atol=1e-12)
    np.testing.assert_allclose(recon[:, rest], main.dequantize(main.quantize(keys[:, rest])), rtol=0, atol=1e-12)
    main_codes, outlier_codes, _ = cache.quantized_codes()
    assert main_codes == main.quantize(keys[:, rest])
    assert outlier_codes == outlier.quantize(keys[:, list(channels)])


@pytest.mark.parametrize(
    "dim, n_outliers, key_bits, outlier_bits",
    [(64, 0, 4, None), (64, 8, 4, 5), (64, 16, 3, 6), (32, 8, 2, 8), (128, 8, 1, 3)],
)
def test_key_bits_per_channel_formula_mse(dim, n_outliers, key_bits, outlier_bits):
    cache = QuantizedKVCache(KVCacheConfig(dim, key_bits=key_bits, value_bits=3, outlier_channels=n_outliers,
                                           outlier_bits=outlier_bits))
    cache.append(keys_with_large_channels(10, dim, range(n_outliers), seed=5), np.ones((10, dim)))
    ob = cache.config.outlier_bits
    norm_arrays = 2 if n_outliers else 1
    expected = ((dim - n_outliers) * key_bits + n_outliers * ob) / dim + 32 * norm_arrays / dim
    stats = cache.stats()
    assert stats.key_bits_per_channel == pytest.approx(expected, rel=1e-12)
    assert stats.value_bits_per_channel == pytest.approx(3 + 32 / dim, rel=1e-12)


@pytest.mark.parametrize("n_outliers", [0, 8])
def test_key_bits_per_channel_formula_prod(n_outliers):
    # Prod stores two float32 norms per quantizer (the vector's and the residual's).
    dim, key_bits, outlier_bits = 64, 3, 5
    cache = QuantizedKVCache(KVCacheConfig(dim, key_bits=key_bits, key_strategy="prod",
                                           outlier_channels=n_outliers, outlier_bits=outlier_bits))
    cache.append(keys_with_large_channels(10, dim, range(n_outliers), seed=5), np.ones((10, dim)))
    norm_arrays = 4 if n_outliers else 2
    expected = ((dim - n_outliers) * key_bits + n_outliers * outlier_bits) / dim + 32 * norm_arrays / dim
    assert cache.stats().key_bits_per_channel == pytest.approx(expected, rel=1e-12)


def kl_rows(p, q):
    return np.sum(p * np.log(p / q), axis=1)


def test_outliers_reduce_attention_error():
    """Keys whose 8 outlier channels are 10x larger: splitting those channels off
    (4 bits + 8 channels at 6 bits, 5.25 bits/channel stored) beats plain 5-bit keys
    (5.5 bits/channel stored).

    Margin: for small logit errors ``delta``, ``KL(p || p_hat) ~ Var_p(delta) / 2``,
    and for isotropic queries ``E delta^2`` is proportional to the key MSE, which is
    ``D(dim, b) E||k||^2`` without outliers and ``D(56, 4) E||k_main||^2 +
    D(8, 6) E||k_out||^2`` with them (``D`` = the codebook's distortion of a unit
    vector). That predicts a KL ratio of about 0.42; the test allows 1.6x that (the
    KL mean over 64 queries x 256 tokens has a relative sampling error of roughly
    10-20%), which is still well below 1.
    """
    dim, n, n_queries, n_out = 64, 256, 64, 8
    rng = np.random.default_rng(7)
    channels = np.sort(rng.choice(dim, n_out, replace=False))
    keys = rng.standard_normal((n, dim))
    keys[:, channels] *= 10.0
    values = rng.standard_normal((n, dim))
    queries = rng.standard_normal((n_queries, dim))
    scale = 1.0 / math.sqrt(dim)
    exact = softmax(queries @ keys.T * scale)

    def measure(config):
        cache = QuantizedKVCache(config)
        cache.append(keys, values)
        assert cache.outlier_channels is None or np.array_equal(cache.outlier_channels, channels)
        return np.mean(kl_rows(exact, cache.attention_weights(queries, scale))), cache.stats()

    kl_without, stats_without = measure(KVCacheConfig(dim, key_bits=5))
    kl_with, stats_with = measure(KVCacheConfig(dim, key_bits=4, outlier_channels=n_out, outlier_bits=6))
    assert stats_with.key_bits_per_channel <= stats_without.key_bits_per_channel

    main_sq, out_sq = (dim - n_out) * 1.0, n_out * 100.0
    predicted = ((lloyd_max_codebook(dim - n_out, 4).distortion * main_sq
                  + lloyd_max_codebook(n_out, 6).distortion * out_sq)
                 / (lloyd_max_codebook(dim, 5).distortion * (main_sq + out_sq)))
    assert predicted < 0.6
    assert kl_with < 1.6 * predicted * kl_without, (kl_with, kl_without, predicted)


# -- grouped-query attention ---------------------------------------------------------------
@pytest.fixture
def gqa_cache():
    cache = MultiHeadKVCache(MultiHeadConfig(2, KVCacheConfig(16, sink_tokens=1, residual_tokens=2),
                                             num_query_heads=8))
    cache.append_all(head_blocks(2, 10, 16, 40), head_blocks(2, 10, 16, 50))
    return cache


def test_gqa_scores_and_outputs_match_per_head_calls(gqa_cache):
    cache, g = gqa_cache, 4
    assert (cache.num_heads, cache.num_query_heads, cache.config.group_size) == (2, 8, g)
    rng = np.random.default_rng(9)
    queries = rng.standard_normal((8, 16))
    scores, outputs = cache.attention_scores_all(queries), cache.attention_output_all(queries)
    assert scores.shape == (8, 10) and outputs.shape == (8, 16)
    for h in range(2):
        block = queries[h * g:(h + 1) * g]
        np.testing.assert_array_equal(scores[h * g:(h + 1) * g], cache.head(h).attention_scores(block))
        np.testing.assert_array_equal(outputs[h * g:(h + 1) * g], cache.head(h).attention_output(block))
    np.testing.assert_array_equal(cache.attention_output_all(queries, 0.7)[5],
                                  cache.head(1).attention_output(queries[4:8], 0.7)[1])

    m = 3
    batched = rng.standard_normal((8, m, 16))
    scores, outputs = cache.attention_scores_all(batched), cache.attention_output_all(batched)
    assert scores.shape == (8, m, 10) and outputs.shape == (8, m, 16)
    for h in range(2):
        block = batched[h * g:(h + 1) * g].reshape(g * m, 16)
        np.testing.assert_array_equal(scores[h * g:(h + 1) * g].reshape(g * m, 10),
                                      cache.head(h).attention_scores(block))
        np.testing.assert_array_equal(outputs[h * g:(h + 1) * g].reshape(g * m, 16),
                                      cache.head(h).attention_output(block))
    for q in range(8):
        np.testing.assert_allclose(scores[q], cache.head(q // g).attention_scores(batched[q]), rtol=0, atol=1e-12)


def test_gqa_bad_query_shapes(gqa_cache):
    for shape in [(2, 16), (8,), (8, 15), (8, 2, 15), (8, 1, 2, 16)]:
        with pytest.raises(ShapeError, match=r"queries has shape"):
            gqa_cache.attention_scores_all(np.zeros(shape))
    with pytest.raises(NonFiniteError):
        gqa_cache.attention_output_all(np.full((8, 16), np.nan))


def test_gqa_num_query_heads_must_be_multiple():
    with pytest.raises(InvalidParameterError, match=r"num_query_heads \(7\) must be a multiple of num_heads \(2\)"):
        MultiHeadConfig(2, KVCacheConfig(16), num_query_heads=7)


def test_concat_outputs(gqa_cache):
    outputs = np.arange(8 * 16, dtype=float).reshape(8, 16)
    np.testing.assert_array_equal(gqa_cache.concat_outputs(outputs), np.concatenate(list(outputs)))
    batched = np.arange(8 * 3 * 16, dtype=float).reshape(8, 3, 16)
    concat = gqa_cache.concat_outputs(batched)
    assert concat.shape == (3, 8 * 16)
    for i in range(3):
        np.testing.assert_array_equal(concat[i], np.concatenate(list(batched[:, i])))
    for shape in [(2, 16), (8, 15), (8,), (8, 3, 15)]:
        with pytest.raises(LengthMismatchError, match=r"outputs has shape"):
            gqa_cache.concat_outputs(np.zeros(shape))


def test_push_token_all_equals_append_all():
    config = MultiHeadConfig(3, KVCacheConfig(16, residual_tokens=2, max_tokens=6))
    pushed, appended = MultiHeadKVCache(config), MultiHeadKVCache(config)
    keys, values = head_blocks(3, 9, 16, 0), head_blocks(3, 9, 16, 10)
    for t in range(9):
        pushed.push_token_all(keys[:, t], values[:, t])
        appended.append_all(keys[:, t:t + 1], values[:, t:t + 1])
    queries = np.random.default_rng(10).standard_normal((3, 16))
    assert pushed.num_tokens == appended.num_tokens == 6
    np.testing.assert_array_equal(pushed.attention_scores_all(queries), appended.attention_scores_all(queries))
    np.testing.assert_array_equal(pushed.reconstruct_keys_all(), appended.reconstruct_keys_all())
    np.testing.assert_array_equal(pushed.reconstruct_values_all(), appended.reconstruct_values_all())
    assert pushed.reconstruct_keys_all().shape == (3, 6, 16)
    with pytest.raises(ShapeError, match=r"keys and values must be \(3, 16\)"):
        pushed.push_token_all(keys[:, :2], values[:, :2])


def test_heads_have_distinct_seeds():
    base = KVCacheConfig(16, seed=7)
    cache = MultiHeadKVCache(MultiHeadConfig(3, base))
    same = np.broadcast_to(random_unit_vectors(5, 16, 1), (3, 5, 16))
    cache.append_all(same, same)
    codes = [cache.head(h).quantized_codes() for h in range(3)]
    for h in range(3):
        assert cache.head(h).config == dataclasses.replace(base, seed=7 + 1000 * h)
        assert cache.config.head_seed(h) == 7 + 1000 * h
        assert cache.head(h).key_quantizer.seed == 7 + 1000 * h
        # Each head is exactly a standalone cache with its own seed.
        alone = QuantizedKVCache(dataclasses.replace(base, seed=7 + 1000 * h))
        alone.append(same[h], same[h])
        assert alone.quantized_codes()[0] == codes[h][0]
        assert alone.quantized_codes()[2] == codes[h][2]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not np.array_equal(codes[a][0].indices, codes[b][0].indices)
        assert not np.array_equal(codes[a][2].indices, codes[b][2].indices)


# -- transactionality --------------------------------------------------------------------
TRANSACTION_CONFIG = KVCacheConfig(16, sink_tokens=2, residual_tokens=3, max_tokens=9, outlier_channels=2)


def test_append_all_is_transactional_when_last_head_fails():
    cache = MultiHeadKVCache(MultiHeadConfig(3, TRANSACTION_CONFIG))
    cache.append_all(head_blocks(3, 5, 16, 0), head_blocks(3, 5, 16, 10))
    query = np.random.default_rng(11).standard_normal(16)
    before = [snapshot(head, query) for head in cache.heads]
    keys, values = head_blocks(3, 4, 16, 20), head_blocks(3, 4, 16, 30)
    values[2, 3, 5] = np.nan
    with pytest.raises(NonFiniteError, match=r"values contains NaN or infinity"):
        cache.append_all(keys, values)
    keys[2, 0, 0] = 1e39  # finite float64, but its norm does not fit a float32
    values[2, 3, 5] = 0.0
    with pytest.raises(NonFiniteError, match=r"float32"):
        cache.append_all(keys, values)
    for head, old in zip(cache.heads, before):
        assert_same_snapshot(old, snapshot(head, query))
    assert cache.num_tokens == 5


def test_failed_first_append_chooses_no_outlier_channels():
    cache = QuantizedKVCache(KVCacheConfig(16, outlier_channels=2))
    keys = keys_with_large_channels(4, 16, (3, 4), seed=1)
    with pytest.raises(NonFiniteError):
        cache.append(keys, np.full((4, 16), np.inf))
    assert cache.outlier_channels is None
    cache.append(keys_with_large_channels(4, 16, (8, 9), seed=1), np.zeros((4, 16)))
    np.testing.assert_array_equal(cache.outlier_channels, [8, 9])


@pytest.mark.parametrize("layout", ["plain", "prod", "sinks", "recent"])
def test_key_norm_above_float32_max_is_refused(layout):
    """1e39 is a finite float64 that overflows float32: the key cannot be stored in any
    region (its norm as float32, or the row itself in the float32 sink/recent regions)."""
    extra = {"plain": {}, "prod": {"key_strategy": "prod"}, "sinks": {"sink_tokens": 8},
             "recent": {"residual_tokens": 8}}[layout]
    cache = QuantizedKVCache(KVCacheConfig(16, **extra))
    cache.append(random_unit_vectors(3, 16, 1), random_unit_vectors(3, 16, 2))
    query = unit_query(16, 3)
    before = snapshot(cache, query)
    keys = random_unit_vectors(2, 16, 4)
    keys[1, 3] = 1e39
    with pytest.raises(NonFiniteError, match=r"float32"):
        cache.append(keys, random_unit_vectors(2, 16, 5))
    with pytest.raises(NonFiniteError, match=r"float32"):
        cache.push_token(keys[1], random_unit_vectors(1, 16, 5)[0])
    assert_same_snapshot(before, snapshot(cache, query))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_recent_token_with_overflowing_norm_cannot_block_the_cache(dtype):
    """Components of 3e38 fit float32 but the norm does not: such a key cannot ever be
    quantized, so it must be refused when it arrives. Accepted into the recent window,
    it would make every later append fail once it has to age out."""
    cache = QuantizedKVCache(KVCacheConfig(8, residual_tokens=1))
    with pytest.raises(NonFiniteError, match=r"float32"):
        cache.push_token(np.full(8, 3e38, dtype=dtype), np.ones(8))
    assert cache.num_tokens == 0
    cache.push_token(np.ones(8), np.ones(8))
    cache.push_token(np.ones(8), np.ones(8))
    assert cache.num_tokens == 2


BAD_APPENDS = {
    "count mismatch": (lambda k, v: (k, v[:3]), LengthMismatchError, r"keys has 4 rows but values has 3"),
    "key dim": (lambda k, v: (k[:, :15], v), ShapeError, r"keys has shape \(4, 15\); expected \(n, 16\)"),
    "value dim": (lambda k, v: (k, np.zeros((4, 17))), ShapeError, r"values has shape \(4, 17\)"),
    "1-d keys": (lambda k, v: (k[0], v), ShapeError, r"keys and values must be \(n, 16\) arrays"),
    "3-d values": (lambda k, v: (k, v[None]), ShapeError, r"keys and values must be \(n, 16\) arrays"),
    "string dtype": (lambda k, v: (k.astype(str), v), DTypeError, r"keys has dtype <U"),
    "complex dtype": (lambda k, v: (k, v + 1j), DTypeError, r"values has dtype complex128"),
    "object dtype": (lambda k, v: (k.astype(object), v), DTypeError, r"keys has dtype object"),
    "nan key": (lambda k, v: (np.where(np.arange(16) == 5, np.nan, k), v), NonFiniteError, r"keys contains NaN"),
    "inf value": (lambda k, v: (k, np.where(np.arange(16) == 0, -np.inf, v)), NonFiniteError,
                  r"values contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_APPENDS))
def test_invalid_append_raises_typed_error_and_leaves_cache_unchanged(case):
    make, error, message = BAD_APPENDS[case]
    cache = QuantizedKVCache(TRANSACTION_CONFIG)
    cache.append(random_unit_vectors(7, 16, 1), random_unit_vectors(7, 16, 2))
    query = unit_query(16, 3)
    before = snapshot(cache, query)
    keys, values = make(random_unit_vectors(4, 16, 4), random_unit_vectors(4, 16, 5))
    with pytest.raises(error, match=message) as info:
        cache.append(keys, values)
    assert isinstance(info.value, TurboQuantError)
    assert_same_snapshot(before, snapshot(cache, query))
    if case not in ("count mismatch", "1-d keys", "3-d values"):
        with pytest.raises(error):
            cache.push_token(keys[0], values[0])
        assert_same_snapshot(before, snapshot(cache, query))


def test_invalid_push_token_shapes():
    cache = QuantizedKVCache(KVCacheConfig(16))
    with pytest.raises(ShapeError, match=r"key and value must be \(16,\) vectors"):
        cache.push_token(np.zeros((1, 16)), np.zeros(16))
    with pytest.raises(ShapeError, match=r"key and value must be \(16,\) vectors"):
        cache.push_token(np.zeros(16), np.zeros((1, 16)))
    assert cache.num_tokens == 0


def test_invalid_append_all_leaves_heads_unchanged():
    cache = MultiHeadKVCache(MultiHeadConfig(2, TRANSACTION_CONFIG))
    cache.append_all(head_blocks(2, 6, 16, 0), head_blocks(2, 6, 16, 10))
    query = unit_query(16, 3)
    before = [snapshot(head, query) for head in cache.heads]
    good = head_blocks(2, 3, 16, 20)
    cases = [
        ((good, good[:, :2]), LengthMismatchError, r"keys have 3 tokens but values have 2"),
        ((good[:1], good[:1]), LengthMismatchError, r"keys has 1 heads; expected 2"),
        ((good, good[:, :, :15]), ShapeError, r"values has shape \(3, 15\)"),
        ((good[0], good[0]), ShapeError, r"keys has shape \(3, 16\); expected \(2, n, 16\)"),
        ((good.astype(complex), good), DTypeError, r"keys has dtype complex128"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            cache.append_all(*args)
    with pytest.raises(LengthMismatchError):
        cache.push_token_all(good[:, 0], good[:1, 0])
    for head, old in zip(cache.heads, before):
        assert_same_snapshot(old, snapshot(head, query))


def test_bad_reconstruct_dtype_and_thread_count():
    cache = filled_cache("mse", "all")
    with pytest.raises(InvalidParameterError, match=r"dtype must be float32 or float64, got float16"):
        cache.reconstruct_keys(dtype=np.float16)
    with pytest.raises(InvalidParameterError, match=r"n_threads must not be 0"):
        cache.attention_scores(np.ones(16), n_threads=0)
    with pytest.raises(InvalidParameterError, match=r"n_threads must not be 0"):
        cache.append(np.ones((1, 16)), np.ones((1, 16)), n_threads=0)
    with pytest.raises(InvalidParameterError, match=r"config must be a KVCacheConfig"):
        QuantizedKVCache({"dim": 16})
    with pytest.raises(InvalidParameterError, match=r"config must be a MultiHeadConfig"):
        MultiHeadKVCache(KVCacheConfig(16))


# -- byte-exact statistics -------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stats_are_byte_exact(strategy, layout):
    cache = filled_cache(strategy, layout, dim=16, n=14)
    main, outlier, values = cache.quantized_codes()
    stats = cache.stats()
    dim, n = 16, cache.num_tokens
    full = stats.full_precision_tokens
    assert stats.quantized_tokens == len(main) == len(values)
    assert stats.quantized_tokens + full == n
    outlier_bytes = 0 if outlier is None else outlier.nbytes
    assert stats.key_bytes == main.nbytes + outlier_bytes + 4 * dim * full
    assert stats.value_bytes == values.nbytes + 4 * dim * full
    # And the same from the quantizers' per-vector sizes.
    outlier_code_bytes = 0 if outlier is None else cache.outlier_key_quantizer.code_bytes
    assert stats.key_bytes == len(main) * (cache.key_quantizer.code_bytes + outlier_code_bytes) + 4 * dim * full
    assert stats.value_bytes == len(values) * cache.value_quantizer.code_bytes + 4 * dim * full
    assert stats.total_bytes == stats.key_bytes + stats.value_bytes
    assert stats.uncompressed_bytes == n * dim * 4 * 2
    assert stats.compression_ratio == stats.uncompressed_bytes / stats.total_bytes
    assert stats.key_bits_per_channel == pytest.approx(8 * stats.key_bytes / (n * dim), rel=1e-12)
    assert (stats.dim, stats.key_bits, stats.value_bits) == (dim, 4, 4)
    assert stats.key_strategy is QuantStrategy(strategy)
    assert stats.to_dict()["key_strategy"] == strategy


def test_multi_head_stats_are_sums_of_head_stats():
    cache = MultiHeadKVCache(MultiHeadConfig(3, TRANSACTION_CONFIG))
    cache.append_all(head_blocks(3, 7, 16, 0), head_blocks(3, 7, 16, 10))
    stats = cache.stats()
    assert stats.head_stats == tuple(head.stats() for head in cache.heads)
    assert stats.total_bytes == sum(s.total_bytes for s in stats.head_stats)
    assert stats.uncompressed_bytes == sum(s.uncompressed_bytes for s in stats.head_stats) == 3 * 7 * 16 * 8
    assert stats.compression_ratio == stats.uncompressed_bytes / stats.total_bytes
    assert (stats.num_heads, stats.num_tokens, stats.head_dim) == (3, 7, 16)
    cache.clear()
    empty = cache.stats()
    assert (empty.total_bytes, empty.uncompressed_bytes, empty.compression_ratio) == (0, 0, 0.0)


# -- thread-count independence ------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    KVCacheConfig(128, sink_tokens=2, residual_tokens=3, outlier_channels=4),
    KVCacheConfig(128, key_strategy="prod", rotation="hadamard", sketch="hadamard", max_tokens=3000),
    KVCacheConfig(128, key_strategy="prod", key_bits=5, value_bits=2, outlier_channels=(1, 2, 3)),
], ids=["mse-regions", "prod-hadamard", "prod-outliers"])
def test_results_identical_for_one_and_two_threads(config, teams):
    # 4096 tokens of dim 128 and 16 queries: enough work for the encode, score
    # and weighted-sum kernels to run on several threads (checked below).
    rng = np.random.default_rng(12)
    keys, values = rng.standard_normal((4105, 128)), rng.standard_normal((4105, 128))
    queries = rng.standard_normal((16, 128))
    for name in ("quantize_pack", "hadamard_quantize_pack", "lut_inner_products", "lut_weighted_sum"):
        teams(name)
    caches = {}
    for threads in (1, 2):
        cache = caches[threads] = QuantizedKVCache(config)
        cache.append(keys[:4096], values[:4096], n_threads=threads)
        for t in range(4096, 4105):
            cache.push_token(keys[t], values[t], n_threads=threads)
    one, two = caches[1], caches[2]
    for a, b in zip(one.quantized_codes(), two.quantized_codes()):
        assert a == b
    for threads in (1, 2):
        expected = one.attention_scores(queries, n_threads=1), one.attention_output(queries, n_threads=1)
        teams.sizes.clear()
        got = two.attention_scores(queries, n_threads=threads), two.attention_output(queries, n_threads=threads)
        assert_ran_on(threads, max(teams.sizes))
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(one.attention_weights(queries, n_threads=1),
                                      two.attention_weights(queries, n_threads=threads))
        np.testing.assert_array_equal(one.reconstruct_keys(n_threads=1), two.reconstruct_keys(n_threads=threads))
        np.testing.assert_array_equal(one.reconstruct_values(n_threads=1),
                                      two.reconstruct_values(n_threads=threads))
        np.testing.assert_array_equal(one.attention_output(queries[0].astype(np.float32), n_threads=1),
                                      two.attention_output(queries[0].astype(np.float32), n_threads=threads))


def test_multi_head_results_identical_for_one_and_two_threads(gqa_cache):
    queries = np.random.default_rng(13).standard_normal((8, 3, 16))
    np.testing.assert_array_equal(gqa_cache.attention_scores_all(queries, n_threads=1),
                                  gqa_cache.attention_scores_all(queries, n_threads=2))
    np.testing.assert_array_equal(gqa_cache.attention_output_all(queries, n_threads=1),
                                  gqa_cache.attention_output_all(queries, n_threads=2))


# -- repr ---------------------------------------------------------------------------------
def test_repr_shows_settings():
    cache = QuantizedKVCache(KVCacheConfig(16, key_bits=5, value_bits=3, key_strategy="prod", max_tokens=9,
                                           sink_tokens=2, residual_tokens=3, outlier_channels=2))
    cache.append(np.ones((4, 16)), np.ones((4, 16)))
    text = repr(cache)
    for part in ("dim=16", "tokens=4", "key=prod@5b", "value=mse@3b", "max_tokens=9", "sink_tokens=2",
                 "residual_tokens=3", "outlier_channels=2@6b"):
        assert part in text
    multi = MultiHeadKVCache(MultiHeadConfig(2, KVCacheConfig(16), num_query_heads=6))
    assert repr(multi).startswith("MultiHeadKVCache(kv_heads=2, query_heads=6, head_dim=16, tokens=0, ")

