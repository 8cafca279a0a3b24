"""Key centering (``KVCacheConfig(center_keys=True)``): keys are quantized minus a
fixed center and ``<q, center>`` is added back exactly, so only the error changes."""

import numpy as np
import pytest

from turboquant import InvalidParameterError, KVCacheConfig, NonFiniteError, QuantizedKVCache, TurboQuantMSE

DIM = 64
ONE = 1


def shared_component_keys(seed, n=300, shared=3.0):
    """Keys = a common vector ``shared`` times the per-token scale + per-token noise."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(DIM) * shared
    keys = rng.standard_normal((n, DIM)) + common
    values = rng.standard_normal((n, DIM))
    queries = rng.standard_normal((40, DIM)) * 0.5
    return queries, keys, values


def kl_divergence(exact_logits, approx_logits):
    p = np.exp(exact_logits - exact_logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    log_p = np.log(p)
    log_q = approx_logits - approx_logits.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return np.sum(p * (log_p - log_q), axis=1).mean()


def test_center_is_the_float32_mean_of_the_first_block_and_scores_add_it_back():
    q, k, v = shared_component_keys(0)
    cache = QuantizedKVCache(KVCacheConfig(DIM, center_keys=True))
    assert cache.key_center is None
    cache.append(k[:100], v[:100], n_threads=ONE)
    cache.append(k[100:], v[100:], n_threads=ONE)
    center = k[:100].mean(axis=0).astype(np.float32)
    np.testing.assert_array_equal(cache.key_center, center)
    # The same codes a plain quantizer gives for k - center, plus the exact shift.
    quantizer = TurboQuantMSE(DIM, 4, seed=42)
    shifted = k - center.astype(np.float64)
    expected = quantizer.inner_products(quantizer.quantize(shifted), q) + (q @ center.astype(np.float64))[:, None]
    np.testing.assert_allclose(cache.attention_scores(q, n_threads=ONE), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.reconstruct_keys(),
                               quantizer.dequantize(quantizer.quantize(shifted)) + center, rtol=1e-12, atol=1e-12)


def test_centering_cuts_attention_kl_for_keys_with_a_shared_component():
    """Logit errors scale with ||k_i - c|| instead of ||k_i||: with a common part
    3x the per-token part, E||k||^2 is about 10x E||k - c||^2, so first-order KL
    shrinks about 10x; require at least 3x."""
    q, k, v = shared_component_keys(1)
    exact = q @ k.T / np.sqrt(DIM)
    kls = {}
    for center in (False, True):
        cache = QuantizedKVCache(KVCacheConfig(DIM, center_keys=center))
        cache.append(k, v, n_threads=ONE)
        kls[center] = kl_divergence(exact, cache.attention_scores(q, n_threads=ONE) / np.sqrt(DIM))
    print(f"\nKL without centering {kls[False]:.4g}, with {kls[True]:.4g}")
    assert kls[True] < kls[False] / 3


@pytest.mark.parametrize("settings", [dict(), dict(sink_tokens=2, residual_tokens=5, max_tokens=60),
                                      dict(outlier_channels=4, key_strategy="prod", key_bits=3)])
def test_output_is_softmax_of_scores_times_held_values(settings):
    q, k, v = shared_component_keys(2, n=90)
    cache = QuantizedKVCache(KVCacheConfig(DIM, center_keys=True, **settings))
    for start in range(0, 90, 30):
        cache.append(k[start:start + 30], v[start:start + 30], n_threads=ONE)
    scores = cache.attention_scores(q, n_threads=ONE) / np.sqrt(DIM)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cache.attention_output(q, n_threads=ONE), weights @ cache.reconstruct_values(),
                               rtol=1e-10, atol=1e-12)


def test_clear_forgets_the_center_and_a_failed_append_does_not_set_it():
    q, k, v = shared_component_keys(3, n=20)
    cache = QuantizedKVCache(KVCacheConfig(DIM, center_keys=True))
    bad = k[:5].copy()
    bad[2, 3] = np.nan
    with pytest.raises(NonFiniteError):
        cache.append(bad, v[:5])
    assert cache.key_center is None and cache.num_tokens == 0
    cache.append(k[:10], v[:10])
    cache.clear()
    assert cache.key_center is None
    cache.append(k[10:], v[10:])
    np.testing.assert_array_equal(cache.key_center, k[10:].mean(axis=0).astype(np.float32))


def test_stats_count_the_center():
    q, k, v = shared_component_keys(4, n=10)
    plain = QuantizedKVCache(KVCacheConfig(DIM))
    centered = QuantizedKVCache(KVCacheConfig(DIM, center_keys=True))
    plain.append(k, v)
    centered.append(k, v)
    assert centered.stats().key_bytes == plain.stats().key_bytes + 4 * DIM
    assert centered.stats().value_bytes == plain.stats().value_bytes
    assert "center_keys=True" in repr(centered)


def test_config_validates_and_round_trips_center_keys():
    config = KVCacheConfig(DIM, center_keys=True)
    assert KVCacheConfig.from_json(config.to_json()) == config
    with pytest.raises(InvalidParameterError, match="center_keys"):
        KVCacheConfig(DIM, center_keys="yes")
