"""A transformers ``Cache`` whose full-attention layers hold TurboQuant codes."""

import dataclasses

import numpy as np
import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from .._errors import CorruptPayloadError, InvalidParameterError, NonFiniteError, ShapeError, TurboQuantError
from .._version import __version__
from ..io import _format
from ..io._persist import check_restored, config_field, expect, expect_finite, rebuilt_checks
from .._threads import resolve_n_threads
from .._validation import check_int
from ..kv import BatchedMultiHeadKVCache, KVCacheConfig, MultiHeadConfig, MultiHeadKVCache
from ..kv._cache import _check_storable_rows, _layer_payload, _restore_layer
from ._attention import ATTENTION_NAME, DECODE_LAYER_ATTRIBUTE, register_attention

_SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")
_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(KVCacheConfig) if field.name != "dim")


@dataclasses.dataclass(frozen=True)
class TurboQuantCacheStats:
    """Memory held by a :class:`TurboQuantCache`.

    Attributes
    ----------
    total_bytes : int
        Bytes held by every layer: packed codes, float32 norms and float32
        unquantized tokens of the TurboQuant layers, and the exact tensors of
        the sliding-window layers.
    layer_bytes : tuple of int
        ``total_bytes`` per layer, in layer order (0 for a layer not used yet).
    num_values : int
        Key and value scalars held (tokens x KV heads x head_dim x 2, summed
        over the layers and batch rows).
    bits_per_value : float
        ``8 * total_bytes / num_values`` (0.0 when empty).
    uncompressed_bytes : int
        ``num_values * 4``: the same keys and values as float32.
    """

    total_bytes: int
    layer_bytes: tuple
    num_values: int
    bits_per_value: float
    uncompressed_bytes: int


def _as_float32(tensor):
    """A float32 C-contiguous numpy copy or view of a torch tensor (any device)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _selected_rows(rows, indices):
    """``rows[i] for i in indices``, copying a row the second time it is taken."""
    taken, selected = set(), []
    for index in indices:
        index = check_int(index, "batch index", low=0, high=len(rows) - 1)
        selected.append(rows[index].copy() if index in taken else rows[index])
        taken.add(index)
    return selected


class TurboQuantLayer(CacheLayerMixin):
    """One full-attention layer of a :class:`TurboQuantCache`: a
    :class:`turboquant.MultiHeadKVCache` per batch row.

    Created by :class:`TurboQuantCache`; initialised on its first
    :meth:`update`. Keys and values are quantized as they arrive, except a
    decode step's token when the ``"turboquant"`` attention serves it: that
    one is held until the attention call, which appends it to every row and
    attends in one :meth:`turboquant.BatchedMultiHeadKVCache.step` (any other
    use of the layer appends it first).

    Parameters
    ----------
    prototype : MultiHeadKVCache
        An empty cache; every batch row starts as a copy of it.
    settings : TurboQuantCache
        The owning cache, read for ``n_threads`` and whether decode steps
        return placeholders for the ``"turboquant"`` attention function.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, prototype, settings):
        super().__init__()
        self._prototype = prototype
        self._settings = settings
        self._rows = []
        self._pending = None     # a decode step's (keys, values), (batch, kv_heads, head_dim) float32
        self._batch = None       # the BatchedMultiHeadKVCache over _rows, built when first needed

    def __repr__(self):
        return f"TurboQuantLayer(batch={len(self._rows)}, tokens={self.get_seq_length()})"

    @property
    def batch_size(self):
        """Batch rows held (0 before the first update)."""
        return len(self._rows)

    @property
    def rows(self):
        """Tuple of the per-batch-row :class:`turboquant.MultiHeadKVCache` objects."""
        self._flush()
        return tuple(self._rows)

    def _set_rows(self, rows):
        self._rows, self._batch = rows, None

    def _flush(self):
        """Append the held decode token to every row (when there is one)."""
        if self._pending is not None:
            keys, values = self._pending
            n_threads = self._settings.n_threads
            for row, row_keys, row_values in zip(self._rows, keys, values):
                row.push_token_all(row_keys, row_values, n_threads=n_threads)
            self._pending = None

    def lazy_initialization(self, key_states, value_states):
        """Start one empty cache per batch row of ``key_states``."""
        self.device, self.dtype = key_states.device, key_states.dtype
        self._set_rows([self._prototype.copy() for _ in range(key_states.shape[0])])
        self.is_initialized = True

    def _check_states(self, key_states, value_states):
        heads, dim = self._prototype.num_heads, self._prototype.head_dim
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if states.ndim != 4 or states.shape[1] != heads or states.shape[3] != dim:
                raise ShapeError(
                    f"{name} has shape {tuple(states.shape)}; expected (batch, {heads}, seq, {dim})")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ShapeError(
                f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} differ")
        if self.is_initialized and key_states.shape[0] != len(self._rows):
            raise ShapeError(f"key_states has batch {key_states.shape[0]}; the cache holds {len(self._rows)} rows")

    def update(self, key_states, value_states, *args, **kwargs):
        """Quantize new tokens into every row and return the states attention needs.

        Parameters
        ----------
        key_states, value_states : torch.Tensor, shape (batch, kv_heads, seq, head_dim)
            float32, bfloat16 or float16 on any device (quantized as float32).

        Returns
        -------
        keys, values : torch.Tensor
            The exact states when the layer was empty; for more than one new
            token, the dequantized history followed by the exact new states;
            for one new token, placeholders for the ``"turboquant"`` attention
            function when the model uses it (the token is then appended by that
            call), else every token dequantized.
        """
        self._flush()
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = _as_float32(key_states), _as_float32(value_states)
        if not (np.isfinite(keys).all() and np.isfinite(values).all()):
            raise NonFiniteError("key_states or value_states hold NaN or infinity")
        history = self.get_seq_length()
        new = key_states.shape[2]
        if history and new == 1 and self._settings.serves_decode_attention:
            # Checked now as an append would be, so that a bad token fails here.
            residual = np.dtype(self._prototype.config.head_config.residual_dtype)
            self._pending = tuple(_check_storable_rows(np.array(states[:, :, 0, :]), name, residual)
                                  for states, name in ((keys, "key_states"), (values, "value_states")))
            placeholder = torch.full_like(key_states, float("nan"))
            setattr(placeholder, DECODE_LAYER_ATTRIBUTE, self)
            return placeholder, torch.full_like(value_states, float("nan"))
        if history and new != 1:
            old_keys, old_values = self.dequantized(key_states.dtype, key_states.device)
        n_threads = self._settings.n_threads
        for row, row_keys, row_values in zip(self._rows, keys, values):
            row.append_all(row_keys, row_values, n_threads=n_threads)
        if not history:
            return key_states, value_states
        if new != 1:
            return torch.cat([old_keys, key_states], dim=-2), torch.cat([old_values, value_states], dim=-2)
        return self.dequantized(key_states.dtype, key_states.device)

    def dequantized(self, dtype=None, device=None):
        """Every token's dequantized keys and values, ``(batch, kv_heads, seq, head_dim)``
        tensors (float32 on the CPU by default)."""
        self._flush()
        n_threads = self._settings.n_threads
        keys = np.stack([row.reconstruct_keys_all(dtype=np.float32, n_threads=n_threads) for row in self._rows])
        values = np.stack([row.reconstruct_values_all(dtype=np.float32, n_threads=n_threads) for row in self._rows])
        return (torch.from_numpy(keys).to(device=device, dtype=dtype),
                torch.from_numpy(values).to(device=device, dtype=dtype))

    def decode_attention(self, query, scaling, starts):
        """Attention of one query token per row over the codes from ``starts[row]`` on.

        Parameters
        ----------
        query : torch.Tensor, shape (batch, num_heads, 1, head_dim)
        scaling : float or None
            ``None`` means ``head_dim ** -0.5``.
        starts : sequence of int
            First key of every row.

        Returns
        -------
        torch.Tensor, shape (batch, 1, num_heads, head_dim)
            In the query's dtype and device.
        """
        queries = _as_float32(query)[:, :, 0, :]
        n_threads = self._settings.n_threads
        if self._pending is not None and not any(starts):
            # The held token and the attention in one call over every row and head.
            if self._batch is None:
                self._batch = BatchedMultiHeadKVCache._of_rows(self._prototype.config, self._rows)
            keys, values = self._pending
            out = self._batch.step(keys, values, queries, scaling, n_threads=n_threads)
            self._pending = None
            return torch.from_numpy(out[:, None]).to(device=query.device, dtype=query.dtype)
        self._flush()
        out = np.stack([row.attention_output_all(q, scaling, start=start, n_threads=n_threads)
                        for row, q, start in zip(self._rows, queries, starts)])
        return torch.from_numpy(out[:, None]).to(device=query.device, dtype=query.dtype)

    def get_mask_sizes(self, query_length):
        """``(kv_length, kv_offset)`` of the mask for ``query_length`` new tokens."""
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self):
        """Tokens held (the same in every row), the held decode token included."""
        if not self._rows:
            return 0
        return self._rows[0].num_tokens + (self._pending is not None)

    def get_max_length(self):
        """-1: the layer grows without bound."""
        return -1

    def offload(self):
        """Nothing to move: the codes live in host memory."""

    def prefetch(self):
        """Nothing to move: the codes live in host memory."""

    def reset(self):
        """Drop every row; the next :meth:`update` starts afresh."""
        self._set_rows([])
        self._pending = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx):
        """Rows become ``rows[beam_idx]`` (beam search); a repeated row is copied."""
        self._flush()
        if self._rows:
            self._set_rows(_selected_rows(self._rows, torch.as_tensor(beam_idx).tolist()))

    def batch_repeat_interleave(self, repeats):
        """Repeat every row ``repeats`` times in place (row order kept)."""
        repeats = check_int(repeats, "repeats", low=1)
        self._flush()
        self._set_rows(_selected_rows(self._rows, [i for i in range(len(self._rows)) for _ in range(repeats)]))

    def batch_select_indices(self, indices):
        """Keep only the rows ``indices`` (integer indices or a boolean mask)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self._flush()
        self._set_rows(_selected_rows(self._rows, indices.tolist()))

    def crop(self, tokens_to_remove):
        """Remove the ``-tokens_to_remove`` newest tokens of every row
        (transformers 5's convention: a negative count; 0 does nothing).

        Raises
        ------
        InvalidParameterError
            If ``tokens_to_remove`` is positive.
        """
        tokens_to_remove = check_int(tokens_to_remove, "tokens_to_remove")
        if tokens_to_remove > 0:
            raise InvalidParameterError(
                f"crop({tokens_to_remove}): pass a negative count of tokens to remove, as transformers 5 does")
        self._flush()
        keep = max(0, self.get_seq_length() + tokens_to_remove)
        for row in self._rows:
            row.truncate(keep)

    def stats(self):
        """``(bytes held, key and value scalars held)`` over every row."""
        self._flush()
        total = sum(row.stats().total_bytes for row in self._rows)
        values = sum(2 * row.num_tokens * row.num_heads * row.head_dim for row in self._rows)
        return total, values


def _dense_stats(layer):
    """``(bytes held, scalars held)`` of a transformers layer holding tensors."""
    tensors = [t for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def _model_dimensions(config):
    """``(layers, query heads, KV heads, head_dim)`` of a transformers config."""
    def field(name):
        value = getattr(config, name, None)
        if value is None:
            raise InvalidParameterError(f"the model config has no {name}; TurboQuantCache needs it")
        return check_int(value, f"config.{name}", low=1)

    layers, query_heads = field("num_hidden_layers"), field("num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv_heads = query_heads if kv_heads is None else check_int(kv_heads, "config.num_key_value_heads", low=1)
    head_dim = getattr(config, "head_dim", None)
    head_dim = field("hidden_size") // query_heads if head_dim is None else check_int(
        head_dim, "config.head_dim", low=2)
    return layers, query_heads, kv_heads, head_dim


def _layer_types(config, layers):
    """transformers' layer type of every layer (from ``layer_types`` or ``sliding_window``)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * layers
    types = list(types)
    if len(types) != layers:
        raise InvalidParameterError(f"config.layer_types has {len(types)} entries for {layers} layers")
    for kind in types:
        if kind != "full_attention" and kind not in _SLIDING_LAYER_TYPES:
            raise InvalidParameterError(f"TurboQuantCache does not support layers of type {kind!r}")
    return types


class TurboQuantCache(Cache):
    """A transformers ``Cache`` storing keys and values as TurboQuant codes.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (``model.config``). Read: ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: the query
        heads), ``head_dim`` (default ``hidden_size // num_attention_heads``),
        ``layer_types`` / ``sliding_window``; for a composite model, its text
        decoder config.
    preset : {"lossless", "balanced", "compact"} or None, default=None
        Start from :meth:`turboquant.KVCacheConfig.preset`; ``options`` then
        replace single fields of it.
    fused_attention : bool, default=True
        Compute decode attention from the codes: registers the ``"turboquant"``
        attention implementation and sets ``_attn_implementation =
        "turboquant"`` on the (text) config given, which the model reads on
        every forward. That function serves this cache's decode steps and
        hands every other call to sdpa, so other caches keep working on the
        model. ``False`` leaves the config alone: unless the model selects
        ``"turboquant"`` itself, decode steps then return every token
        dequantized, as transformers' ``QuantizedCache`` does.
    n_threads : int or None, default=None
        Threads of every kernel call (see :func:`turboquant.resolve_n_threads`).
    **options
        :class:`turboquant.KVCacheConfig` fields except ``dim`` (taken from
        the config): ``key_bits``, ``value_bits``, ``key_strategy``, ``seed``,
        ``residual_tokens``, ``sink_tokens``, ``outlier_channels``,
        ``outlier_bits``, ``rotation``, ``sketch``, ``center_keys``,
        ``block_scales``, ``residual_dtype``.
        ``max_tokens`` must stay 0: a window is the model's business.

    Raises
    ------
    InvalidParameterError
        For an unknown or invalid option, or a config lacking a needed field
        (before any work).

    Notes
    -----
    Full-attention layers are :class:`TurboQuantLayer` objects: one
    :class:`turboquant.MultiHeadKVCache` per batch row (grouped-query
    attention served natively). Sliding-window and chunked layers are
    transformers' ``DynamicSlidingWindowLayer``: exact, never quantized.

    The first update of a layer (the prompt) returns the exact states, later
    multi-token updates the dequantized history followed by the exact new
    states. A decode step (one token) returns placeholders the ``"turboquant"``
    attention function recognises: it computes every row's attention from the
    codes, over the keys the mask allows (left padding skipped), and falls
    back to exact attention over the dequantized keys and values for anything
    else (masks with holes, dropout, softcap, attention sinks). When the model
    uses another attention implementation, decode steps return every token
    dequantized instead.

    Examples
    --------
    >>> cache = TurboQuantCache(model.config, preset="balanced")  # doctest: +SKIP
    >>> model.generate(input_ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
    """

    is_compileable = False

    def __init__(self, config, *, preset=None, fused_attention=True, n_threads=None, **options):
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise InvalidParameterError(
                f"unknown TurboQuantCache options {unknown}; expected some of {list(_OPTION_NAMES)}")
        if not isinstance(fused_attention, (bool, np.bool_)):
            raise InvalidParameterError(f"fused_attention must be True or False, got {fused_attention!r}")
        resolve_n_threads(n_threads)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers, query_heads, kv_heads, head_dim = _model_dimensions(text)
        head = (KVCacheConfig(dim=head_dim, **options) if preset is None
                else KVCacheConfig.preset(preset, head_dim, **options))
        if head.max_tokens:
            raise InvalidParameterError(
                f"max_tokens={head.max_tokens} is not supported: TurboQuantCache keeps every token; "
                "the model's sliding-window layers are kept by transformers' DynamicSlidingWindowLayer")
        head_config = MultiHeadConfig(num_heads=kv_heads, head_config=head, num_query_heads=query_heads)
        types = _layer_types(text, layers)
        windows = {"sliding_attention": getattr(text, "sliding_window", None),
                   "chunked_attention": getattr(text, "attention_chunk_size", None)}

        self.head_config = head_config
        # What the cache read from the model config (saved with the cache, and
        # enough to rebuild a config for it).
        self._model_fields = {"num_hidden_layers": layers, "num_attention_heads": query_heads,
                              "num_key_value_heads": kv_heads, "head_dim": head_dim, "layer_types": list(types),
                              "sliding_window": windows["sliding_attention"],
                              "attention_chunk_size": windows["chunked_attention"]}
        self.n_threads = n_threads
        self.fused_attention = bool(fused_attention)
        self._text_config = text
        prototype = MultiHeadKVCache(head_config)
        super().__init__(layers=[
            TurboQuantLayer(prototype, self) if kind == "full_attention"
            else DynamicSlidingWindowLayer(sliding_window=windows[kind])
            for kind in types])
        if self.fused_attention:
            register_attention()
            text._attn_implementation = ATTENTION_NAME

    @property
    def serves_decode_attention(self):
        """Whether decode steps go to the ``"turboquant"`` attention function:
        the model config selects it (read on every step)."""
        return self._text_config._attn_implementation == ATTENTION_NAME

    # -- persistence (see turboquant.io) ----------------------------------------------
    def to_bytes(self):
        """The cache as bytes of the turboquant format (see :mod:`turboquant.io`): every
        layer's codes and exact tensors, the cache settings and the model config.

        Returns
        -------
        bytes
        """
        config, arrays = _cache_payload(self)
        return _format.encode(_KIND, config, arrays, rebuilt_checks(_rebuilt_tables(self)), __version__)


    @classmethod
    def from_bytes(cls, data, config=None, *, fused_attention=None, n_threads=None):
        """Rebuild a cache from :meth:`to_bytes` output, validating every byte.

        Parameters
        ----------
        data : bytes-like
        config : transformers.PretrainedConfig, optional
            The model's config, whose attention implementation the cache selects
            (as the constructor does); by default a config rebuilt from the saved
            one (then ``model.config`` is not changed: pass it to get fused
            decode attention in that model).
        fused_attention : bool, optional
            As for the constructor; by default the saved cache's.
        n_threads : int or None, default=None

        Raises
        ------
        CorruptPayloadError
            For truncated, corrupted or inconsistent bytes, or a config whose layers
            differ from the saved cache's.
        """
        return _restore_cache(_format.decode(data), config, fused_attention, n_threads, False)


    def save(self, path):
        """Write the cache to ``path`` atomically (see :meth:`turboquant.QuantizedKVCache.save`)."""
        config, arrays = _cache_payload(self)
        _format.write(path, _KIND, config, arrays, rebuilt_checks(_rebuilt_tables(self)), __version__)


    @classmethod
    def load(cls, path, config=None, *, mmap=False, fused_attention=None, n_threads=None):
        """Read a cache saved by :meth:`save` (parameters as for :meth:`from_bytes`;
        ``mmap=True`` maps the codes read-only, copied on the first append)."""
        return _restore_cache(_format.read(path, mmap=bool(mmap)), config, fused_attention, n_threads, bool(mmap))

    def __reduce__(self):
        return _cache_from_bytes, (self.to_bytes(),)

    def stats(self):
        """Memory held, in total and per layer (:class:`TurboQuantCacheStats`)."""
        per_layer = [layer.stats() if isinstance(layer, TurboQuantLayer) else _dense_stats(layer)
                     for layer in self.layers]
        total = sum(nbytes for nbytes, _ in per_layer)
        values = sum(count for _, count in per_layer)
        return TurboQuantCacheStats(
            total_bytes=total, layer_bytes=tuple(nbytes for nbytes, _ in per_layer), num_values=values,
            bits_per_value=8 * total / values if values else 0.0, uncompressed_bytes=4 * values)


# -- persistence ----------------------------------------------------------------------------------

_KIND = "TurboQuantCache"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype):
    for name, value in _TORCH_DTYPES.items():
        if dtype == value:
            return name
    raise InvalidParameterError(f"a TurboQuantCache of {dtype} tensors cannot be saved")


def _cache_payload(cache):
    """``(config, arrays)`` of a TurboQuantCache (decode tokens held for the attention appended first)."""
    layers, arrays = [], {}
    for number, layer in enumerate(cache.layers):
        prefix = f"layer{number}."
        if isinstance(layer, TurboQuantLayer):
            dtype = _dtype_name(layer.dtype) if layer.is_initialized else "float32"
            rows = []
            for r, row in enumerate(layer.rows):
                states, row_arrays = _layer_payload(row, f"{prefix}row{r}.")
                rows.append(states)
                arrays.update(row_arrays)
            layers.append({"kind": "turboquant", "initialized": bool(layer.is_initialized), "dtype": dtype,
                           "rows": rows})
        else:
            dtype = _dtype_name(layer.keys.dtype) if layer.is_initialized else "float32"
            entry = {"kind": "sliding", "initialized": bool(layer.is_initialized), "dtype": dtype,
                     "window": int(layer.sliding_window), "cumulative_length": int(layer.cumulative_length)}
            if layer.is_initialized:
                arrays[prefix + "keys"] = _as_float32(layer.keys)
                arrays[prefix + "values"] = _as_float32(layer.values)
            layers.append(entry)
    config = {"head_config": cache.head_config.to_dict(), "fused_attention": cache.fused_attention,
              "layers": layers, "model": dict(cache._model_fields)}
    return config, arrays


def _rebuilt_tables(cache):
    tables = {}
    for number, layer in enumerate(cache.layers):
        if isinstance(layer, TurboQuantLayer):
            tables.update({f"layer{number}.{name}": codec for name, codec in layer._prototype._rebuilt().items()})
    return tables


def _restore_cache(payload, model_config, fused_attention, n_threads, mapped):
    config, arrays = payload.config, payload.arrays
    if payload.kind != _KIND:
        raise CorruptPayloadError(f"kind: the file holds a {payload.kind!r}, not a {_KIND!r}")
    if not isinstance(config, dict) or set(config) != {"head_config", "fused_attention", "layers", "model"}:
        raise CorruptPayloadError("config: expected the keys head_config, fused_attention, layers and model")
    try:
        head_config = MultiHeadConfig.from_dict(config_field(config, "head_config", dict))
        model_fields = config_field(config, "model", dict)
        if model_config is None:
            model_config = transformers.PretrainedConfig(**model_fields)
        if fused_attention is None:
            fused_attention = config_field(config, "fused_attention", bool)
        options = {name: value for name, value in head_config.head_config.to_dict().items() if name != "dim"}
        cache = TurboQuantCache(model_config, fused_attention=fused_attention, n_threads=n_threads, **options)
    except CorruptPayloadError:
        raise
    except (TurboQuantError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise CorruptPayloadError(f"config: {error}") from None
    if cache._model_fields != model_fields:
        raise CorruptPayloadError(f"config.model: the model's layers are {cache._model_fields}, "
                                  f"the file's {model_fields}")
    if cache.head_config != head_config:
        raise CorruptPayloadError(f"config.head_config: the model's layers are {cache.head_config}, "
                                  f"the file's {head_config}")
    layers = config["layers"]
    if not isinstance(layers, list) or len(layers) != len(cache.layers):
        raise CorruptPayloadError(f"config.layers: expected {len(cache.layers)} layers")
    for number, (layer, entry) in enumerate(zip(cache.layers, layers)):
        prefix = f"layer{number}."
        kind = "turboquant" if isinstance(layer, TurboQuantLayer) else "sliding"
        if not isinstance(entry, dict) or entry.get("kind") != kind or \
                not isinstance(entry.get("initialized"), bool) or entry.get("dtype") not in _TORCH_DTYPES:
            raise CorruptPayloadError(f"config.layers[{number}]: expected a {kind} layer entry")
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if kind == "turboquant":
            if set(entry) != {"kind", "initialized", "dtype", "rows"} or not isinstance(entry["rows"], list) \
                    or (not entry["initialized"] and entry["rows"]):
                raise CorruptPayloadError(f"config.layers[{number}].rows: expected a list of row states")
            rows = []
            for r, states in enumerate(entry["rows"]):
                row = layer._prototype.copy()
                _restore_layer(row, states, arrays, f"{prefix}row{r}.", mapped)
                rows.append(row)
            if len({row.num_tokens for row in rows}) > 1:
                raise CorruptPayloadError(f"config.layers[{number}].rows: rows of different lengths")
            if entry["initialized"]:
                layer.device, layer.dtype, layer.is_initialized = torch.device("cpu"), dtype, True
                layer._set_rows(rows)
            continue
        if set(entry) != {"kind", "initialized", "dtype", "window", "cumulative_length"} or \
                entry["window"] != layer.sliding_window or \
                not isinstance(entry["cumulative_length"], int) or entry["cumulative_length"] < 0:
            raise CorruptPayloadError(f"config.layers[{number}]: a sliding layer entry of another window")
        if entry["initialized"]:
            shape = (None, head_config.num_heads, None, head_config.head_config.dim)
            keys = expect_finite(expect(arrays, prefix + "keys", np.float32, shape), prefix + "keys")
            values = expect_finite(expect(arrays, prefix + "values", np.float32, keys.shape), prefix + "values")
            keys_t = torch.from_numpy(np.array(keys)).to(dtype)
            layer.lazy_initialization(keys_t, keys_t)
            layer.keys, layer.values = keys_t, torch.from_numpy(np.array(values)).to(dtype)
            layer.cumulative_length = entry["cumulative_length"]
    check_restored(payload, _cache_payload(cache)[1], _rebuilt_tables(cache))
    return cache


def _cache_from_bytes(data):
    """Unpickling hook: the cache from its bytes, on a config rebuilt from the saved one."""
    return _restore_cache(_format.decode(data), None, None, None, False)
