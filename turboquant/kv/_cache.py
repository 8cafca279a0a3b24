"""Quantized KV caches: :class:`QuantizedKVCache` (one head) and :class:`MultiHeadKVCache`.

Token order inside a cache is chronological and made of three regions::

    [ sink tokens | quantized tokens | recent tokens ]
      float32       packed codes       float32
      (or float16)                     (or float16)

Sink tokens (the first ``sink_tokens`` ever appended) are never evicted;
recent tokens (the newest ``residual_tokens``) are quantized when they age
out; the sliding window (``max_tokens``) evicts the oldest non-sink tokens.

The read path never dequantizes: scores rotate each query once and read the
packed key codes through lookup tables; attention outputs accumulate
softmax-weighted value centroids in the rotated domain and rotate back once
per query. Sink and recent tokens are exact rows: the fused kernel returns each
query's log-sum-exp over the coded rows, and the few exact rows are merged
into its softmax.
"""

import dataclasses
import math

import numpy as np

from .._kernels import _core
from .._errors import (CorruptPayloadError, IncompatibleCodesError, IndexOutOfRangeError, InvalidParameterError,
                       LengthMismatchError, NonFiniteError, ShapeError)
from ._config import CacheStats, KVCacheConfig, MultiHeadCacheStats, MultiHeadConfig, QuantStrategy
from ..quant._codec import F32, BlockMSECodec, MSECodec, ProdCodec, check_block
from ..io._persist import Persistent, attribute_copy, config_field, expect, expect_finite
from ..quant._codes import CODES_TYPES
from ..quant._quantizers import TurboQuantMSE, TurboQuantProd
from ._head_codecs import HeadCodecs
from ._row_buffer import RowBuffer
from .._threads import resolve_n_threads
from .._validation import (FLOAT32_MAX, FLOAT_DTYPES, as_array, as_rows, check_all_finite, check_float_dtype,
                           check_int, check_real_dtype)

FULL_PRECISION = np.float32
FLOAT16_MAX = float(np.finfo(np.float16).max)
VALUE_PREFIX = "value."


def _layout_of(codec, prefix):
    layout = {}
    for name, (dtype, width) in codec.spec.row_layout().items():
        layout[prefix + name] = (dtype, () if width is None else (width,))
    return layout


def _unprefixed(codec, views, prefix):
    """A codec's arrays among the buffer's views, under their own names."""
    return {name: views[prefix + name] for name in codec.spec.row_layout()}


def _codes_view(codec, arrays):
    """Trusted codes object over the buffer's live rows."""
    return CODES_TYPES[codec.spec.kind](codec.spec, arrays)


class _DerivedViews:
    """What a codec derives from a buffer's views dict, kept while that dict is
    the buffer's current one (:meth:`RowBuffer.views` returns the same dict
    until the rows change)."""

    __slots__ = ("source", "value")

    def __init__(self):
        self.source = self.value = None

    def __deepcopy__(self, memo):
        return _DerivedViews()

    def get(self, views, derive):
        if views is not self.source:
            self.value = derive(views)
            self.source = views
        return self.value


class _KeyCodec:
    """Key quantization: one codec over all channels, or a main codec plus a
    second one, with more bits, for the outlier channels."""

    def __init__(self, config):
        self.config = config
        n_outliers = config.num_outlier_channels
        self.main = self._codec(config.dim - n_outliers, config.key_bits, config.seed)
        self.outlier = (self._codec(n_outliers, config.outlier_bits, config.seed + 1)
                        if n_outliers else None)
        self.layout = _layout_of(self.main, "main.")
        if self.outlier is not None:
            self.layout.update(_layout_of(self.outlier, "outlier."))
        # The public quantizers over the same codecs.
        self.main_quantizer, self.outlier_quantizer = self._quantizer(self.main), self._quantizer(self.outlier)
        self._views = _DerivedViews()
        self._small = self.outlier is None and isinstance(self.main, (MSECodec, BlockMSECodec))
        self.reset()

    def _codec(self, dim, bits, seed):
        c = self.config
        if c.key_strategy is QuantStrategy.PROD:
            return ProdCodec(dim, bits, seed, c.rotation, c.sketch)
        return _mse_codec(c, dim, bits, seed)

    @staticmethod
    def _quantizer(codec):
        if codec is None:
            return None
        return (TurboQuantProd if isinstance(codec, ProdCodec) else TurboQuantMSE)._of(codec)

    def reset(self):
        """Forget the key center and automatically chosen outlier channels (explicit ones stay)."""
        explicit = self.config.outlier_channels
        self.channels = self.rest = self.center = None
        if isinstance(explicit, tuple):
            self._set_channels(np.array(explicit, dtype=np.intp))

    def _set_channels(self, channels):
        channels = np.sort(channels)
        self.channels = channels
        self.rest = np.setdiff1d(np.arange(self.config.dim), channels)
        for array in (self.channels, self.rest):
            array.setflags(write=False)

    def channels_for(self, first_block):
        """Outlier channels to use, choosing them from ``first_block`` if not chosen yet."""
        if self.outlier is None or self.channels is not None:
            return self.channels
        magnitude = np.mean(np.abs(first_block), axis=0)
        # Stable order: largest magnitude first, ties to the lower channel.
        return np.sort(np.argsort(-magnitude, kind="stable")[: self.config.num_outlier_channels])

    def center_for(self, first_block):
        """The key center to use, taking it from ``first_block`` if not set yet (None when off)."""
        if not self.config.center_keys or self.center is not None:
            return self.center
        center = np.mean(first_block, axis=0, dtype=np.float64).astype(FULL_PRECISION)
        center.setflags(write=False)
        return center

    def encode(self, rows, channels, center, n_threads):
        if center is not None:
            rows = rows - center.astype(rows.dtype)
        if self.outlier is None:
            return _prefixed("main.", self.main.quantize(rows, n_threads, "keys"))
        rest = np.setdiff1d(np.arange(self.config.dim), channels)
        arrays = _prefixed("main.", self.main.quantize(np.ascontiguousarray(rows[:, rest]), n_threads, "keys"))
        arrays.update(_prefixed("outlier.", self.outlier.quantize(
            np.ascontiguousarray(rows[:, channels]), n_threads, "keys")))
        return arrays

    def scores(self, views, queries, n_threads):
        main, outlier = self.arrays(views)
        if outlier is None:
            out = self.main.inner_products(main, queries, n_threads)
        else:
            out = self.main.inner_products(main, np.ascontiguousarray(queries[:, self.rest]), n_threads)
            out += self.outlier.inner_products(outlier, np.ascontiguousarray(queries[:, self.channels]),
                                               n_threads)
        if self.center is not None:
            out += (queries @ self.center.astype(np.float64)).astype(out.dtype)[:, None]
        return out

    def decode(self, views, dtype, n_threads):
        main_arrays, outlier_arrays = self.arrays(views)
        main = self.main.dequantize(main_arrays, dtype, n_threads)
        if outlier_arrays is None:
            out = main
        else:
            out = np.empty((main.shape[0], self.config.dim), dtype=dtype)
            out[:, self.rest] = main
            out[:, self.channels] = self.outlier.dequantize(outlier_arrays, dtype, n_threads)
        if self.center is not None:
            out += self.center.astype(dtype)
        return out

    def small_codes(self, views):
        """``(codec, arrays)`` when every key is one MSE code (plain or block-scaled:
        the multi-head fused float32 attention kernel applies), else None."""
        return (self.main, self.arrays(views)[0]) if self._small else None

    def fused_parts(self, views, queries, rows, n_threads):
        """The quantized keys (``rows`` of them) for ``_core.small_code_attention``
        and (m, dim) float32 ``queries``: ``(first FusedSide, its queries, the
        rotation the kernel applies to them or None, extra key parts)``. A plain
        or block-scaled MSE code is one part; outlier channels and the QJL signs
        of Prod codes add parts, each against its own rotated queries."""
        main, outlier = self.arrays(views)
        if self._small:
            rotation = self.main.small_rotation(queries.shape[0])
            rotated = queries if rotation is not None else self.main.rotate(queries, n_threads)
            return self.main.fused_side(main, rows), rotated, rotation, ()
        parts = []
        for codec, arrays, columns in ((self.main, main, self.rest), (self.outlier, outlier, self.channels)):
            if codec is not None:
                block = queries if columns is None else np.ascontiguousarray(queries[:, columns])
                parts.extend(codec.fused_parts(arrays, rows, block, n_threads))
        (first, first_queries), extra = parts[0], parts[1:]
        return first, first_queries, None, tuple(side.key_part(block) for side, block in extra)

    @property
    def nbytes(self):
        """Bytes of state beside the codes (the key center)."""
        return 0 if self.center is None else self.center.nbytes

    def arrays(self, views):
        """(main arrays, outlier arrays or None) over the quantized region's ``views``."""
        return self._views.get(views, lambda views: (
            _unprefixed(self.main, views, "main."),
            None if self.outlier is None else _unprefixed(self.outlier, views, "outlier.")))

    def codes(self, views):
        """(main codes, outlier codes or None) over the quantized region's ``views``."""
        main, outlier = self.arrays(views)
        return _codes_view(self.main, main), None if outlier is None else _codes_view(self.outlier, outlier)


def _mse_codec(config, dim, bits, seed):
    """The MSE codec of ``config``: block-scaled or the paper's."""
    return (BlockMSECodec if config.block_scales else MSECodec)(dim, bits, seed, config.rotation)


class _ValueCodec:
    """Value quantization with :class:`MSECodec` or :class:`BlockMSECodec`."""

    def __init__(self, config):
        self.codec = _mse_codec(config, config.dim, config.value_bits, config.seed + 2)
        self.quantizer = TurboQuantMSE._of(self.codec)
        self.layout = _layout_of(self.codec, VALUE_PREFIX)
        self._views = _DerivedViews()

    def encode(self, rows, n_threads):
        return _prefixed(VALUE_PREFIX, self.codec.quantize(rows, n_threads, "values"))

    def decode(self, views, dtype, n_threads):
        return self.codec.dequantize(self.arrays(views), dtype, n_threads)

    def weighted_sum(self, views, weights, n_threads):
        arrays = self.arrays(views)
        if isinstance(self.codec, BlockMSECodec):
            return self.codec.weighted_sum(arrays, np.ascontiguousarray(weights, dtype=np.float64), n_threads)
        return self.codec.weighted_sum(arrays["indices"], arrays["norms"], weights, n_threads)

    def small_codes(self, views):
        """``(codec, arrays)`` for the fused float32 attention kernel (every value codec has one)."""
        return self.codec, self.arrays(views)

    def arrays(self, views):
        """Value arrays over the quantized region's ``views``, under their own names."""
        return self._views.get(views, lambda views: _unprefixed(self.codec, views, VALUE_PREFIX))

    def codes(self, views):
        """Value codes over the quantized region's ``views``."""
        return _codes_view(self.codec, self.arrays(views))


class _PendingAppend:
    """Everything an append will change, computed before anything changes."""

    __slots__ = ("sink_keys", "sink_values", "drop_quantized", "key_arrays", "value_arrays", "center",
                 "drop_recent", "recent_keys", "recent_values", "channels", "added")


def _prefixed(prefix, arrays):
    """A codec's arrays named as stored beside the others."""
    return {prefix + name: array for name, array in arrays.items()}


def _skip_rows(views, count):
    """``views`` without its first ``count`` rows (the same dict when ``count`` is 0)."""
    return views if not count else {name: array[count:] for name, array in views.items()}


class _Regions:
    """The three regions' views over the held tokens from ``start`` on."""

    __slots__ = ("sinks", "quantized", "recent", "n_sinks", "n_quantized", "n_recent")

    def __init__(self, cache, start):
        n_sinks, n_quantized, n_recent = len(cache._sinks), len(cache._quantized), len(cache._recent)
        self.sinks, self.quantized, self.recent = (
            cache._sinks.views(), cache._quantized.views(), cache._recent.views())
        if start:
            skip_sinks = min(start, n_sinks)
            skip_quantized = min(max(start - n_sinks, 0), n_quantized)
            skip_recent = max(start - n_sinks - n_quantized, 0)
            self.sinks = _skip_rows(self.sinks, skip_sinks)
            self.quantized = _skip_rows(self.quantized, skip_quantized)
            self.recent = _skip_rows(self.recent, skip_recent)
            n_sinks, n_quantized, n_recent = n_sinks - skip_sinks, n_quantized - skip_quantized, n_recent - skip_recent
        self.n_sinks, self.n_quantized, self.n_recent = n_sinks, n_quantized, n_recent

    @property
    def num_tokens(self):
        return self.n_sinks + self.n_quantized + self.n_recent


def _softmax(logits):
    """Row softmax of a float array, in place."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _check_storable_rows(rows, name, residual_dtype):
    """``rows`` (finite, float32 or float64) when every row can be stored: within
    float16's range when the residual rows are float16, and of a norm that fits
    float32 (NonFiniteError otherwise)."""
    if not rows.size:
        return rows
    high = float(np.abs(rows).max())
    if residual_dtype == np.float16 and high > FLOAT16_MAX:
        raise NonFiniteError(f"{name} has a value beyond float16's range (65504); "
                             "residual_dtype='float16' stores sink and recent tokens as float16")
    # Every token may end up stored as float32 (sink and recent tokens) or
    # with a float32 norm (quantized tokens): refuse what float32 cannot hold.
    if high * math.sqrt(rows.shape[-1]) > FLOAT32_MAX:
        norms = np.linalg.norm(rows.astype(np.float64, copy=False), axis=-1)
        if not np.all(norms <= FLOAT32_MAX):
            raise NonFiniteError(f"{name} has a vector whose norm exceeds the float32 range")
    return rows


def _step_block(array, name, shape, noun):
    """``array`` checked as a real array of ``shape``: other trailing axes raise
    ShapeError, another length of the first LengthMismatchError (naming ``noun``).
    Returns it C-contiguous and finite, float32 kept and other reals as float64."""
    arr = as_array(array, name)
    check_real_dtype(arr, name)
    shape = tuple(shape)
    if arr.ndim != len(shape) or arr.shape[1:] != shape[1:]:
        raise ShapeError(f"{name} has shape {arr.shape}; expected {shape}")
    if arr.shape[0] != shape[0]:
        raise LengthMismatchError(f"{name} has {arr.shape[0]} {noun}; expected {shape[0]}")
    return _finite_floats(arr, name)


def _finite_floats(arr, name):
    """C-contiguous ``arr`` (float32 kept, other reals as float64), checked finite."""
    rows = np.ascontiguousarray(arr, dtype=arr.dtype if arr.dtype in FLOAT_DTYPES else np.float64)
    check_all_finite(rows, name)
    return rows


def _step_query_block(arr, single):
    """Checked real step queries ``arr`` with an axis of one query per head added
    before the last when ``arr.ndim == single``: ``(C-contiguous finite floats, whether added)``."""
    added = arr.ndim == single
    return _finite_floats(arr[..., None, :] if added else arr, "queries"), added


def _push_then_attend(layers, keys, values, queries, scale, n_threads):
    """The per-head path of a decode step of every layer of ``layers`` (multi-head
    caches): every head's append planned before any is committed, then every
    layer's :meth:`MultiHeadKVCache.attention_output_all`, stacked."""
    plans = [[head._prepare_append(k[None, :], v[None, :], n_threads)
              for head, k, v in zip(layer.heads, layer_keys, layer_values)]
             for layer, layer_keys, layer_values in zip(layers, keys, values)]
    for layer, layer_plans in zip(layers, plans):
        for head, plan in zip(layer.heads, layer_plans):
            head._commit(plan)
    return np.stack([layer.attention_output_all(q, scale, n_threads=n_threads) for layer, q in zip(layers, queries)])


def _check_scale(scale, dim):
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise InvalidParameterError(f"scale must be a real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise NonFiniteError(f"scale must be finite, got {scale!r}")
    return float(scale)


class QuantizedKVCache(Persistent):
    """A quantized key/value cache for one attention head.

    Parameters
    ----------
    config : KVCacheConfig
        Settings; see :class:`KVCacheConfig`.

    Notes
    -----
    Keys and values of any finite norm that fits float32 are accepted (norms
    are stored as float32; larger ones raise NonFiniteError). Every method that changes the cache validates all of its input
    first: on any error the cache is left exactly as it was. Sink and recent
    tokens are held as ``config.residual_dtype`` (float32 by default). Heavy methods take ``n_threads`` (see
    :func:`turboquant.resolve_n_threads`); results do not depend on it.
    """

    _kind = "QuantizedKVCache"

    def __init__(self, config):
        if not isinstance(config, KVCacheConfig):
            raise InvalidParameterError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self._keys = _KeyCodec(config)
        self._values = _ValueCodec(config)
        self._residual_dtype = np.dtype(config.residual_dtype)
        full = {"k": (self._residual_dtype, (config.dim,)), "v": (self._residual_dtype, (config.dim,))}
        self._sinks = RowBuffer(full)
        self._recent = RowBuffer(full)
        self._quantized = RowBuffer({**self._keys.layout, **self._values.layout})

    # -- properties ---------------------------------------------------------------
    @property
    def dim(self):
        """Head dimension."""
        return self.config.dim

    @property
    def max_tokens(self):
        """Sliding-window size (0: unlimited)."""
        return self.config.max_tokens

    @property
    def num_tokens(self):
        """Tokens held: sinks, quantized and recent."""
        return len(self._sinks) + len(self._quantized) + len(self._recent)

    def __len__(self):
        return self.num_tokens

    @property
    def key_quantizer(self):
        """The quantizer of the (non-outlier) key channels."""
        return self._keys.main_quantizer

    @property
    def outlier_key_quantizer(self):
        """The quantizer of the outlier key channels, or None."""
        return self._keys.outlier_quantizer

    @property
    def value_quantizer(self):
        """The value quantizer (:class:`TurboQuantMSE`)."""
        return self._values.quantizer

    @property
    def key_center(self):
        """The float32 key center in use (None until chosen, or when ``center_keys`` is off)."""
        return self._keys.center

    @property
    def outlier_channels(self):
        """Indices of the outlier key channels in use (None until chosen, or when disabled)."""
        return self._keys.channels

    def quantized_codes(self):
        """Codes of the quantized region: ``(key codes, outlier key codes or None, value codes)``.

        Read-only views; they keep showing these tokens after later appends.
        """
        views = self._quantized.views()
        main, outlier = self._keys.codes(views)
        return main, outlier, self._values.codes(views)

    # -- writing -------------------------------------------------------------------
    def _rows(self, array, name):
        rows, _ = as_rows(array, self.config.dim, name)
        return _check_storable_rows(rows, name, self._residual_dtype)

    def _check_block(self, keys, values):
        keys_arr, values_arr = as_array(keys, "keys"), as_array(values, "values")
        if keys_arr.ndim != 2 or values_arr.ndim != 2:
            raise ShapeError(
                f"keys and values must be (n, {self.dim}) arrays; got shapes {keys_arr.shape} and {values_arr.shape}")
        if keys_arr.shape[0] != values_arr.shape[0]:
            raise LengthMismatchError(
                f"keys has {keys_arr.shape[0]} rows but values has {values_arr.shape[0]}")
        return self._rows(keys_arr, "keys"), self._rows(values_arr, "values")

    def _prepare_append(self, keys, values, n_threads):
        """Plan and quantize an append without changing the cache (raises on bad input)."""
        c = self.config
        n = keys.shape[0]
        plan = _PendingAppend()
        plan.added = n
        take_sinks = min(c.sink_tokens - len(self._sinks), n)
        plan.sink_keys, plan.sink_values = keys[:take_sinks], values[:take_sinks]
        rest_k, rest_v = keys[take_sinks:], values[take_sinks:]
        if c.residual_tokens:
            # Every non-sink token passes through the recent window before it is
            # quantized, pushed alone or in a block: quantize the rows as stored there.
            rest_k = rest_k.astype(self._residual_dtype).astype(keys.dtype, copy=False)
            rest_v = rest_v.astype(self._residual_dtype).astype(values.dtype, copy=False)
        plan.channels, plan.center = self._keys.channels, self._keys.center
        if n:
            plan.channels = self._keys.channels_for(keys)
            plan.center = self._keys.center_for(keys)

        # Recent window: existing recent rows followed by the new ones; the
        # oldest beyond residual_tokens overflow into the quantized region.
        recent_old = len(self._recent)
        recent_total = recent_old + rest_k.shape[0]
        overflow = max(0, recent_total - c.residual_tokens)
        # Sliding window: evict the oldest non-sink tokens beyond max_tokens.
        total = len(self._sinks) + take_sinks + len(self._quantized) + recent_total
        excess = max(0, total - c.max_tokens) if c.max_tokens else 0
        drop_quantized = min(excess, len(self._quantized))
        drop_overflow = min(excess - drop_quantized, overflow)
        drop_window = excess - drop_quantized - drop_overflow
        plan.drop_quantized = drop_quantized

        # Rows (by position in "old recent ++ new") that get quantized, and that stay recent.
        old_recent = self._recent.views()
        def window_rows(start, stop):
            parts_k, parts_v = [], []
            if start < recent_old:
                parts_k.append(old_recent["k"][start:min(stop, recent_old)])
                parts_v.append(old_recent["v"][start:min(stop, recent_old)])
            if stop > recent_old:
                lo = max(start, recent_old) - recent_old
                parts_k.append(rest_k[lo:stop - recent_old])
                parts_v.append(rest_v[lo:stop - recent_old])
            return parts_k, parts_v

        to_quantize_k, to_quantize_v = window_rows(drop_overflow, overflow)
        keep_start = overflow + drop_window
        plan.drop_recent = min(keep_start, recent_old)
        new_start = max(keep_start, recent_old) - recent_old
        plan.recent_keys, plan.recent_values = rest_k[new_start:], rest_v[new_start:]

        plan.key_arrays = plan.value_arrays = None
        if overflow - drop_overflow > 0:
            # Rows from the float32 window and from the new block, in the block's dtype.
            qk = np.ascontiguousarray(np.concatenate(to_quantize_k), dtype=keys.dtype)
            qv = np.ascontiguousarray(np.concatenate(to_quantize_v), dtype=values.dtype)
            plan.key_arrays = self._keys.encode(qk, plan.channels, plan.center, n_threads)
            plan.value_arrays = self._values.encode(qv, n_threads)
        return plan

    def _commit(self, plan):
        if plan.channels is not None and self._keys.channels is None:
            self._keys._set_channels(np.asarray(plan.channels))
        if plan.center is not None:
            self._keys.center = plan.center
        self._sinks.append({"k": plan.sink_keys, "v": plan.sink_values})
        self._quantized.drop_front(plan.drop_quantized)
        if plan.key_arrays is not None:
            self._quantized.append({**plan.key_arrays, **plan.value_arrays})
        self._recent.drop_front(plan.drop_recent)
        self._recent.append({"k": plan.recent_keys, "v": plan.recent_values})

    def append(self, keys, values, *, n_threads=None):
        """Append a block of tokens.

        Parameters
        ----------
        keys, values : array_like, shape (n, dim)
            Finite real values of any norm; ``n`` may be 0.
        n_threads : int or None, default=None

        Raises
        ------
        ShapeError, LengthMismatchError, NonFiniteError, DTypeError
            On any invalid input; the cache is then unchanged.
        """
        keys, values = self._check_block(keys, values)
        self._commit(self._prepare_append(keys, values, resolve_n_threads(n_threads)))

    def push_token(self, key, value, *, n_threads=None):
        """Append one token: ``key`` and ``value`` of shape (dim,)."""
        key_arr, value_arr = as_array(key, "key"), as_array(value, "value")
        if key_arr.ndim != 1 or value_arr.ndim != 1:
            raise ShapeError(
                f"key and value must be ({self.dim},) vectors; got shapes {key_arr.shape} and {value_arr.shape}")
        keys, values = self._rows(key_arr, "key"), self._rows(value_arr, "value")
        self._commit(self._prepare_append(keys, values, resolve_n_threads(n_threads)))

    def clear(self):
        """Remove every token (and automatically chosen outlier channels)."""
        for buffer in (self._sinks, self._quantized, self._recent):
            buffer.clear()
        self._keys.reset()

    def truncate(self, num_tokens):
        """Keep only the ``num_tokens`` oldest held tokens; drop the newer ones.

        Undoes appends (speculative or assisted decoding reject drafted tokens
        this way). Tokens already evicted by the sliding window do not come
        back, and the recent window may hold fewer than ``residual_tokens``
        tokens until later appends refill it. Truncating to 0 is :meth:`clear`.

        Parameters
        ----------
        num_tokens : int
            ``0 <= num_tokens <= self.num_tokens``.

        Raises
        ------
        InvalidParameterError
            When ``num_tokens`` is not an int in that range; the cache is then unchanged.
        """
        keep = check_int(num_tokens, "num_tokens", low=0, high=self.num_tokens)
        if keep == 0:
            self.clear()
            return
        drop = self.num_tokens - keep
        for buffer in (self._recent, self._quantized, self._sinks):
            count = min(drop, len(buffer))
            buffer.drop_back(count)
            drop -= count

    # -- persistence (see turboquant.io) ----------------------------------------------
    def _payload(self):
        state, arrays = _head_payload(self)
        return {"config": self.config.to_dict(), "state": state}, arrays

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        if set(config) != {"config", "state"}:
            raise CorruptPayloadError("config: expected the keys config and state")
        cache = cls(KVCacheConfig.from_dict(config_field(config, "config", dict)))
        _restore_head(cache, config["state"], arrays, "", mapped)
        return cache

    def _rebuilt(self):
        return {"keys": self._keys.main, "outlier_keys": self._keys.outlier, "values": self._values.codec}

    def copy(self):
        """An independent copy (the immutable quantizers are shared)."""
        return attribute_copy(self)

    # -- reading -------------------------------------------------------------------
    def _queries(self, query):
        return as_rows(query, self.config.dim, "query")

    def _regions(self, start):
        """:class:`_Regions` from held token ``start`` on (checked)."""
        if start.__class__ is not int or start:  # the default 0 needs no check
            start = check_int(start, "start", low=0, high=self.num_tokens)
        return _Regions(self, start)

    def _scores(self, queries, n_threads, regions):
        """(m, regions.num_tokens) raw scores in the queries' dtype, in token order."""
        parts = []
        if regions.n_sinks:
            parts.append(queries @ regions.sinks["k"].T.astype(queries.dtype))
        if regions.n_quantized:
            parts.append(self._keys.scores(regions.quantized, queries, n_threads))
        if regions.n_recent:
            parts.append(queries @ regions.recent["k"].T.astype(queries.dtype))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((queries.shape[0], 0), dtype=queries.dtype)
        return np.concatenate(parts, axis=1)

    def attention_scores(self, query, *, start=0, n_threads=None):
        """Estimated ``<query, key>`` for every cached token, oldest first.

        Parameters
        ----------
        query : array_like, shape (dim,) or (m, dim)
        start : int, default=0
            Score only the held tokens ``start .. num_tokens - 1`` (a left-padded
            row's first real token, say).
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (num_tokens - start,) or (m, num_tokens - start)
            In the query's float dtype; empty when no token is scored.
        """
        queries, was_1d = self._queries(query)
        regions = self._regions(start)
        scores = self._scores(queries, resolve_n_threads(n_threads), regions)
        return scores[0] if was_1d else scores

    def attention_weights(self, query, scale=None, *, start=0, n_threads=None):
        """``softmax(scale * attention_scores(query, start=start))``.

        In the query's float dtype, shape (num_tokens - start,) or
        (m, num_tokens - start); the weights of every query sum to 1.
        """
        queries, was_1d = self._queries(query)
        scale = _check_scale(scale, self.dim)
        weights = self._weights(queries, scale, resolve_n_threads(n_threads), self._regions(start))
        return weights[0] if was_1d else weights

    def _weights(self, queries, scale, n_threads, regions):
        """(m, regions.num_tokens) softmax of the scaled scores, in the queries' dtype."""
        if not regions.num_tokens:
            return np.empty((queries.shape[0], 0), dtype=queries.dtype)
        scores = self._scores(queries, n_threads, regions)
        scores *= scale
        return _softmax(scores)

    def attention_output(self, query, scale=None, *, start=0, n_threads=None):
        """Attention of the query over the cache: ``softmax(scale * scores) @ values``.

        Parameters
        ----------
        query : array_like, shape (dim,) or (m, dim)
        scale : float or None, default=None
            Multiplies the scores before the softmax; ``None`` means
            ``1/sqrt(dim)`` (PyTorch's ``scaled_dot_product_attention``).
        start : int, default=0
            Attend only to the held tokens ``start .. num_tokens - 1``; the
            older ones are never read (padding, for a left-padded batch row).
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (dim,) or (m, dim)
            In the query's float dtype; zeros when no token is attended to.
        """
        queries, was_1d = self._queries(query)
        scale = _check_scale(scale, self.dim)
        regions = self._regions(start)
        n_threads = resolve_n_threads(n_threads)
        out = self._fused_output(queries, scale, n_threads, regions)
        if out is None:
            out = self._weighted_values(queries, scale, n_threads, regions)
        out = out.astype(queries.dtype, copy=False)
        return out[0] if was_1d else out

    def _weighted_values(self, queries, scale, n_threads, regions):
        """(m, dim) float64 ``softmax(scale * scores) @ values`` over the three regions."""
        n_sinks, n_quant, n_recent = regions.n_sinks, regions.n_quantized, regions.n_recent
        if n_sinks + n_quant + n_recent == 0:
            return np.zeros((queries.shape[0], self.dim))
        weights = self._weights(queries, scale, n_threads, regions)
        if n_quant:
            block = weights if n_quant == weights.shape[1] else np.ascontiguousarray(
                weights[:, n_sinks:n_sinks + n_quant])
            out = self._values.weighted_sum(regions.quantized, block, n_threads)
        else:
            out = np.zeros((queries.shape[0], self.dim))
        if n_sinks:
            out += weights[:, :n_sinks] @ regions.sinks["v"]
        if n_recent:
            out += weights[:, n_sinks + n_quant:] @ regions.recent["v"]
        return out

    def _small_codes(self, queries, regions=None):
        """``((key codec, key arrays), (value codec, value arrays))`` when the
        fused float32 kernel applies: float32 ``queries`` and the quantized tokens
        of ``regions`` (default: every held token), at least one, coded with MSE
        codes (plain or block-scaled, any width) and no
        outlier channels; else None. Sink and recent tokens are merged after the
        kernel (:func:`_merge_exact_rows`)."""
        if regions is None:
            regions = _Regions(self, 0)
        if not self._fused_applies(queries, regions):
            return None
        keys = self._keys.small_codes(regions.quantized)
        values = self._values.small_codes(regions.quantized)
        return None if keys is None or values is None else (keys, values)

    def _fused_applies(self, queries, regions):
        """Whether :meth:`_fused_output` serves ``queries`` over ``regions``: float32
        queries and at least one quantized token (every code has fused kernels)."""
        return queries.dtype == np.float32 and regions.n_quantized > 0

    def _exact_rows(self, regions):
        """``(keys, values)`` of the sink and recent tokens of ``regions`` as float32 (None when none)."""
        if not regions.n_sinks + regions.n_recent:
            return None
        parts = [r for r, count in ((regions.sinks, regions.n_sinks), (regions.recent, regions.n_recent)) if count]
        if len(parts) == 1:
            return tuple(parts[0][name].astype(FULL_PRECISION, copy=False) for name in ("k", "v"))
        return tuple(np.concatenate([part[name] for part in parts]).astype(FULL_PRECISION, copy=False)
                     for name in ("k", "v"))

    def _fused_output(self, queries, scale, n_threads, regions):
        """The (m, dim) float32 output of the fused float32 kernel, or None where it
        does not apply."""
        if not self._fused_applies(queries, regions):
            return None
        m, n = queries.shape[0], regions.n_quantized
        value_codec = self._values.codec
        keys, rotated, key_rotation, extra_keys = self._keys.fused_parts(regions.quantized, queries, n, n_threads)
        values = value_codec.fused_side(self._values.arrays(regions.quantized), n)
        exact = self._exact_rows(regions)
        # Dense rotations of a few queries run inside the kernel (same bits).
        value_rotation = value_codec.small_rotation(m, inverse=True)
        check_block(rotated, "queries", rows=m, dtypes=(F32,))
        out = np.empty((m, self.dim), dtype=np.float32)
        lse = np.empty(m, dtype=np.float32) if exact is not None else None
        _core.small_code_attention(
            keys.codes, keys.bits, keys.centroids, keys.norms, values.codes, values.bits, values.centroids,
            values.norms, rotated, key_rotation, value_rotation, scale, out, n_threads,
            key_block_scales=keys.block_scales, key_factors=keys.factors,
            value_block_scales=values.block_scales, value_factors=values.factors, lse=lse,
            extra_keys=extra_keys)
        if value_rotation is None:
            out = value_codec.unrotate(out, n_threads)
        if exact is None:
            return out
        center = self._keys.center
        return _merge_exact_rows(out, lse, queries, *exact, scale,
                                 None if center is None else center[None, :])

    def _reconstruct(self, which, dtype, n_threads):
        dtype = check_float_dtype(dtype)
        n_threads = resolve_n_threads(n_threads)
        parts = [self._sinks.views()[which].astype(dtype)]
        if len(self._quantized):
            views = self._quantized.views()
            if which == "k":
                parts.append(self._keys.decode(views, dtype, n_threads))
            else:
                parts.append(self._values.decode(views, dtype, n_threads))
        parts.append(self._recent.views()[which].astype(dtype))
        return np.concatenate(parts, axis=0)

    def reconstruct_keys(self, *, dtype=np.float64, n_threads=None):
        """Keys as the cache holds them, dequantized: (num_tokens, dim), oldest first."""
        return self._reconstruct("k", dtype, n_threads)

    def reconstruct_values(self, *, dtype=np.float64, n_threads=None):
        """Values as the cache holds them, dequantized: (num_tokens, dim), oldest first."""
        return self._reconstruct("v", dtype, n_threads)

    # -- accounting ----------------------------------------------------------------
    def stats(self):
        """Byte-exact memory accounting (:class:`CacheStats`)."""
        c = self.config
        views = self._quantized.views()
        value_bytes = sum(array.nbytes for array in self._values.arrays(views).values())
        key_bytes = sum(array.nbytes for array in views.values()) - value_bytes + self._keys.nbytes
        for buffer in (self._sinks, self._recent):
            full = buffer.views()
            key_bytes += full["k"].nbytes
            value_bytes += full["v"].nbytes
        n = self.num_tokens
        total = key_bytes + value_bytes
        uncompressed = n * c.dim * 4 * 2
        per_channel = 8.0 / (n * c.dim) if n else 0.0
        return CacheStats(
            num_tokens=n, dim=c.dim, key_bits=c.key_bits, value_bits=c.value_bits,
            key_strategy=c.key_strategy, key_bytes=key_bytes, value_bytes=value_bytes,
            total_bytes=total, uncompressed_bytes=uncompressed,
            compression_ratio=uncompressed / total if total else 0.0,
            quantized_tokens=len(self._quantized),
            full_precision_tokens=len(self._sinks) + len(self._recent),
            key_bits_per_channel=key_bytes * per_channel,
            value_bits_per_channel=value_bytes * per_channel,
        )

    def __repr__(self):
        c = self.config
        extras = "".join(
            f", {name}={getattr(c, name)}" for name in ("max_tokens", "sink_tokens", "residual_tokens")
            if getattr(c, name))
        if c.center_keys:
            extras += ", center_keys=True"
        if c.num_outlier_channels:
            extras += f", outlier_channels={c.num_outlier_channels}@{c.outlier_bits}b"
        return (f"QuantizedKVCache(dim={c.dim}, tokens={self.num_tokens}, key={c.key_strategy.value}"
                f"@{c.key_bits}b, value=mse@{c.value_bits}b{extras})")



# -- persistence of a head's state (QuantizedKVCache; MultiHeadKVCache and the batch use it per head) --

def _head_payload(cache, prefix=""):
    """``(state, arrays)`` of one head: which learned parts are set, and every array."""
    keys = cache._keys
    state = {"center": keys.center is not None, "channels": keys.channels is not None}
    arrays = {}
    if keys.center is not None:
        arrays[prefix + "key_center"] = keys.center
    if keys.channels is not None:
        arrays[prefix + "outlier_channels"] = keys.channels.astype(np.int64)
    for region, buffer in (("sinks.", cache._sinks), ("recent.", cache._recent), ("quantized.", cache._quantized)):
        for name, array in buffer.views().items():
            arrays[prefix + region + name] = array
    return state, arrays


def _restore_head(cache, state, arrays, prefix, mapped):
    """Put a head's saved state (checked here) into the fresh ``cache``."""
    config, keys = cache.config, cache._keys
    if not isinstance(state, dict) or set(state) != {"center", "channels"} or \
            not all(isinstance(value, bool) for value in state.values()):
        raise CorruptPayloadError(f"config.{prefix}state: expected the flags center and channels")
    expected = set()
    if state["center"]:
        if not config.center_keys:
            raise CorruptPayloadError(f"arrays[{prefix + 'key_center'!r}]: the config does not center keys")
        center = expect_finite(expect(arrays, prefix + "key_center", FULL_PRECISION, (config.dim,)),
                               prefix + "key_center")
        expected.add(prefix + "key_center")
    if state["channels"]:
        name = prefix + "outlier_channels"
        channels = expect(arrays, name, np.int64, (config.num_outlier_channels,))
        if keys.outlier is None or len(np.unique(channels)) != len(channels) or \
                (channels < 0).any() or (channels >= config.dim).any():
            raise CorruptPayloadError(f"arrays[{name!r}]: not distinct channels of the config")
        explicit = config.outlier_channels
        if isinstance(explicit, tuple) and sorted(explicit) != sorted(channels.tolist()):
            raise CorruptPayloadError(f"arrays[{name!r}]: differs from the config's outlier channels")
        expected.add(name)
    regions = {}
    for region, buffer in (("sinks.", cache._sinks), ("recent.", cache._recent), ("quantized.", cache._quantized)):
        rows = None
        part = {}
        for name, (dtype, shape) in buffer.layout.items():
            key = prefix + region + name
            array = expect(arrays, key, dtype, (rows,) + shape)
            rows = array.shape[0]
            part[name] = array
            expected.add(key)
        if region != "quantized.":
            for name, array in part.items():
                expect_finite(array, prefix + region + name)
        regions[region] = (buffer, part, rows)
    # The codes of the quantized region: every part checked as codes of its codec.
    quantized = regions["quantized."][1]
    for codec, codec_prefix in ((keys.main, "main."), (keys.outlier, "outlier."),
                                (cache._values.codec, VALUE_PREFIX)):
        if codec is not None:
            CODES_TYPES[codec.spec.kind]._checked(
                codec.spec, {name[len(codec_prefix):]: array for name, array in quantized.items()
                             if name.startswith(codec_prefix)}, copy=False)
    extra = {name for name in arrays if name.startswith(prefix)} - expected
    if extra:
        raise CorruptPayloadError(f"arrays: unexpected {sorted(extra)}")
    n_sinks, n_recent = regions["sinks."][2], regions["recent."][2]
    if n_sinks > config.sink_tokens or n_recent > config.residual_tokens:
        raise CorruptPayloadError(f"arrays[{prefix + 'sinks.k'!r}]: more sink or recent tokens than the config holds")
    if state["center"]:
        center = center if mapped else center.copy()
        center.setflags(write=False)
        keys.center = center
    if state["channels"]:
        keys._set_channels(np.array(channels, dtype=np.intp))
    for buffer, part, rows in regions.values():
        # Capacity equal to the rows: the first append copies them (copy-on-write).
        buffer._set_storage({name: array if mapped else array.copy() for name, array in part.items()}, rows)


class _LayerDims:
    """The shape of a layer, read off ``self.config`` (a :class:`MultiHeadConfig`)."""

    @property
    def num_heads(self):
        """Number of KV heads (of every row, in a batch)."""
        return self.config.num_heads

    @property
    def num_query_heads(self):
        """Number of query heads (a multiple of ``num_heads``)."""
        return self.config.num_query_heads

    @property
    def head_dim(self):
        """Dimension of every head."""
        return self.config.head_config.dim


class MultiHeadKVCache(_LayerDims, Persistent):
    """Quantized KV caches for every KV head of a layer, with grouped-query attention.

    Parameters
    ----------
    config : MultiHeadConfig

    Notes
    -----
    KV head ``h`` uses seed ``head_config.seed + 1000 h``. Queries are given
    per query head: ``(num_query_heads, dim)`` or ``(num_query_heads, m, dim)``;
    KV head ``h`` serves query heads ``h*g .. h*g + g - 1``.
    """

    _kind = "MultiHeadKVCache"

    def __init__(self, config):
        if not isinstance(config, MultiHeadConfig):
            raise InvalidParameterError(f"config must be a MultiHeadConfig, got {type(config).__name__}")
        self.config = config
        base = config.head_config
        self._heads = tuple(
            QuantizedKVCache(_replace_seed(base, config.head_seed(h))) for h in range(config.num_heads))
        self._step_sides = None  # (keys, values) HeadCodecs of the fast decode step, made by the first step

    @property
    def num_tokens(self):
        """Tokens held (the same in every head)."""
        return self._heads[0].num_tokens

    def __len__(self):
        return self.num_tokens

    def head(self, index):
        """The :class:`QuantizedKVCache` of KV head ``index`` (IndexError when out of range)."""
        index = check_int(index, "head index")
        if not 0 <= index < self.num_heads:
            raise IndexOutOfRangeError(f"head {index} is out of range for {self.num_heads} heads")
        return self._heads[index]

    @property
    def heads(self):
        """Tuple of the per-KV-head :class:`QuantizedKVCache` objects."""
        return self._heads

    def _head_blocks(self, array, name):
        if isinstance(array, (list, tuple)):
            array = [as_array(block, name) for block in array]
            shapes = {block.shape for block in array}
            if len(shapes) > 1:
                raise LengthMismatchError(
                    f"{name} has per-head blocks of different shapes {sorted(shapes)}; "
                    f"every head needs the same (n, {self.head_dim})")
        arr = as_array(array, name)
        if arr.ndim != 3:
            raise ShapeError(f"{name} has shape {arr.shape}; expected ({self.num_heads}, n, {self.head_dim})")
        if arr.shape[0] != self.num_heads:
            raise LengthMismatchError(f"{name} has {arr.shape[0]} heads; expected {self.num_heads}")
        return arr

    def append_all(self, keys, values, *, n_threads=None):
        """Append ``(num_heads, n, head_dim)`` keys and values to every head.

        Every head's input is validated and quantized before any head changes.
        """
        keys, values = self._head_blocks(keys, "keys"), self._head_blocks(values, "values")
        if keys.shape[1] != values.shape[1]:
            raise LengthMismatchError(f"keys have {keys.shape[1]} tokens but values have {values.shape[1]}")
        n_threads = resolve_n_threads(n_threads)
        plans = []
        for head, k, v in zip(self._heads, keys, values):
            k_rows, v_rows = head._check_block(k, v)
            plans.append(head._prepare_append(k_rows, v_rows, n_threads))
        for head, plan in zip(self._heads, plans):
            head._commit(plan)

    def push_token_all(self, keys, values, *, n_threads=None):
        """Append one token to every head: ``(num_heads, head_dim)`` keys and values."""
        keys, values = as_array(keys, "keys"), as_array(values, "values")
        if keys.ndim != 2 or values.ndim != 2:
            raise ShapeError(
                f"keys and values must be ({self.num_heads}, {self.head_dim}); got {keys.shape} and {values.shape}")
        self.append_all(keys[:, None, :], values[:, None, :], n_threads=n_threads)

    def step(self, keys, values, queries, scale=None, *, n_threads=None):
        """One decode step: append a token to every head, then attend with every query head.

        The same as :meth:`push_token_all` followed by :meth:`attention_output_all`
        over the whole cache (the new token included), in one call that
        validates its inputs once. With float32 inputs, MSE keys and values
        (plain or block-scaled, keys without outlier channels) and once the
        sink tokens are in, the
        token is coded for every head with one kernel call over the heads
        (its own rotation each, the bits the per-head path gives) and every
        head attends in one call of the multi-head fused kernel; other
        configurations take the per-head path.

        Parameters
        ----------
        keys, values : array_like, shape (num_heads, head_dim)
            The new token of every KV head: finite real values (float32 stays
            float32, other real dtypes become float64), of a norm that fits
            float32, within float16's range when ``residual_dtype`` is float16.
        queries : array_like, shape (num_query_heads, head_dim) or (num_query_heads, m, head_dim)
            Finite real queries; query head ``q`` attends over KV head ``q // g``.
        scale : float or None, default=None
            Multiplies the scores before the softmax; ``None`` means ``1/sqrt(head_dim)``.
        n_threads : int or None, default=None
            See :func:`turboquant.resolve_n_threads`; results do not depend on it.

        Returns
        -------
        ndarray, shape (num_query_heads, head_dim) or (num_query_heads, m, head_dim)
            float32 for float32 queries, else float64; what
            :meth:`attention_output_all` returns after the push.

        Raises
        ------
        ShapeError, LengthMismatchError, DTypeError, NonFiniteError, InvalidParameterError
            On any invalid input (shapes, dtypes, NaN or infinity, values beyond
            float16 or float32, a bad ``scale`` or ``n_threads``); every head is
            then unchanged.
        """
        n_threads = resolve_n_threads(n_threads)
        scale = _check_scale(scale, self.head_dim)
        keys, values = self._token_rows(keys, "keys"), self._token_rows(values, "values")
        queries, was_2d = self._step_queries(queries)
        out = self._fast_step(keys, values, queries, scale, n_threads)
        if out is None:
            out = _push_then_attend([self], keys[None], values[None], queries[None], scale, n_threads)[0]
        return out[:, 0, :] if was_2d else out

    def _token_rows(self, array, name):
        """One token per KV head, checked: a C-contiguous (num_heads, head_dim) float array."""
        rows = _step_block(array, name, (self.num_heads, self.head_dim), "heads")
        return _check_storable_rows(rows, name, self._heads[0]._residual_dtype)

    def _step_queries(self, queries):
        """Checked C-contiguous (num_query_heads, m, head_dim) float queries and whether they were 2-d."""
        arr = as_array(queries, "queries")
        check_real_dtype(arr, "queries")
        if arr.ndim not in (2, 3) or arr.shape[0] != self.num_query_heads or arr.shape[-1] != self.head_dim:
            raise ShapeError(
                f"queries has shape {arr.shape}; expected ({self.num_query_heads}, {self.head_dim}) "
                f"or ({self.num_query_heads}, m, {self.head_dim})")
        return _step_query_block(arr, 2)

    def _sides(self):
        """(keys, values) :class:`HeadCodecs` of the fast step, either None where it does not apply."""
        if self._step_sides is None:
            self._step_sides = _step_sides(self._heads)
        return self._step_sides

    def _fast_step(self, keys, values, queries, scale, n_threads):
        """:meth:`step` for float32 inputs over fused-kernel codes with every sink
        token in and at least one coded token after the push: the (num_query_heads,
        m, head_dim) float32 outputs, or None (nothing changed) where it does not apply."""
        out = _fast_steps([self], self._sides(), keys[None], values[None], queries[None], scale, n_threads)
        return None if out is None else out[0]

    def _grouped_queries(self, queries):
        arr = as_array(queries, "queries")
        if arr.ndim not in (2, 3) or arr.shape[0] != self.num_query_heads:
            raise ShapeError(
                f"queries has shape {arr.shape}; expected ({self.num_query_heads}, {self.head_dim}) "
                f"or ({self.num_query_heads}, m, {self.head_dim})")
        was_2d = arr.ndim == 2
        if was_2d:
            arr = arr[:, None, :]
        g, m = self.config.group_size, arr.shape[1]
        # Validate every head's block before computing anything.
        blocks = [as_rows(arr[h * g:(h + 1) * g].reshape(g * m, arr.shape[2]), self.head_dim, "queries")[0]
                  for h in range(self.num_heads)]
        return blocks, g, m, was_2d

    def _per_head(self, queries, compute):
        blocks, g, m, was_2d = self._grouped_queries(queries)
        results = [compute(head, block) for head, block in zip(self._heads, blocks)]
        width = results[0].shape[1]
        out = np.stack([r.reshape(g, m, width) for r in results]).reshape(self.num_query_heads, m, width)
        return out[:, 0, :] if was_2d else out

    def attention_scores_all(self, queries, *, start=0, n_threads=None):
        """Scores of every query head over its KV head's tokens from ``start`` on.

        Returns
        -------
        ndarray, shape (num_query_heads, num_tokens - start) or (num_query_heads, m, num_tokens - start)
        """
        n_threads = resolve_n_threads(n_threads)
        start = check_int(start, "start", low=0, high=self.num_tokens)
        return self._per_head(queries, lambda head, q: head.attention_scores(q, start=start, n_threads=n_threads))

    def attention_output_all(self, queries, scale=None, *, start=0, n_threads=None):
        """Attention output of every query head over the tokens ``start .. num_tokens - 1``.

        Returns
        -------
        ndarray, shape (num_query_heads, head_dim) or (num_query_heads, m, head_dim)
        """
        n_threads = resolve_n_threads(n_threads)
        scale_value = _check_scale(scale, self.head_dim)
        start = check_int(start, "start", low=0, high=self.num_tokens)
        fused = self._fused_output_all(queries, scale_value, n_threads, start)
        if fused is not None:
            return fused
        return self._per_head(
            queries, lambda head, q: head.attention_output(q, scale, start=start, n_threads=n_threads))

    def _fused_output_all(self, queries, scale, n_threads, start):
        """Every head's output from one call of the fused float32 kernel (heads in
        parallel), or None where it does not apply to every head."""
        blocks, g, m, was_2d = self._grouped_queries(queries)
        regions = [_Regions(head, start) for head in self._heads]
        small = [head._small_codes(block, r) for head, block, r in zip(self._heads, blocks, regions)]
        if any(item is None for item in small):
            return None
        rows, n = blocks[0].shape[0], regions[0].n_quantized
        # Every head's checked operands; the codecs of all heads differ only in
        # their seeds, so bits, centroids and factors are shared.
        keys = [codec.fused_side(arrays, n) for (codec, arrays), _ in small]
        values = [codec.fused_side(arrays, n) for _, (codec, arrays) in small]
        key_codecs = [codec for (codec, _), _ in small]
        value_codecs = [codec for _, (codec, _) in small]
        key_rotations = _head_rotations([codec.small_rotation(rows) for codec in key_codecs])
        value_rotations = _head_rotations([codec.small_rotation(rows, inverse=True) for codec in value_codecs])
        rotated = blocks if key_rotations is not None else [
            codec.rotate(block, n_threads) for codec, block in zip(key_codecs, blocks)]
        rotated = np.stack([check_block(block, "queries", width=self.head_dim, rows=rows, dtypes=(F32,))
                            for block in rotated])
        exact = [head._exact_rows(r) for head, r in zip(self._heads, regions)]
        out = np.empty((len(blocks), rows, self.head_dim), dtype=np.float32)
        lse = np.empty((len(blocks), rows), dtype=np.float32) if exact[0] is not None else None
        k0, v0 = keys[0], values[0]
        _core.small_code_attention_heads(
            _addresses([k.codes for k in keys]), _addresses([k.norms for k in keys]),
            key_codecs[0].row_bytes, k0.bits, k0.centroids,
            _addresses([v.codes for v in values]), _addresses([v.norms for v in values]),
            value_codecs[0].row_bytes, v0.bits, v0.centroids,
            n, rotated, key_rotations, value_rotations, scale, out, n_threads,
            key_block_scales=None if k0.block_scales is None else _addresses([k.block_scales for k in keys]),
            key_block_bytes=0 if k0.block_scales is None else k0.block_scales.shape[1], key_factors=k0.factors,
            value_block_scales=None if v0.block_scales is None else _addresses([v.block_scales for v in values]),
            value_block_bytes=0 if v0.block_scales is None else v0.block_scales.shape[1],
            value_factors=v0.factors, lse=lse)
        if value_rotations is None:
            out = np.stack([codec.unrotate(head_out, n_threads) for codec, head_out in zip(value_codecs, out)])
        if lse is not None:
            centers = [head.key_center for head in self._heads]
            out = _merge_exact_rows(out, lse, np.stack(blocks), np.stack([e[0] for e in exact]),
                                    np.stack([e[1] for e in exact]), scale,
                                    None if centers[0] is None else np.stack(centers)[:, None, :])
        outputs = out.reshape(self.num_query_heads, m, self.head_dim)
        return outputs[:, 0, :] if was_2d else outputs

    def concat_outputs(self, outputs):
        """Concatenate per-query-head outputs: ``(H, dim)`` -> ``(H*dim,)``, ``(H, m, dim)`` -> ``(m, H*dim)``."""
        arr = as_array(outputs, "outputs")
        check_real_dtype(arr, "outputs")
        heads = self.num_query_heads
        if arr.ndim not in (2, 3) or arr.shape[0] != heads or arr.shape[-1] != self.head_dim:
            raise LengthMismatchError(
                f"outputs has shape {arr.shape}; expected ({heads}, {self.head_dim}) or ({heads}, m, {self.head_dim})")
        if arr.ndim == 2:
            return arr.reshape(heads * self.head_dim)
        return np.ascontiguousarray(arr.transpose(1, 0, 2)).reshape(arr.shape[1], heads * self.head_dim)

    def reconstruct_keys_all(self, *, dtype=np.float64, n_threads=None):
        """(num_heads, num_tokens, head_dim) dequantized keys."""
        return np.stack([h.reconstruct_keys(dtype=dtype, n_threads=n_threads) for h in self._heads])

    def reconstruct_values_all(self, *, dtype=np.float64, n_threads=None):
        """(num_heads, num_tokens, head_dim) dequantized values."""
        return np.stack([h.reconstruct_values(dtype=dtype, n_threads=n_threads) for h in self._heads])

    def stats(self):
        """Totals and per-head :class:`CacheStats` (:class:`MultiHeadCacheStats`)."""
        head_stats = tuple(h.stats() for h in self._heads)
        total = sum(s.total_bytes for s in head_stats)
        uncompressed = sum(s.uncompressed_bytes for s in head_stats)
        return MultiHeadCacheStats(
            num_heads=self.num_heads, num_tokens=self.num_tokens, head_dim=self.head_dim,
            total_bytes=total, uncompressed_bytes=uncompressed,
            compression_ratio=uncompressed / total if total else 0.0, head_stats=head_stats)

    def clear(self):
        """Remove every token from every head."""
        for head in self._heads:
            head.clear()

    def truncate(self, num_tokens):
        """Keep only the ``num_tokens`` oldest tokens of every head (see
        :meth:`QuantizedKVCache.truncate`); checked before any head changes."""
        keep = check_int(num_tokens, "num_tokens", low=0, high=self.num_tokens)
        for head in self._heads:
            head.truncate(keep)

    # -- persistence (see turboquant.io) ----------------------------------------------
    def _payload(self):
        states, arrays = _layer_payload(self)
        return {"config": self.config.to_dict(), "heads": states}, arrays

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        if set(config) != {"config", "heads"}:
            raise CorruptPayloadError("config: expected the keys config and heads")
        layer = cls(MultiHeadConfig.from_dict(config_field(config, "config", dict)))
        _restore_layer(layer, config["heads"], arrays, "", mapped)
        return layer

    def _rebuilt(self):
        return {f"head{h}.{name}": codec for h, head in enumerate(self._heads)
                for name, codec in head._rebuilt().items()}

    def copy(self):
        """An independent copy of every head (the immutable quantizers are shared)."""
        return attribute_copy(self)

    def __repr__(self):
        c = self.config
        return (f"MultiHeadKVCache(kv_heads={c.num_heads}, query_heads={c.num_query_heads}, "
                f"head_dim={self.head_dim}, tokens={self.num_tokens}, head={self._heads[0]!r})")


def _step_sides(heads):
    """(keys, values) :class:`HeadCodecs` over ``heads`` (caches of one config), either None
    where the multi-head kernels do not serve them."""
    keys = HeadCodecs.of([head._keys.main for head in heads], "main.") if heads[0]._keys._small else None
    return keys, HeadCodecs.of([head._values.codec for head in heads], VALUE_PREFIX)


def _fast_steps(layers, sides, keys, values, queries, scale, n_threads):
    """A decode step of every layer of ``layers`` (multi-head caches of one config,
    possibly of different lengths) in one encode and one attention kernel call.

    ``sides`` are the layers' heads' :class:`HeadCodecs` (layer-major); ``keys``
    and ``values`` checked (layers, heads, d) arrays, ``queries`` checked
    (layers, query heads, m, d). Returns the (layers, query heads, m, d) float32
    outputs, or None (nothing changed) unless every input is float32, the codes
    are the fused kernels', every layer holds its sink tokens and as many recent
    tokens as the others, and every layer has a coded token after the push.
    """
    key_side, value_side = sides
    if (key_side is None or value_side is None or keys.dtype != F32 or values.dtype != F32
            or queries.dtype != F32):
        return None
    c = layers[0].config.head_config
    n_recent = len(layers[0]._heads[0]._recent)
    window = c.residual_tokens
    overflow = n_recent + 1 > window
    evictions, lengths = [], []
    for layer in layers:
        first = layer._heads[0]
        n_sinks, n_coded = len(first._sinks), len(first._quantized)
        if n_sinks != c.sink_tokens or len(first._recent) != n_recent:
            return None
        for head in layer._heads:
            if (len(head._sinks) != n_sinks or len(head._quantized) != n_coded or len(head._recent) != n_recent
                    or (c.center_keys and head._keys.center is None)):
                return None
        # The token joins the recent window, whose oldest row (or, without a
        # window, the token itself) is coded; the sliding window drops the
        # oldest coded rows.
        total = n_sinks + n_coded + n_recent + 1
        evict = max(0, total - c.max_tokens) if c.max_tokens else 0
        if evict > n_coded or n_coded - evict + overflow == 0:
            return None
        evictions.append(evict)
        lengths.append(n_coded - evict + overflow)
    heads = [head for layer in layers for head in layer._heads]
    d = c.dim
    grouped = queries.reshape(len(heads), -1, d)
    if key_side.block == 0 and not (key_side.rotates_in_kernel(grouped.shape[1])
                                    and value_side.rotates_in_kernel(grouped.shape[1])):
        return None

    # Everything that can fail, before any head changes.
    centers = np.stack([head._keys.center for head in heads]) if c.center_keys else None
    coded = None
    if overflow:
        if window:
            coded_keys = np.stack([head._recent.live("k")[0] for head in heads]).astype(F32)
            coded_values = np.stack([head._recent.live("v")[0] for head in heads]).astype(F32)
        else:
            coded_keys, coded_values = keys.reshape(len(heads), d), values.reshape(len(heads), d)
        if centers is not None:
            coded_keys = coded_keys - centers
        coded = key_side.encode(coded_keys, n_threads, "keys")
        coded.update(value_side.encode(coded_values, n_threads, "values"))
    if window:
        residual = heads[0]._residual_dtype
        recent = {"k": keys.reshape(len(heads), d).astype(residual, copy=False),
                  "v": values.reshape(len(heads), d).astype(residual, copy=False)}

    per_layer = layers[0].num_heads
    for index, head in enumerate(heads):
        head._quantized.drop_front(evictions[index // per_layer])
        if coded is not None:
            head._quantized.append_one(coded, index)
        if window:
            head._recent.drop_front(int(overflow))
            head._recent.append_one(recent, index)
    lengths = np.repeat(np.array(lengths, dtype=np.intp), per_layer)
    out = _fast_attention(heads, key_side, value_side, grouped, lengths, scale, n_threads, centers)
    return out.reshape(queries.shape)


def _fast_attention(heads, key_side, value_side, grouped, lengths, scale, n_threads, centers):
    """The (heads, rows, d) float32 attention of checked float32 (heads, rows, d)
    queries ``grouped`` over every token of ``heads``, ``lengths`` (heads,) coded
    rows each (at least one somewhere), in one fused kernel call; every head holds
    as many sink and recent tokens as the others."""
    coded = [head._quantized for head in heads]
    key_codes, key_norms, key_blocks, key_keep = key_side.fused_operands(coded)
    value_codes, value_norms, value_blocks, value_keep = value_side.fused_operands(coded)
    if key_side.block == 0:
        rotated, key_rotations, value_rotations = grouped, key_side.forward, value_side.backward
    else:
        rotated, key_rotations, value_rotations = key_side.rotate(grouped, n_threads), None, None
    n_exact = len(heads[0]._sinks) + len(heads[0]._recent)
    out = np.empty(grouped.shape, dtype=np.float32)
    lse = np.empty(grouped.shape[:2], dtype=np.float32) if n_exact else None
    common = (key_codes, key_norms, key_side.row_bytes, key_side.bits, key_side.centroids,
              value_codes, value_norms, value_side.row_bytes, value_side.bits, value_side.centroids)
    options = dict(key_block_scales=key_blocks, key_block_bytes=key_side.block_bytes, key_factors=key_side.factors,
                   value_block_scales=value_blocks, value_block_bytes=value_side.block_bytes,
                   value_factors=value_side.factors, lse=lse)
    if (lengths == lengths[0]).all():
        _core.small_code_attention_heads(*common, int(lengths[0]), rotated, key_rotations, value_rotations,
                                         scale, out, n_threads, **options)
    else:
        _core.small_code_attention_ragged(*common, lengths, rotated, key_rotations, value_rotations,
                                          scale, out, n_threads, **options)
    del key_keep, value_keep  # what the norm addresses pointed into, kept alive until here
    if value_rotations is None:
        out = value_side.rotate(out, n_threads, inverse=True)
    if n_exact:
        regions = [buffers for buffers in ([head._sinks for head in heads], [head._recent for head in heads])
                   if len(buffers[0])]
        exact = [np.concatenate([np.stack([buffer.live(name) for buffer in buffers]) for buffers in regions],
                                axis=1, dtype=FULL_PRECISION) for name in ("k", "v")]
        out = _merge_exact_rows(out, lse, grouped, exact[0], exact[1], scale,
                                None if centers is None else centers[:, None, :])
    return out


def _merge_exact_rows(out, lse, queries, keys, values, scale, center):
    """Softmax attention over coded rows and exact rows together (``_core.merge_exact_rows``).

    ``out`` (..., m, d) and ``lse`` (..., m) are the fused kernel's float32 output and
    log-sum-exp over the coded rows; ``keys``/``values`` (..., r, d) the exact
    rows, ``queries`` (..., m, d) unrotated float32. A key center shifts the coded rows'
    logits by ``scale * <q, center>`` (``center`` (..., 1, d) or None). Returns
    float32 (..., m, d).
    """
    shape = out.shape
    m, d = shape[-2], shape[-1]
    merged = np.array(out, dtype=np.float32, order="C").reshape(-1, m, d)
    heads = merged.shape[0]
    _core.merge_exact_rows(
        merged, np.ascontiguousarray(lse, dtype=np.float32).reshape(heads, m),
        np.ascontiguousarray(queries, dtype=np.float32).reshape(heads, m, d),
        np.ascontiguousarray(keys, dtype=np.float32).reshape(heads, -1, d),
        np.ascontiguousarray(values, dtype=np.float32).reshape(heads, -1, d), scale,
        None if center is None else np.ascontiguousarray(center, dtype=np.float32).reshape(heads, d))
    return merged.reshape(shape)


def _addresses(arrays):
    """The heads' (checked, C-contiguous) arrays as a uintp address array."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.uintp)


def _head_rotations(operands):
    """Addresses of every head's small rotation operand, or None when no head has one."""
    if all(operand is None for operand in operands):
        return None
    if any(operand is None for operand in operands):
        raise IncompatibleCodesError("heads must all rotate their queries inside the kernel, or none")
    return _addresses(operands)


def _replace_seed(config, seed):
    return dataclasses.replace(config, seed=seed)


# -- persistence of a multi-head layer -------------------------------------------------------------

def _layer_payload(layer, prefix=""):
    states, arrays = [], {}
    for h, head in enumerate(layer._heads):
        state, head_arrays = _head_payload(head, f"{prefix}head{h}.")
        states.append(state)
        arrays.update(head_arrays)
    return states, arrays


def _restore_layer(layer, states, arrays, prefix, mapped):
    if not isinstance(states, list) or len(states) != len(layer._heads):
        raise CorruptPayloadError(f"config.{prefix}heads: expected {len(layer._heads)} head states")
    for h, (head, state) in enumerate(zip(layer._heads, states)):
        _restore_head(head, state, arrays, f"{prefix}head{h}.", mapped)
    regions = {(len(head._sinks), len(head._quantized), len(head._recent)) for head in layer._heads}
    if len(regions) > 1:
        raise CorruptPayloadError(f"arrays[{prefix + 'head0.sinks.k'!r}]: the heads hold different token counts")
