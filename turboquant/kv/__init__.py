"""The quantized KV cache: configuration, single-head and multi-head caches.

The public names are re-exported by :mod:`turboquant`; import them from there.
"""

from ._batched import BatchedMultiHeadKVCache
from ._cache import MultiHeadKVCache, QuantizedKVCache
from ._config import CacheStats, KVCacheConfig, MultiHeadCacheStats, MultiHeadConfig, QuantStrategy

__all__ = [
    "BatchedMultiHeadKVCache",
    "CacheStats",
    "KVCacheConfig",
    "MultiHeadCacheStats",
    "MultiHeadConfig",
    "MultiHeadKVCache",
    "QuantStrategy",
    "QuantizedKVCache",
]
