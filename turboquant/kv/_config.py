"""Configuration and statistics records of the quantized KV cache."""

import dataclasses
import enum
import json

from .._errors import InvalidParameterError
from ..quant._rotation import ROTATIONS, SKETCHES
from .._validation import check_bool, check_choice, check_int
from ..quant._block_tables import TABLES as _BLOCK_TABLES

#: Storage choices of the unquantized (sink and recent) tokens.
RESIDUAL_DTYPES = ("float32", "float16")
#: Widest block-scaled codes (the fitted tables of turboquant.quant._block_tables).
BLOCK_SCALE_MAX_BITS = max(_BLOCK_TABLES)


class QuantStrategy(str, enum.Enum):
    """How keys are quantized.

    ``MSE`` (``"mse"``): :class:`TurboQuantMSE`, the default: lowest error after
    softmax. ``PROD`` (``"prod"``): :class:`TurboQuantProd`, unbiased inner
    products but more variance, which softmax amplifies.
    """

    MSE = "mse"
    PROD = "prod"

    @classmethod
    def parse(cls, value):
        """A strategy from itself or its string value (case-insensitive)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise InvalidParameterError(f"key_strategy must be 'mse' or 'prod', got {value!r}")

    def __str__(self):
        return self.value


def _from_dict(cls, data):
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InvalidParameterError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """Settings of one attention head's quantized KV cache (immutable, validated).

    Parameters
    ----------
    dim : int
        Head dimension, >= 2.
    key_bits : int, default=4
        Bits per key channel: 1..8 for MSE keys, 2..8 for Prod keys.
    value_bits : int, default=4
        Bits per value channel, 1..8. Keys usually deserve more bits than
        values: ``key_bits=5, value_bits=3`` beats 4 and 4 at the same size.
    key_strategy : QuantStrategy or {"mse", "prod"}, default="mse"
    seed : int, default=42
        Keys use ``seed``, outlier key channels ``seed + 1``, values ``seed + 2``.
    max_tokens : int, default=0
        Sliding window: keep at most this many tokens, evicting the oldest
        (sink tokens excepted). 0 means unlimited.
    residual_tokens : int, default=0
        The newest ``residual_tokens`` tokens are kept unquantized (float32) and
        quantized as they age out of this window. Every non-sink token then
        passes through the window, so it is quantized from its float32 copy,
        whether pushed alone or in a block.
    sink_tokens : int, default=0
        The first ``sink_tokens`` tokens are kept unquantized (float32) and never
        evicted. ``max_tokens`` must then exceed ``sink_tokens``.
    outlier_channels : int or tuple of int, default=0
        Key channels quantized by a second quantizer with ``outlier_bits``: a
        count (the channels with the largest mean magnitude in the first block
        appended after construction or :meth:`clear`), or explicit channel
        indices. 0 or () disables; otherwise at least 2 channels, and at least
        2 channels must remain.
    outlier_bits : int or None, default=None
        Bits of the outlier channels; ``None`` means ``min(key_bits + 1, 8)``.
    rotation : {"dense", "hadamard"}, default="dense"
    sketch : {"gaussian", "hadamard"}, default="gaussian"
        QJL sketch of Prod keys.
    center_keys : bool, default=False
        Quantize keys minus a fixed center (the mean key of the first block
        appended after construction or :meth:`clear`, held as float32) and add
        ``<q, center>`` back to every score exactly. Softmax ignores a shift
        shared by all tokens, so this only removes error: decoder keys share a
        large common component that would otherwise dominate their norms.
    block_scales : bool, default=False
        Quantize keys and values with block-scaled MSE codes
        (``TurboQuantMSE(..., block_scales=True)``): a float16 scale per vector
        and a 4-bit factor per 16 rotated coordinates, ``0.25 + 4/dim`` bits per
        value beyond ``bits`` instead of a float32 norm's ``32/dim``, and about
        half the error of the paper's codes at equal bits. MSE keys of 1..4
        bits, values of 1..4 bits, no outlier channels.
    residual_dtype : {"float32", "float16"}, default="float32"
        Storage of the unquantized (sink and recent) tokens. ``"float16"`` halves
        their bytes; every value must then fit float16 (|x| <= 65504).
    """

    dim: int
    key_bits: int = 4
    value_bits: int = 4
    key_strategy: QuantStrategy = QuantStrategy.MSE
    seed: int = 42
    max_tokens: int = 0
    residual_tokens: int = 0
    sink_tokens: int = 0
    outlier_channels: object = 0
    outlier_bits: object = None
    rotation: str = "dense"
    sketch: str = "gaussian"
    center_keys: bool = False
    block_scales: bool = False
    residual_dtype: str = "float32"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("dim", check_int(self.dim, "dim", low=2))
        strategy = QuantStrategy.parse(self.key_strategy)
        put("key_strategy", strategy)
        low_key_bits = 2 if strategy is QuantStrategy.PROD else 1
        put("key_bits", check_int(self.key_bits, f"key_bits ({strategy.value} keys)", low=low_key_bits, high=8))
        put("value_bits", check_int(self.value_bits, "value_bits", low=1, high=8))
        put("seed", check_int(self.seed, "seed", low=0))
        put("max_tokens", check_int(self.max_tokens, "max_tokens", low=0))
        put("residual_tokens", check_int(self.residual_tokens, "residual_tokens", low=0))
        put("sink_tokens", check_int(self.sink_tokens, "sink_tokens", low=0))
        if self.max_tokens and self.max_tokens <= self.sink_tokens:
            raise InvalidParameterError(
                f"max_tokens ({self.max_tokens}) must exceed sink_tokens ({self.sink_tokens})")
        put("rotation", check_choice(self.rotation, "rotation", ROTATIONS))
        put("sketch", check_choice(self.sketch, "sketch", SKETCHES))
        put("center_keys", check_bool(self.center_keys, "center_keys"))
        put("block_scales", check_bool(self.block_scales, "block_scales"))
        put("residual_dtype", check_choice(self.residual_dtype, "residual_dtype", RESIDUAL_DTYPES))
        put("outlier_channels", self._check_outliers(self.outlier_channels))
        if self.outlier_bits is None:
            put("outlier_bits", min(self.key_bits + 1, 8))
        else:
            put("outlier_bits", check_int(self.outlier_bits, "outlier_bits", low=low_key_bits, high=8))
        if self.block_scales:
            self._check_block_scales()

    def _check_block_scales(self):
        if self.key_strategy is not QuantStrategy.MSE:
            raise InvalidParameterError("block_scales needs MSE keys (key_strategy='mse')")
        if self.num_outlier_channels:
            raise InvalidParameterError("block_scales does not combine with outlier_channels")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) > BLOCK_SCALE_MAX_BITS:
                raise InvalidParameterError(
                    f"block_scales supports {name} 1..{BLOCK_SCALE_MAX_BITS}, got {getattr(self, name)}")

    def _check_outliers(self, channels):
        if isinstance(channels, (list, tuple)) or getattr(channels, "ndim", 0) >= 1:
            values = [check_int(c, "outlier channel", low=0, high=self.dim - 1) for c in list(channels)]
            if len(set(values)) != len(values):
                raise InvalidParameterError(f"outlier_channels has repeated channels: {list(channels)}")
            count, result = len(values), tuple(sorted(values))
        else:
            count = check_int(channels, "outlier_channels", low=0)
            result = count
        if count and not 2 <= count <= self.dim - 2:
            raise InvalidParameterError(
                f"outlier_channels must select 2..{self.dim - 2} channels (dim={self.dim}), got {count}")
        return result

    @classmethod
    def preset(cls, name, dim, **overrides):
        """A named configuration for heads of dimension ``dim``.

        Parameters
        ----------
        name : {"lossless", "balanced", "compact"}
            See :data:`PRESETS` for their settings and the README for their
            measured bits per value and next-token KL on a real model.
        dim : int
            Head dimension.
        **overrides
            Other :class:`KVCacheConfig` fields, replacing the preset's.

        Returns
        -------
        KVCacheConfig

        Raises
        ------
        InvalidParameterError
            For an unknown name or an invalid override.
        """
        if not isinstance(name, str) or name.lower() not in PRESETS:
            raise InvalidParameterError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        unknown = set(overrides) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise InvalidParameterError(f"unknown preset overrides {sorted(unknown)}")
        return cls(dim=dim, **{**PRESETS[name.lower()], **overrides})

    @property
    def num_outlier_channels(self):
        """How many key channels go to the outlier quantizer."""
        c = self.outlier_channels
        return len(c) if isinstance(c, tuple) else c

    def to_dict(self):
        """A JSON-ready dict of the settings (``key_strategy`` as its string)."""
        data = dataclasses.asdict(self)
        data["key_strategy"] = self.key_strategy.value
        if isinstance(self.outlier_channels, tuple):
            data["outlier_channels"] = list(self.outlier_channels)
        return data

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`; unknown keys raise InvalidParameterError."""
        return _from_dict(cls, data)

    def to_json(self):
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text):
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


#: Settings of the named presets of :meth:`KVCacheConfig.preset` (bits per value
#: for head dimension 64 and 1024 tokens, everything counted):
#:
#: - ``"lossless"``: 8-bit MSE keys and values with float32 norms (8.5 bits);
#: - ``"balanced"``: block-scaled 4-bit keys and 3-bit values, centered keys, the
#:   newest 32 tokens in float16 (4.4 bits);
#: - ``"compact"``: block-scaled 3-bit keys and 2-bit values, centered keys, the
#:   newest 32 tokens in float16 (3.4 bits).
PRESETS = {
    "lossless": dict(key_bits=8, value_bits=8),
    "balanced": dict(key_bits=4, value_bits=3, block_scales=True, center_keys=True, residual_tokens=32,
                     residual_dtype="float16"),
    "compact": dict(key_bits=3, value_bits=2, block_scales=True, center_keys=True, residual_tokens=32,
                    residual_dtype="float16"),
}


@dataclasses.dataclass(frozen=True)
class MultiHeadConfig:
    """Settings of a multi-head (optionally grouped-query) KV cache.

    Parameters
    ----------
    num_heads : int
        Number of key/value heads, >= 1.
    head_config : KVCacheConfig or dict
        Settings shared by every head; head ``h`` uses seed ``seed + 1000 h``.
    num_query_heads : int or None, default=None
        Query heads, a multiple of ``num_heads`` (grouped-query attention: KV
        head ``h`` serves query heads ``h*g .. h*g + g - 1`` with
        ``g = num_query_heads // num_heads``). ``None`` means ``num_heads``.
    """

    num_heads: int
    head_config: KVCacheConfig
    num_query_heads: object = None

    def __post_init__(self):
        object.__setattr__(self, "num_heads", check_int(self.num_heads, "num_heads", low=1))
        head = self.head_config
        if isinstance(head, dict):
            head = KVCacheConfig.from_dict(head)
        if not isinstance(head, KVCacheConfig):
            raise InvalidParameterError(f"head_config must be a KVCacheConfig, got {type(head).__name__}")
        object.__setattr__(self, "head_config", head)
        query_heads = self.num_heads if self.num_query_heads is None else self.num_query_heads
        query_heads = check_int(query_heads, "num_query_heads", low=1)
        if query_heads % self.num_heads:
            raise InvalidParameterError(
                f"num_query_heads ({query_heads}) must be a multiple of num_heads ({self.num_heads})")
        object.__setattr__(self, "num_query_heads", query_heads)

    @property
    def group_size(self):
        """Query heads per KV head."""
        return self.num_query_heads // self.num_heads

    def head_seed(self, head):
        """Seed of KV head ``head``."""
        return self.head_config.seed + 1000 * head

    def to_dict(self):
        """A JSON-ready dict."""
        return {"num_heads": self.num_heads, "head_config": self.head_config.to_dict(),
                "num_query_heads": self.num_query_heads}

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`."""
        return _from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Memory accounting of one head's cache.

    ``key_bytes`` and ``value_bytes`` are the bytes actually held for the live
    tokens: packed codes and their norms (and block scales), plus the rows of
    the unquantized sink and recent tokens (float32 or float16) and the key
    center. ``uncompressed_bytes`` is
    ``num_tokens * dim * 4 * 2`` (float32 keys and values).
    """

    num_tokens: int
    dim: int
    key_bits: int
    value_bits: int
    key_strategy: QuantStrategy
    key_bytes: int
    value_bytes: int
    total_bytes: int
    uncompressed_bytes: int
    compression_ratio: float
    quantized_tokens: int = 0
    full_precision_tokens: int = 0
    key_bits_per_channel: float = 0.0
    value_bits_per_channel: float = 0.0

    def to_dict(self):
        """A JSON-ready dict (``key_strategy`` as its string)."""
        data = dataclasses.asdict(self)
        data["key_strategy"] = self.key_strategy.value
        return data


@dataclasses.dataclass(frozen=True)
class MultiHeadCacheStats:
    """Memory accounting of a multi-head cache: totals and per-head :class:`CacheStats`."""

    num_heads: int
    num_tokens: int
    head_dim: int
    total_bytes: int
    uncompressed_bytes: int
    compression_ratio: float
    head_stats: tuple
