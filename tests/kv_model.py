"""A plain-numpy model of :class:`turboquant.QuantizedKVCache`, and attention-fidelity helpers.

The model is written from the documented behaviour (the module docstring of
``turboquant/kv/_cache.py`` and :class:`turboquant.KVCacheConfig`), not from
the cache's code:

* token order is chronological; the first ``sink_tokens`` tokens appended
  since construction or the last ``clear()`` are sinks and are never evicted;
* with ``max_tokens > 0`` the oldest non-sink tokens are evicted so that at
  most ``max_tokens`` tokens are held;
* the newest ``residual_tokens`` non-sink tokens are "recent";
* sink and recent tokens are held as float32; every other token is
  quantized and stays quantized. With ``residual_tokens > 0`` every non-sink
  token passes through the float32 recent window, so it is quantized from its
  float32 copy (also when a block pushes it past the window at once);
  without a window it is quantized from the input as given.

Reads quantize the quantized-region tokens again with public quantizers
built from the same config (keys: ``TurboQuantMSE``/``TurboQuantProd`` with
``seed``; values: ``TurboQuantMSE`` with ``seed + 2``). Quantization is
row-independent and deterministic, so this reproduces the cache's codes.
Outlier channels are not modelled.
"""

import math

import numpy as np

from turboquant import QuantStrategy, TurboQuantMSE, TurboQuantProd

SINK, QUANTIZED, RECENT = "sink", "quantized", "recent"


class _Token:
    __slots__ = ("position", "key", "value", "sink", "region")

    def __init__(self, position, key, value, sink):
        self.position = position
        self.key = key          # float64 as given; float32-rounded once held as sink/recent
        self.value = value
        self.sink = sink
        self.region = None      # set by ModelKVCache._settle


def softmax(logits):
    """Row-wise softmax in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def exact_attention(q, k, v, scale=None):
    """``softmax(scale q k^T) v`` and the weights, in float64 (scale defaults to 1/sqrt(dim))."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # einsum, not BLAS: exact, and immune to BLAS threads fighting over a busy machine.
    weights = softmax(scale * np.einsum("md,nd->mn", q, k))
    return np.einsum("mn,nd->md", weights, v), weights


def snapshot(cache, queries):
    """Everything observable about a cache, for "a failed call changed nothing" checks."""
    key_codes, _, value_codes = cache.quantized_codes()
    channels = cache.outlier_channels
    return {
        "num_tokens": cache.num_tokens,
        "stats": cache.stats(),
        "scores": cache.attention_scores(queries, n_threads=1),
        "output": cache.attention_output(queries, n_threads=1),
        "keys": cache.reconstruct_keys(n_threads=1),
        "values": cache.reconstruct_values(n_threads=1),
        "channels": None if channels is None else np.array(channels),
        "key_codes": key_codes.to_arrays(),
        "value_codes": value_codes.to_arrays(),
    }


def assert_same_snapshot(before, after):
    """Two :func:`snapshot` results are identical."""
    assert before.keys() == after.keys()
    for name, a in before.items():
        b = after[name]
        if isinstance(a, dict):
            assert a.keys() == b.keys(), name
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}.{key}")
        elif isinstance(a, np.ndarray) or a is None:
            assert (b is None) == (a is None), name
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a == b, name


class ModelKVCache:
    """Reference model of one head's quantized KV cache (no outlier channels)."""

    def __init__(self, config, *, n_threads=1):
        if config.num_outlier_channels:
            raise ValueError("the model does not cover outlier channels")
        self.config = config
        self.n_threads = n_threads
        c = config
        if c.key_strategy is QuantStrategy.PROD:
            self.key_quantizer = TurboQuantProd(c.dim, c.key_bits, seed=c.seed, rotation=c.rotation,
                                                sketch=c.sketch)
        else:
            self.key_quantizer = TurboQuantMSE(c.dim, c.key_bits, seed=c.seed, rotation=c.rotation)
        # KVCacheConfig documents one ``rotation`` for the cache; values use it too.
        self.value_quantizer = TurboQuantMSE(c.dim, c.value_bits, seed=c.seed + 2, rotation=c.rotation)
        self.clear()

    # -- writing ------------------------------------------------------------------
    def clear(self):
        self.tokens = []
        self.sinks_taken = 0
        self.next_position = 0

    def append(self, keys, values):
        keys = np.asarray(keys, dtype=np.float64).reshape(-1, self.config.dim)
        values = np.asarray(values, dtype=np.float64).reshape(-1, self.config.dim)
        assert keys.shape == values.shape
        for key, value in zip(keys, values):
            sink = self.sinks_taken < self.config.sink_tokens
            self.sinks_taken += sink
            self.tokens.append(_Token(self.next_position, key.copy(), value.copy(), sink))
            self.next_position += 1
        self._settle()

    def push_token(self, key, value):
        self.append(np.asarray(key)[None, :], np.asarray(value)[None, :])

    def _settle(self):
        c = self.config
        if c.max_tokens:
            excess = len(self.tokens) - c.max_tokens
            if excess > 0:
                evict = [t for t in self.tokens if not t.sink][:excess]
                gone = {id(t) for t in evict}
                self.tokens = [t for t in self.tokens if id(t) not in gone]
        non_sinks = [t for t in self.tokens if not t.sink]
        n_recent = min(c.residual_tokens, len(non_sinks))
        recent = {id(t) for t in non_sinks[len(non_sinks) - n_recent:]}
        for t in self.tokens:
            if t.sink or id(t) in recent:
                assert t.region != QUANTIZED, "a quantized token never becomes exact again"
                t.region = SINK if t.sink else RECENT
                # Held as float32 from now on.
                t.key = t.key.astype(np.float32).astype(np.float64)
                t.value = t.value.astype(np.float32).astype(np.float64)
            else:
                if c.residual_tokens:
                    t.key = t.key.astype(np.float32).astype(np.float64)
                    t.value = t.value.astype(np.float32).astype(np.float64)
                t.region = QUANTIZED

    # -- reading ------------------------------------------------------------------
    @property
    def num_tokens(self):
        return len(self.tokens)

    def count(self, region):
        return sum(t.region == region for t in self.tokens)

    def _split(self):
        quantized = [i for i, t in enumerate(self.tokens) if t.region == QUANTIZED]
        exact = [i for i, t in enumerate(self.tokens) if t.region != QUANTIZED]
        return quantized, exact

    def _stack(self, indices, field):
        if not indices:
            return np.empty((0, self.config.dim))
        return np.stack([getattr(self.tokens[i], field) for i in indices])

    def scores(self, queries):
        """(m, num_tokens) scores, oldest token first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        out = np.zeros((queries.shape[0], self.num_tokens))
        quantized, exact = self._split()
        if quantized:
            codes = self.key_quantizer.quantize(self._stack(quantized, "key"), n_threads=self.n_threads)
            out[:, quantized] = self.key_quantizer.inner_products(codes, queries, n_threads=self.n_threads)
        if exact:
            out[:, exact] = queries @ self._stack(exact, "key").T
        return out

    def _held(self, field, quantizer):
        out = np.zeros((self.num_tokens, self.config.dim))
        quantized, exact = self._split()
        if quantized:
            codes = quantizer.quantize(self._stack(quantized, field), n_threads=self.n_threads)
            out[quantized] = quantizer.dequantize(codes, n_threads=self.n_threads)
        if exact:
            out[exact] = self._stack(exact, field)
        return out

    def held_keys(self):
        """Keys as held: float32 for sinks/recent, dequantized for the rest (float64)."""
        return self._held("key", self.key_quantizer)

    def held_values(self):
        """Values as held: float32 for sinks/recent, dequantized for the rest (float64)."""
        return self._held("value", self.value_quantizer)

    def attention_output(self, queries, scale=None):
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        scale = 1.0 / math.sqrt(self.config.dim) if scale is None else scale
        if not self.num_tokens:
            return np.zeros((queries.shape[0], self.config.dim))
        return softmax(scale * self.scores(queries)) @ self.held_values()

    def byte_sizes(self):
        """(key_bytes, value_bytes) the documented accounting predicts."""
        n_quantized = self.count(QUANTIZED)
        n_full = self.num_tokens - n_quantized
        full = n_full * self.config.dim * 4
        return (n_quantized * self.key_quantizer.code_bytes + full,
                n_quantized * self.value_quantizer.code_bytes + full)


def attention_fidelity(cache_factory, q, k, v, *, n_threads=None):
    """Fidelity of a cache's attention against exact float64 attention.

    Parameters
    ----------
    cache_factory : callable
        ``cache_factory()`` returns an empty :class:`QuantizedKVCache` (or any
        object with ``append``, ``attention_output`` and ``attention_weights``
        taking ``n_threads``).
    q : array_like, shape (m, dim)
        Queries, read as float64, all in one block.
    k, v : array_like, shape (n, dim)
        Keys and values, appended as given (float32 or float64).
    n_threads : int or None, default=None
        Passed to the cache's methods.

    Returns
    -------
    (mean_cosine, mean_kl) : tuple of float
        Mean over queries of the cosine similarity between the cache's
        ``attention_output`` and ``softmax(q k^T / sqrt(dim)) v``, and mean
        ``KL(exact || cache)`` (nats) of the attention distributions.
    """
    cosines, kls = attention_fidelity_per_query(cache_factory, q, k, v, n_threads=n_threads)
    return float(cosines.mean()), float(kls.mean())


def attention_fidelity_per_query(cache_factory, q, k, v, *, n_threads=None):
    """Per-query cosines and KL divergences behind :func:`attention_fidelity`."""
    q = np.asarray(q, dtype=np.float64)
    cache = cache_factory()
    cache.append(k, v, n_threads=n_threads)
    approx = np.asarray(cache.attention_output(q, n_threads=n_threads), dtype=np.float64)
    approx_weights = np.asarray(cache.attention_weights(q, n_threads=n_threads), dtype=np.float64)
    exact, exact_weights = exact_attention(q, k, v)
    cosines = np.sum(exact * approx, axis=1) / (
        np.linalg.norm(exact, axis=1) * np.linalg.norm(approx, axis=1))
    tiny = np.finfo(np.float64).tiny
    kls = np.sum(exact_weights * (np.log(np.maximum(exact_weights, tiny))
                                  - np.log(np.maximum(approx_weights, tiny))), axis=1)
    return cosines, kls
