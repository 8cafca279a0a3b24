"""Editing and windowing a cache's history: ``truncate``, ``copy`` and ``start``.

``truncate(n)`` keeps the oldest ``n`` held tokens (assisted decoding rejects
drafted tokens this way), ``copy()`` gives an independent cache (beam search),
and ``start`` makes a read skip the oldest held tokens (the padding of a
left-padded batch row).
"""

import numpy as np
import pytest

from kv_model import exact_attention
from turboquant import (
    InvalidParameterError,
    KVCacheConfig,
    MultiHeadConfig,
    MultiHeadKVCache,
    QuantizedKVCache,
    QuantStrategy,
)

DIM = 32
CONFIGS = {
    "plain": KVCacheConfig(DIM),
    "sinks+recent": KVCacheConfig(DIM, key_bits=5, value_bits=3, sink_tokens=3, residual_tokens=7),
    "outliers+center": KVCacheConfig(DIM, center_keys=True, outlier_channels=2, outlier_bits=6),
    "prod": KVCacheConfig(DIM, key_strategy=QuantStrategy.PROD, key_bits=4),
    "window": KVCacheConfig(DIM, max_tokens=40, sink_tokens=2, residual_tokens=4),
}


def filled(config, n=60, seed=0, blocks=(1, 17, 5)):
    rng = np.random.default_rng(seed)
    cache = QuantizedKVCache(config)
    sizes, total = [], 0
    while total < n:
        size = min(blocks[len(sizes) % len(blocks)], n - total)
        sizes.append(size)
        total += size
    for size in sizes:
        cache.append(rng.standard_normal((size, config.dim)), rng.standard_normal((size, config.dim)))
    return cache, rng


def held(cache):
    return cache.reconstruct_keys(), cache.reconstruct_values()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("keep", [0, 1, 2, 5, 20, 39, 40])
def test_truncate_keeps_the_oldest_tokens(name, keep):
    cache, rng = filled(CONFIGS[name])
    keys, values = held(cache)
    keep = min(keep, cache.num_tokens)
    cache.truncate(keep)
    assert cache.num_tokens == len(cache) == cache.stats().num_tokens == keep
    new_keys, new_values = held(cache)
    np.testing.assert_array_equal(new_keys, keys[:keep])
    np.testing.assert_array_equal(new_values, values[:keep])


@pytest.mark.parametrize("name", CONFIGS)
def test_appends_after_truncate_leave_older_views_and_tokens_alone(name):
    cache, rng = filled(CONFIGS[name])
    before = [None if codes is None else codes.to_arrays() for codes in cache.quantized_codes()]
    snapshot = [None if codes is None else {k: v.copy() for k, v in codes.to_arrays().items()}
                for codes in cache.quantized_codes()]
    keep = cache.num_tokens - 9
    kept_keys, kept_values = (array[:keep] for array in held(cache))
    cache.truncate(keep)
    cache.append(rng.standard_normal((12, DIM)), rng.standard_normal((12, DIM)))
    # Views taken before the truncation still show what they showed.
    for arrays, copies in zip(before, snapshot):
        if arrays is not None:
            for name_ in arrays:
                np.testing.assert_array_equal(arrays[name_], copies[name_])
    keys, values = held(cache)
    assert cache.num_tokens == min(keep + 12, CONFIGS[name].max_tokens or keep + 12)
    if not CONFIGS[name].max_tokens:
        np.testing.assert_array_equal(keys[:keep], kept_keys)
        np.testing.assert_array_equal(values[:keep], kept_values)


@pytest.mark.parametrize("bad", [-1, 61, 2.0, True, "3", None])
def test_truncate_refuses_bad_counts_and_changes_nothing(bad):
    cache, _ = filled(CONFIGS["sinks+recent"])
    keys, values = held(cache)
    with pytest.raises(InvalidParameterError):
        cache.truncate(bad)
    np.testing.assert_array_equal(held(cache)[0], keys)
    np.testing.assert_array_equal(held(cache)[1], values)


def test_truncate_to_zero_is_clear():
    cache, rng = filled(CONFIGS["outliers+center"])
    cache.truncate(0)
    assert cache.num_tokens == 0 and cache.outlier_channels is None and cache.key_center is None


@pytest.mark.parametrize("name", CONFIGS)
def test_copy_is_independent(name):
    cache, rng = filled(CONFIGS[name])
    clone = cache.copy()
    query = rng.standard_normal(DIM)
    np.testing.assert_array_equal(clone.attention_output(query), cache.attention_output(query))
    keys, values = held(cache)
    clone.append(rng.standard_normal((30, DIM)), rng.standard_normal((30, DIM)))
    clone.truncate(3)
    np.testing.assert_array_equal(held(cache)[0], keys)
    np.testing.assert_array_equal(held(cache)[1], values)
    assert clone.key_quantizer is cache.key_quantizer or clone.key_quantizer._codec is cache.key_quantizer._codec


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("start", [0, 1, 3, 10, 45, 59, 60])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_start_attends_to_the_newer_tokens_only(name, start, dtype):
    cache, rng = filled(CONFIGS[name])
    start = min(start, cache.num_tokens)
    queries = rng.standard_normal((3, DIM)).astype(dtype)
    keys, values = held(cache)
    out = cache.attention_output(queries, start=start)
    assert out.shape == (3, DIM) and out.dtype == dtype
    tolerance = 2e-5 if dtype == np.float32 else 1e-9
    if start == cache.num_tokens:
        np.testing.assert_array_equal(out, 0.0)
        assert cache.attention_weights(queries, start=start).shape == (3, 0)
    else:
        expected, weights = exact_attention(queries, keys[start:], values[start:])
        np.testing.assert_allclose(out, expected, atol=tolerance, rtol=tolerance)
        np.testing.assert_allclose(cache.attention_weights(queries, start=start), weights, atol=tolerance)
    scores = cache.attention_scores(queries, start=start)
    np.testing.assert_allclose(scores, cache.attention_scores(queries)[:, start:], atol=tolerance)


@pytest.mark.parametrize("bad", [-1, 61, 1.5, "0"])
def test_start_out_of_range_is_refused(bad):
    cache, rng = filled(CONFIGS["plain"])
    with pytest.raises(InvalidParameterError):
        cache.attention_output(rng.standard_normal(DIM), start=bad)


@pytest.mark.parametrize("config", [KVCacheConfig(DIM), KVCacheConfig(DIM, key_bits=6, value_bits=5)],
                         ids=["fused", "general"])
def test_skipping_a_padded_prefix_matches_a_cache_without_it(config):
    # Tokens are quantized one by one, so the padded cache holds the same codes
    # for the real tokens and a read from ``start`` sees exactly what the
    # unpadded cache sees.
    rng = np.random.default_rng(7)
    pad, n = 13, 50
    keys, values = rng.standard_normal((n, DIM)), rng.standard_normal((n, DIM))
    padded, alone = QuantizedKVCache(config), QuantizedKVCache(config)
    padded.append(np.concatenate([np.zeros((pad, DIM)), keys]), np.concatenate([np.ones((pad, DIM)), values]))
    alone.append(keys, values)
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    np.testing.assert_allclose(padded.attention_output(queries, start=pad), alone.attention_output(queries),
                               rtol=1e-6, atol=1e-7)


def test_multi_head_start_truncate_and_copy():
    config = MultiHeadConfig(num_heads=2, head_config=KVCacheConfig(DIM), num_query_heads=4)
    cache = MultiHeadKVCache(config)
    rng = np.random.default_rng(3)
    cache.append_all(rng.standard_normal((2, 40, DIM)), rng.standard_normal((2, 40, DIM)))
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    out = cache.attention_output_all(queries, start=11)
    for q in range(4):
        head = cache.head(q // 2)
        np.testing.assert_allclose(out[q], head.attention_output(queries[q], start=11), rtol=1e-6, atol=1e-7)
    clone = cache.copy()
    clone.truncate(5)
    assert clone.num_tokens == 5 and cache.num_tokens == 40
    with pytest.raises(InvalidParameterError):
        cache.truncate(41)
    assert cache.num_tokens == 40
    with pytest.raises(InvalidParameterError):
        cache.attention_output_all(queries, start=41)
