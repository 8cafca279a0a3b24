"""QuantizedKVCache against a plain-numpy model, driven by a Hypothesis state machine.

Random sequences of appends (blocks of 0..7 tokens), single-token pushes,
clears, reads and invalid appends run on a real cache and on
:class:`kv_model.ModelKVCache`; after every step the token count, the scores,
the attention output, the held keys/values and the memory accounting must
agree. Quantization is deterministic and row-independent, so scores agree to
rounding (rtol 1e-9), not merely statistically.

The same machine runs on caches with outlier key channels, which the model
does not quantize: there the model tracks the tokens and their regions, and
the cache must equal a fresh cache fed the held tokens in one block.
"""

import dataclasses


import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kv_model import QUANTIZED, RECENT, SINK, ModelKVCache, assert_same_snapshot, snapshot
from turboquant import (
    DTypeError,
    KVCacheConfig,
    LengthMismatchError,
    NonFiniteError,
    QuantizedKVCache,
    ShapeError,
    TurboQuantError,
)

SEEDS = st.integers(0, 2**32 - 1)
RTOL = 1e-9
# One thread: results do not depend on it (tested elsewhere), and tiny blocks on a
# busy machine pay far more for an OpenMP region than for the work.
ONE = 1


@st.composite
def cache_configs(draw, outliers=False):
    strategy = draw(st.sampled_from(["mse", "prod"]))
    sink_tokens = draw(st.integers(0, 3))
    dim = draw(st.sampled_from([8, 16] if outliers else [2, 5, 8, 16]))
    # Explicit channels, so that a fresh cache fed the held tokens uses the same ones.
    channels = tuple(sorted(draw(st.sets(st.integers(0, dim - 1), min_size=2, max_size=3)))) if outliers else 0
    return KVCacheConfig(
        dim=dim,
        outlier_channels=channels,
        key_bits=draw(st.integers(2 if strategy == "prod" else 1, 8)),
        value_bits=draw(st.integers(1, 8)),
        key_strategy=strategy,
        seed=draw(st.integers(0, 1000)),
        # The config rule: a sliding window must exceed the sinks.
        max_tokens=draw(st.just(0) | st.integers(sink_tokens + 1, 12)),
        sink_tokens=sink_tokens,
        residual_tokens=draw(st.integers(0, 5)),
        rotation=draw(st.sampled_from(["dense", "hadamard"])),
        sketch=draw(st.sampled_from(["gaussian", "hadamard"])),
    )


def random_block(seed, n, dim):
    """Keys and values with varied norms, some zero rows and some repeated rows."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, dim)) * rng.lognormal(0.0, 1.0, size=(n, 1))
    values = rng.standard_normal((n, dim)) * rng.lognormal(0.0, 1.0, size=(n, 1))
    if n and rng.random() < 0.2:
        keys[rng.integers(n)] = 0.0
    if n > 1 and rng.random() < 0.2:
        keys[-1] = keys[0]
    return keys, values


def assert_close(actual, expected, magnitude):
    """Equal to rounding: ``rtol`` 1e-9 plus a floor for entries near zero."""
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * max(magnitude, 1e-300))


INVALID_KINDS = ["nan_key", "inf_value", "rows_mismatch", "wrong_dim", "one_d_block", "three_d_block",
                 "string_dtype", "push_nan", "push_2d", "push_wrong_dim"]


class KVCacheMachine(RuleBasedStateMachine):
    """The cache against the model; :attr:`outliers` puts outlier key channels in the configs."""

    outliers = False

    @initialize(data=st.data(), query_seed=SEEDS)
    def setup(self, data, query_seed):
        config = data.draw(cache_configs(self.outliers))
        self.config = config
        self.cache = QuantizedKVCache(config)
        # The token regions do not depend on the outlier channels.
        self.model = ModelKVCache(dataclasses.replace(config, outlier_channels=0))
        self.queries = np.random.default_rng(query_seed).standard_normal((3, config.dim))

    # -- writes ----------------------------------------------------------------------
    @rule(n=st.integers(0, 7), seed=SEEDS)
    def append(self, n, seed):
        keys, values = random_block(seed, n, self.config.dim)
        self.cache.append(keys, values, n_threads=ONE)
        self.model.append(keys, values)

    @rule(seed=SEEDS)
    def push_token(self, seed):
        keys, values = random_block(seed, 1, self.config.dim)
        self.cache.push_token(keys[0], values[0], n_threads=ONE)
        self.model.push_token(keys[0], values[0])

    @rule()
    def clear(self):
        self.cache.clear()
        self.model.clear()

    @rule(kind=st.sampled_from(INVALID_KINDS), n=st.integers(1, 5), seed=SEEDS)
    def invalid_append(self, kind, n, seed):
        dim = self.config.dim
        rng = np.random.default_rng(seed)
        keys, values = random_block(seed, n, dim)
        row, col = rng.integers(n), rng.integers(dim)
        if kind == "nan_key":
            keys[row, col] = np.nan
            call, error = (lambda: self.cache.append(keys, values)), NonFiniteError
        elif kind == "inf_value":
            values[row, col] = -np.inf
            call, error = (lambda: self.cache.append(keys, values)), NonFiniteError
        elif kind == "rows_mismatch":
            extra = np.vstack([values, values[:1]])
            call, error = (lambda: self.cache.append(keys, extra)), LengthMismatchError
        elif kind == "wrong_dim":
            wide = np.hstack([keys, keys[:, :1]])
            call, error = (lambda: self.cache.append(wide, np.hstack([values, values[:, :1]]))), ShapeError
        elif kind == "one_d_block":
            call, error = (lambda: self.cache.append(keys[0], values[0])), ShapeError
        elif kind == "three_d_block":
            call, error = (lambda: self.cache.append(keys[None], values[None])), ShapeError
        elif kind == "string_dtype":
            call, error = (lambda: self.cache.append(keys.astype(str), values)), DTypeError
        elif kind == "push_nan":
            keys[0, col] = np.nan
            call, error = (lambda: self.cache.push_token(keys[0], values[0])), NonFiniteError
        elif kind == "push_2d":
            call, error = (lambda: self.cache.push_token(keys[:1], values[:1])), ShapeError
        else:  # push_wrong_dim
            call, error = (lambda: self.cache.push_token(keys[0, :-1], values[0, :-1])), ShapeError
        before = snapshot(self.cache, self.queries)
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, TurboQuantError)
        assert_same_snapshot(before, snapshot(self.cache, self.queries))

    # -- reads -------------------------------------------------------------------------
    @rule(m=st.integers(1, 4), seed=SEEDS, scale=st.sampled_from([None, 0.25, 3.0]), one_d=st.booleans())
    def read(self, m, seed, scale, one_d):
        queries = np.random.default_rng(seed).standard_normal((m, self.config.dim)) * 2.0
        if one_d:
            queries = queries[0]
        scores = self.cache.attention_scores(queries, n_threads=ONE)
        output = self.cache.attention_output(queries, scale, n_threads=ONE)
        weights = self.cache.attention_weights(queries, scale, n_threads=ONE)
        expected_shape = (self.model.num_tokens,) if one_d else (m, self.model.num_tokens)
        assert scores.shape == weights.shape == expected_shape
        assert output.shape == ((self.config.dim,) if one_d else (m, self.config.dim))
        if self.outliers:
            return
        self._check_reads(np.atleast_2d(queries), np.atleast_2d(scores), np.atleast_2d(output), scale)
        held_keys, held_values = self.model.held_keys(), self.model.held_values()
        assert_close(self.cache.reconstruct_keys(n_threads=ONE), held_keys, np.abs(held_keys).max(initial=0.0))
        assert_close(self.cache.reconstruct_values(n_threads=ONE), held_values, np.abs(held_values).max(initial=0.0))

    # -- invariants ----------------------------------------------------------------------
    def _check_reads(self, queries, scores, output, scale):
        expected = self.model.scores(queries)
        assert scores.shape == expected.shape
        held_keys = self.model.held_keys()
        bound = np.abs(queries).max() * np.abs(held_keys).max(initial=0.0) * self.config.dim
        assert_close(scores, expected, bound)
        expected_output = self.model.attention_output(queries, scale)
        assert_close(output, expected_output, np.abs(self.model.held_values()).max(initial=0.0))

    @invariant()
    def agrees_with_model(self):
        model, cache = self.model, self.cache
        assert cache.num_tokens == len(cache) == model.num_tokens
        if self.outliers:
            self._check_against_fresh_cache()
            return
        self._check_reads(self.queries, cache.attention_scores(self.queries, n_threads=ONE),
                          cache.attention_output(self.queries, n_threads=ONE), None)

    def _check_against_fresh_cache(self):
        """Equal to a cache (no window) fed the held tokens in one block; sink and
        recent keys held exactly as the model holds them (float32)."""
        tokens = self.model.tokens
        keys = np.array([t.key for t in tokens]).reshape(-1, self.config.dim)
        values = np.array([t.value for t in tokens]).reshape(-1, self.config.dim)
        fresh = QuantizedKVCache(dataclasses.replace(self.config, max_tokens=0))
        fresh.append(keys, values, n_threads=ONE)
        magnitude = np.abs(self.queries).max() * np.abs(keys).max(initial=0.0) * self.config.dim
        assert_close(self.cache.attention_scores(self.queries, n_threads=ONE),
                     fresh.attention_scores(self.queries, n_threads=ONE), magnitude)
        assert_close(self.cache.reconstruct_values(n_threads=ONE), fresh.reconstruct_values(n_threads=ONE),
                     np.abs(values).max(initial=0.0))
        exact = [i for i, t in enumerate(tokens) if t.region != QUANTIZED]
        np.testing.assert_array_equal(self.cache.reconstruct_keys(n_threads=ONE)[exact], keys[exact])

    @invariant()
    def accounting_agrees(self):
        model, stats = self.model, self.cache.stats()
        assert stats.num_tokens == model.num_tokens
        assert stats.quantized_tokens == model.count(QUANTIZED)
        assert stats.full_precision_tokens == model.count(SINK) + model.count(RECENT)
        assert stats.quantized_tokens + stats.full_precision_tokens == stats.num_tokens
        assert stats.uncompressed_bytes == model.num_tokens * self.config.dim * 8
        if self.outliers:
            return
        key_bytes, value_bytes = model.byte_sizes()
        assert (stats.key_bytes, stats.value_bytes) == (key_bytes, value_bytes)
        assert stats.total_bytes == key_bytes + value_bytes

    @invariant()
    def window_rules_hold(self):
        c, model = self.config, self.model
        if c.max_tokens:
            assert model.num_tokens <= c.max_tokens
        assert model.count(SINK) <= c.sink_tokens
        assert model.count(RECENT) <= c.residual_tokens


def test_model_regions_follow_the_documented_layout():
    """The model itself, on a hand-worked sequence: 2 sinks, 3 recent, window of 8."""
    model = ModelKVCache(KVCacheConfig(dim=4, sink_tokens=2, residual_tokens=3, max_tokens=8))
    for n in (1, 4, 0, 5):
        model.append(*random_block(n, n, 4))
    # 10 tokens appended: 0, 1 are sinks; 2, 3 evicted; 4..6 quantized; 7..9 recent.
    assert [t.position for t in model.tokens] == [0, 1, 4, 5, 6, 7, 8, 9]
    assert [t.region for t in model.tokens] == [SINK] * 2 + [QUANTIZED] * 3 + [RECENT] * 3
    # With a recent window every non-sink token passes through float32, also
    # token 5, which arrived in the block that pushed it past the window.
    for token in model.tokens:
        np.testing.assert_array_equal(token.key, token.key.astype(np.float32))
    # Without a window, tokens are quantized from the input as given.
    plain = ModelKVCache(KVCacheConfig(dim=4))
    plain.append(*random_block(2, 2, 4))
    k0 = plain.tokens[0].key
    assert not np.array_equal(k0, k0.astype(np.float32))
    model.clear()
    model.append(*random_block(3, 3, 4))
    assert [t.region for t in model.tokens] == [SINK, SINK, RECENT]


class OutlierKVCacheMachine(KVCacheMachine):
    outliers = True


for _machine, _examples in ((KVCacheMachine, 60), (OutlierKVCacheMachine, 40)):
    _machine.TestCase.settings = settings(
        max_examples=_examples, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
TestKVCacheStateMachine = KVCacheMachine.TestCase
TestOutlierKVCacheStateMachine = OutlierKVCacheMachine.TestCase


# -- values beyond float32 range ----------------------------------------------------------
# Sink and recent tokens are held as float32, and quantized tokens store float32
# norms, so a finite float64 input whose norm exceeds the float32 range can only
# be refused. It must be refused at once, whichever region the token enters, and
# leave the cache unchanged; it must never be held as inf (poisoning every read)
# nor make a later, valid append fail when the token ages out of the recent window.

HUGE = 1e39                       # finite in float64, inf in float32
NORM_OVERFLOW = 1e38              # fits float32, but 16 of them have norm 4e38 > float32 max


@pytest.mark.parametrize("region", ["sink", "recent", "quantized"])
@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("entry, dtype", [(HUGE, np.float64), (NORM_OVERFLOW, np.float64),
                                          (NORM_OVERFLOW, np.float32)])
def test_norm_beyond_float32_is_refused_in_every_region(region, which, entry, dtype):
    dim = 16
    config = KVCacheConfig(dim=dim, sink_tokens=int(region == "sink"), residual_tokens=int(region == "recent"))
    cache = QuantizedKVCache(config)
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((2, dim))
    keys, values = rng.standard_normal((1, dim)).astype(dtype), rng.standard_normal((1, dim)).astype(dtype)
    (keys if which == "key" else values)[0, :] = entry
    before = snapshot(cache, queries)
    with pytest.raises(NonFiniteError):
        cache.append(keys, values)
    assert_same_snapshot(before, snapshot(cache, queries))
    # The cache keeps working for valid input.
    cache.append(*random_block(1, 3, dim))
    assert np.isfinite(cache.attention_output(queries, n_threads=ONE)).all()
