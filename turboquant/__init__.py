"""turboquant: TurboQuant vector quantization and a quantized KV cache.

Implements TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online
Vector Quantization with Near-optimal Distortion Rate", arXiv:2504.19874) as a
Cython/OpenMP extension with a numpy API.
"""

import os as _os

# Idle OpenMP workers sleep instead of spinning: the kernels alternate with
# numpy's BLAS calls (rotations, small products), whose own threads need the
# same cores, and spinning workers slowed whole calls several-fold on 2 cores.
# Only a default: an OMP_WAIT_POLICY set by the user wins, and it takes effect
# only if no OpenMP runtime was loaded before turboquant.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._config import show_config
from ._errors import (
    CorruptPayloadError,
    DTypeError,
    IncompatibleCodesError,
    InvalidParameterError,
    LengthMismatchError,
    NonFiniteError,
    ShapeError,
    TurboQuantError,
)
from .kv import (
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
    "CacheStats",
    "Codebook",
    "CodeSpec",
    "Codes",
    "CorruptPayloadError",
    "DTypeError",
    "IncompatibleCodesError",
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
    "TurboQuantMSE",
    "TurboQuantProd",
    "__version__",
    "coordinate_density",
    "distortion_lower_bound",
    "lloyd_max_codebook",
    "resolve_n_threads",
    "show_config",
]
