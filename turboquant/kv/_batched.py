""":class:`BatchedMultiHeadKVCache`: the KV caches of one layer for every row of a batch."""


import numpy as np

from .._errors import (CorruptPayloadError, IndexOutOfRangeError, InvalidParameterError, LengthMismatchError,
                       ShapeError)
from ..io._persist import Persistent, attribute_copy, config_field
from .._threads import resolve_n_threads
from .._validation import as_array, check_int, check_real_dtype
from ._cache import (MultiHeadKVCache, _check_scale, _check_storable_rows, _fast_steps, _LayerDims,
                     _layer_payload, _push_then_attend, _restore_layer, _step_block, _step_query_block,
                     _step_sides)
from ._config import MultiHeadConfig


class BatchedMultiHeadKVCache(_LayerDims, Persistent):
    """A layer's KV cache for each of ``batch_size`` independent sequences.

    Row ``b`` is a :class:`MultiHeadKVCache` of its own (same seeds in every
    row), holding however many tokens its sequence has: rows may differ in
    length (``lengths``), as after prompts of different lengths.

    Parameters
    ----------
    config : MultiHeadConfig
        Settings of every row.
    batch_size : int
        Number of rows, >= 1.

    Notes
    -----
    :meth:`step` appends one token to every row and attends with every row's
    queries in one call, validated once: with float32 inputs and codes the
    fused kernels read, every head of every row is coded in one kernel call and
    attends in one fused call (rows of different lengths included), once every
    row holds its sink tokens and as many recent-window tokens as the others
    (always so for prompts longer than the window); otherwise row by row. Every
    method that changes the cache validates all of its input first: on any
    error no row changes.
    """

    _kind = "BatchedMultiHeadKVCache"

    def __init__(self, config, batch_size):
        if not isinstance(config, MultiHeadConfig):
            raise InvalidParameterError(f"config must be a MultiHeadConfig, got {type(config).__name__}")
        batch_size = check_int(batch_size, "batch_size", low=1)
        self.config = config
        self._rows = tuple(MultiHeadKVCache(config) for _ in range(batch_size))
        self._step_sides = None

    @classmethod
    def _of_rows(cls, config, rows):
        """A batch over the existing :class:`MultiHeadKVCache` objects ``rows``
        (of ``config``, not copied: the batch and its owner share them)."""
        batch = cls.__new__(cls)
        batch.config, batch._rows, batch._step_sides = config, tuple(rows), None
        return batch

    # -- properties ---------------------------------------------------------------------------
    @property
    def batch_size(self):
        """Number of rows."""
        return len(self._rows)

    def __len__(self):
        return self.batch_size

    @property
    def lengths(self):
        """Tokens held by every row, a tuple of ``batch_size`` ints."""
        return tuple(row.num_tokens for row in self._rows)

    @property
    def rows(self):
        """Tuple of the per-row :class:`MultiHeadKVCache` objects."""
        return self._rows

    def row(self, index):
        """The :class:`MultiHeadKVCache` of row ``index`` (IndexOutOfRangeError when out of range)."""
        index = check_int(index, "row index")
        if not 0 <= index < self.batch_size:
            raise IndexOutOfRangeError(f"row {index} is out of range for a batch of {self.batch_size}")
        return self._rows[index]

    # -- writing ------------------------------------------------------------------------------
    def append_row(self, row, keys, values, *, n_threads=None):
        """Append ``(num_heads, n, head_dim)`` keys and values to row ``row`` only
        (:meth:`MultiHeadKVCache.append_all`); the other rows are unchanged."""
        self.row(row).append_all(keys, values, n_threads=n_threads)

    def append_all(self, keys, values, lengths=None, *, n_threads=None):
        """Append a block of tokens to every row, ``lengths[b]`` of them to row ``b``.

        Parameters
        ----------
        keys, values : array_like, shape (batch_size, num_heads, n, head_dim)
            Finite real values; row ``b`` takes its first ``lengths[b]`` tokens
            (right padding beyond them is never read, nor checked).
        lengths : sequence of int or None, default=None
            ``0 <= lengths[b] <= n``; None means ``n`` for every row.
        n_threads : int or None, default=None

        Raises
        ------
        ShapeError, LengthMismatchError, DTypeError, NonFiniteError, InvalidParameterError
            On any invalid input; no row changes then.
        """
        keys, values = self._batch_blocks(keys, "keys"), self._batch_blocks(values, "values")
        if keys.shape != values.shape:
            raise LengthMismatchError(f"keys have shape {keys.shape} but values have {values.shape}")
        n = keys.shape[2]
        counts = self._counts(lengths, n)
        n_threads = resolve_n_threads(n_threads)
        plans = []
        for row, k_block, v_block, count in zip(self._rows, keys, values, counts):
            row_plans = []
            for head, k, v in zip(row.heads, k_block, v_block):
                k_rows, v_rows = head._check_block(k[:count], v[:count])
                row_plans.append(head._prepare_append(k_rows, v_rows, n_threads))
            plans.append(row_plans)
        for row, row_plans in zip(self._rows, plans):
            for head, plan in zip(row.heads, row_plans):
                head._commit(plan)

    def _batch_blocks(self, array, name):
        arr = as_array(array, name)
        check_real_dtype(arr, name)
        if arr.ndim != 4 or arr.shape[1] != self.num_heads or arr.shape[3] != self.head_dim:
            raise ShapeError(f"{name} has shape {arr.shape}; expected "
                             f"({self.batch_size}, {self.num_heads}, n, {self.head_dim})")
        if arr.shape[0] != self.batch_size:
            raise LengthMismatchError(f"{name} has {arr.shape[0]} rows; expected {self.batch_size}")
        return arr

    def _counts(self, lengths, n):
        if lengths is None:
            return [n] * self.batch_size
        arr = as_array(lengths, "lengths")
        if arr.ndim != 1 or arr.shape[0] != self.batch_size:
            raise LengthMismatchError(f"lengths has shape {arr.shape}; expected ({self.batch_size},)")
        return [check_int(count, "lengths entry", low=0, high=n) for count in arr.tolist()]

    def step(self, keys, values, queries, scale=None, *, n_threads=None):
        """One decode step of every row: append a token to every head of every row,
        then attend with every row's query heads over that row's tokens.

        Row ``b`` gets what ``rows[b].step(keys[b], values[b], queries[b])``
        (:meth:`MultiHeadKVCache.step`) gives it.

        Parameters
        ----------
        keys, values : array_like, shape (batch_size, num_heads, head_dim)
        queries : array_like, shape (batch_size, num_query_heads, head_dim) or (batch_size, num_query_heads, m, head_dim)
        scale : float or None, default=None
            ``None`` means ``1/sqrt(head_dim)``.
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (batch_size, num_query_heads, head_dim) or (batch_size, num_query_heads, m, head_dim)
            float32 for float32 queries, else float64.

        Raises
        ------
        ShapeError, LengthMismatchError, DTypeError, NonFiniteError, InvalidParameterError
            On any invalid input; no row changes then.
        """
        n_threads = resolve_n_threads(n_threads)
        scale = _check_scale(scale, self.head_dim)
        keys, values = self._tokens(keys, "keys"), self._tokens(values, "values")
        queries, was_3d = self._queries(queries)
        out = _fast_steps(self._rows, self._sides(), keys, values, queries, scale, n_threads)
        if out is None:
            out = _push_then_attend(self._rows, keys, values, queries, scale, n_threads)
        return out[:, :, 0, :] if was_3d else out

    def _sides(self):
        if self._step_sides is None:
            self._step_sides = _step_sides([head for row in self._rows for head in row.heads])
        return self._step_sides

    def _tokens(self, array, name):
        rows = _step_block(array, name, (self.batch_size, self.num_heads, self.head_dim), "rows")
        return _check_storable_rows(rows, name, np.dtype(self.config.head_config.residual_dtype))

    def _queries(self, queries):
        arr = as_array(queries, "queries")
        check_real_dtype(arr, "queries")
        b, q, d = self.batch_size, self.num_query_heads, self.head_dim
        if arr.ndim not in (3, 4) or arr.shape[1] != q or arr.shape[-1] != d:
            raise ShapeError(f"queries has shape {arr.shape}; expected ({b}, {q}, {d}) or ({b}, {q}, m, {d})")
        if arr.shape[0] != b:
            raise LengthMismatchError(f"queries has {arr.shape[0]} rows; expected {b}")
        return _step_query_block(arr, 3)

    def clear(self):
        """Remove every token from every row."""
        for row in self._rows:
            row.clear()

    # -- persistence (see turboquant.io) ----------------------------------------------
    def _payload(self):
        rows, arrays = [], {}
        for r, row in enumerate(self._rows):
            states, row_arrays = _layer_payload(row, f"row{r}.")
            rows.append(states)
            arrays.update(row_arrays)
        return {"config": self.config.to_dict(), "rows": rows}, arrays

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        if set(config) != {"config", "rows"} or not isinstance(config["rows"], list) or not config["rows"]:
            raise CorruptPayloadError("config: expected the keys config and rows (a non-empty list)")
        batch = cls(MultiHeadConfig.from_dict(config_field(config, "config", dict)), len(config["rows"]))
        for r, (row, states) in enumerate(zip(batch._rows, config["rows"])):
            _restore_layer(row, states, arrays, f"row{r}.", mapped)
        return batch

    def _rebuilt(self):
        return {f"row{r}.{name}": codec for r, row in enumerate(self._rows)
                for name, codec in row._rebuilt().items()}

    def copy(self):
        """An independent copy of every row (the immutable quantizers are shared)."""
        return attribute_copy(self)

    def stats(self):
        """Every row's :class:`MultiHeadCacheStats`, a tuple."""
        return tuple(row.stats() for row in self._rows)

    def __repr__(self):
        c = self.config
        return (f"BatchedMultiHeadKVCache(batch_size={self.batch_size}, kv_heads={c.num_heads}, "
                f"query_heads={c.num_query_heads}, head_dim={self.head_dim}, lengths={list(self.lengths)})")
