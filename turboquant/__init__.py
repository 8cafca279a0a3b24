"""turboquant: TurboQuant vector quantization and a quantized KV cache.

Implements TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online
Vector Quantization with Near-optimal Distortion Rate", arXiv:2504.19874) as a
Cython/OpenMP extension with a numpy API.
"""

from ._config import show_config
from ._errors import (
    CorruptPayloadError,
    DTypeError,
    IncompatibleCodesError,
    IndexOutOfRangeError,
    InvalidParameterError,
    LengthMismatchError,
    NonFiniteError,
    ShapeError,
    TurboQuantError,
)
from . import io
from .index import TurboQuantIndex
from .io import load
from .kv import (
    BatchedMultiHeadKVCache,
    CacheStats,
    KVCacheConfig,
    MultiHeadCacheStats,
    MultiHeadConfig,
    MultiHeadKVCache,
    QuantizedKVCache,
    QuantStrategy,
)
from .quant import (
    QJL,
    Codebook,
    CodeSpec,
    Codes,
    MSECodes,
    ProdCodes,
    QJLCodes,
    TurboQuantMSE,
    TurboQuantProd,
    coordinate_density,
    distortion_lower_bound,
    lloyd_max_codebook,
)
from ._threads import resolve_n_threads
from ._version import __version__

__all__ = [
    "QJL",
    "BatchedMultiHeadKVCache",
    "CacheStats",
    "Codebook",
    "CodeSpec",
    "Codes",
    "CorruptPayloadError",
    "DTypeError",
    "IncompatibleCodesError",
    "IndexOutOfRangeError",
    "InvalidParameterError",
    "KVCacheConfig",
    "LengthMismatchError",
    "MSECodes",
    "MultiHeadCacheStats",
    "MultiHeadConfig",
    "MultiHeadKVCache",
    "NonFiniteError",
    "ProdCodes",
    "QJLCodes",
    "QuantStrategy",
    "QuantizedKVCache",
    "ShapeError",
    "TurboQuantError",
    "TurboQuantIndex",
    "TurboQuantMSE",
    "TurboQuantProd",
    "__version__",
    "coordinate_density",
    "distortion_lower_bound",
    "io",
    "load",
    "lloyd_max_codebook",
    "resolve_n_threads",
    "show_config",
]
