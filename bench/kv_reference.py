"""Plain-numpy quantized KV cache: the baseline of ``bench/test_bench_kv_cache.py``.

It does what the reference design (``kv_cache.rs``) does, the obvious numpy
way, in float32, with *the same quantizer parameters* as a given
``turboquant.QuantizedKVCache`` (MSE keys):

* storage: one ``uint8`` per index (no bit packing) and a ``float32`` norm per
  token, for keys and for values, in arrays that grow by doubling (as the
  package's row buffer does), so an append copies only its own block;
* append: ``unit = (x @ R.T) / ||x||`` with the cache's float32 rotation ``R``,
  then ``np.searchsorted`` against the same Lloyd-Max boundaries;
* attention_scores: dequantize *every* key (``centroids[idx] * norms``, then
  ``@ R`` back to the input domain) and multiply by the query;
* attention_output: the scores above, dequantize every value the same way,
  ``softmax(scores / sqrt(dim))``, weighted sum.

Because the rotation and the codebooks are the package's, the codes are the
package's codes (up to float32 rounding on cell boundaries), so the reference's
outputs can be checked against turboquant's.
"""

import math

import numpy as np


def _float32(array):
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


class NumpyMSEParams:
    """Rotation and codebook of one ``turboquant.TurboQuantMSE``, as float32 arrays.

    Parameters
    ----------
    quantizer : turboquant.TurboQuantMSE
        Must use the ``"dense"`` rotation (its matrix is what the reference multiplies by).
    """

    def __init__(self, quantizer):
        if quantizer.rotation != "dense":
            raise ValueError(f"the numpy reference needs a dense rotation, got {quantizer.rotation!r}")
        self.dim = quantizer.dim
        self.rotation = _float32(quantizer._codec.rotation.matrix)  # y = x @ R.T rotates, x = y @ R undoes
        self.centroids = _float32(quantizer.codebook.centroids)
        self.boundaries = _float32(quantizer.codebook.boundaries)

    def quantize(self, x):
        """``(idx, norms)``: (n, dim) uint8 indices and (n,) float32 norms of float32 rows ``x``."""
        unit = x @ self.rotation.T
        norms = np.linalg.norm(x, axis=1)
        unit /= np.where(norms > 0, norms, 1)[:, None]
        # side="left": the index is the number of boundaries strictly below the value.
        return np.searchsorted(self.boundaries, unit).astype(np.uint8), norms

    def dequantize(self, idx, norms):
        """(n, dim) float32 reconstruction: ``centroids[idx] * norms`` rotated back."""
        rotated = self.centroids[idx]
        rotated *= norms[:, None]
        return rotated @ self.rotation


class _GrowingRows:
    """(capacity, dim) uint8 indices and (capacity,) float32 norms; doubling growth."""

    def __init__(self, dim):
        self.idx = np.empty((0, dim), dtype=np.uint8)
        self.norms = np.empty(0, dtype=np.float32)
        self.size = 0

    def append(self, idx, norms):
        count = idx.shape[0]
        if self.size + count > self.idx.shape[0]:
            capacity = max(16, 2 * (self.size + count))
            grown_idx = np.empty((capacity, self.idx.shape[1]), dtype=np.uint8)
            grown_norms = np.empty(capacity, dtype=np.float32)
            grown_idx[:self.size] = self.idx[:self.size]
            grown_norms[:self.size] = self.norms[:self.size]
            self.idx, self.norms = grown_idx, grown_norms
        self.idx[self.size:self.size + count] = idx
        self.norms[self.size:self.size + count] = norms
        self.size += count

    def live(self):
        return self.idx[:self.size], self.norms[:self.size]

    @property
    def nbytes(self):
        idx, norms = self.live()
        return idx.nbytes + norms.nbytes


class NumpyKVCacheReference:
    """One head's quantized KV cache, the reference design's way, in numpy.

    Parameters
    ----------
    keys, values : NumpyMSEParams
        Quantizer parameters of keys and values.

    Use :meth:`like` to copy them from a ``turboquant.QuantizedKVCache``.
    """

    def __init__(self, keys, values):
        if keys.dim != values.dim:
            raise ValueError(f"key dim {keys.dim} != value dim {values.dim}")
        self.dim = keys.dim
        self.keys, self.values = keys, values
        self._k, self._v = _GrowingRows(self.dim), _GrowingRows(self.dim)

    @classmethod
    def like(cls, cache):
        """An empty reference with the parameters of ``cache`` (MSE keys, no outlier channels)."""
        if str(cache.config.key_strategy) != "mse" or cache.outlier_key_quantizer is not None:
            raise ValueError("the numpy reference covers MSE keys without outlier channels")
        return cls(NumpyMSEParams(cache.key_quantizer), NumpyMSEParams(cache.value_quantizer))

    @property
    def num_tokens(self):
        return self._k.size

    def append(self, keys, values):
        """Quantize and store (n, dim) float32 keys and values."""
        keys, values = _float32(keys), _float32(values)
        self._k.append(*self.keys.quantize(keys))
        self._v.append(*self.values.quantize(values))

    def attention_scores(self, query):
        """``<query, key_i>`` for every token: dequantize all keys, then a matrix-vector product."""
        return self.keys.dequantize(*self._k.live()) @ _float32(query)

    def attention_output(self, query):
        """``softmax(scores / sqrt(dim)) @ dequantized values`` (dim,) float32."""
        scores = self.attention_scores(query)
        values = self.values.dequantize(*self._v.live())
        logits = scores.astype(np.float64) / math.sqrt(self.dim)
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        return weights.astype(np.float32) @ values

    @property
    def nbytes(self):
        """Bytes of the live codes (uint8 indices and float32 norms, keys and values)."""
        return self._k.nbytes + self._v.nbytes


class NumpyMultiHeadReference:
    """One :class:`NumpyKVCacheReference` per KV head of a ``turboquant.MultiHeadKVCache``;
    query head ``q`` reads KV head ``q // group_size`` (grouped-query attention).
    """

    def __init__(self, cache):
        self.heads = [NumpyKVCacheReference.like(head) for head in cache.heads]
        self.group_size = cache.num_query_heads // cache.num_heads

    def append_all(self, keys, values):
        """(num_heads, n, dim) keys and values."""
        for head, k, v in zip(self.heads, keys, values):
            head.append(k, v)

    def attention_output_all(self, queries):
        """(num_query_heads, dim) queries -> (num_query_heads, dim): one reference call per query head."""
        return np.stack([self.heads[q // self.group_size].attention_output(query)
                         for q, query in enumerate(queries)])

    def decode_step(self, keys, values, queries):
        """Append one token per KV head ((num_heads, dim) keys, values), then attend every query head."""
        self.append_all(keys[:, None, :], values[:, None, :])
        return self.attention_output_all(queries)

    @property
    def nbytes(self):
        return sum(head.nbytes for head in self.heads)
