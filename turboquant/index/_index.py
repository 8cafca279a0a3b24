"""The :class:`TurboQuantIndex`: nearest-neighbour search over TurboQuant codes.

Python holds the arrays, ids and validation; the scans run in
:mod:`turboquant._kernels._core` (``fast_scan_search`` for 1, 2 and 4-bit codes
in the block layout of ``include/tq_scan.h``, ``row_scan_search`` for the
other widths), reached through the checked :class:`~turboquant.quant._codec.MSECodec`.
"""

import functools
import threading

import numpy as np

from .._errors import (
    CorruptPayloadError,
    InvalidParameterError,
    LengthMismatchError,
    ShapeError,
)
from .._kernels import _core
from .._threads import resolve_n_threads
from .._validation import (
    as_array,
    as_rows,
    check_bool,
    check_choice,
    check_int,
    readonly,
)
from ..io._persist import Persistent, config_field, expect, expect_finite
from ..quant._codec import ROTATIONS, MSECodec

METRICS = ("ip", "cosine", "l2")
FAST_SCAN_BITS = (1, 2, 4)
# Rows rescored exactly per result of the fast scan: its uint8 tables reorder
# near-ties, so it keeps this many times k (and at least k + FAST_SCAN_SLACK) candidates.
FAST_SCAN_FACTOR = 2
FAST_SCAN_SLACK = 32
# Rows whose reconstruction norms (the "l2" metric) are computed per pass.
NORM_BLOCK = 1 << 14
# Bytes of gathered originals per group of queries when re-ranking.
RERANK_BYTES = 1 << 25
# Up to this dimension queries are rotated by one float32 matrix product (a
# dim x dim matrix kept by the index), which is faster than the transform for
# the few rows of a search.
QUERY_MATRIX_MAX_DIM = 256


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer is not starved by new readers."""

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def __enter__(self):   # as a reader
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1

    def __exit__(self, *exc_info):
        with self._condition:
            self._readers -= 1
            if not self._readers:
                self._condition.notify_all()

    def write(self, method):
        """Decorator body: run ``method`` holding the lock alone."""
        with self._condition:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            return method()
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


def _writer(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        return self._lock.write(lambda: method(self, *args, **kwargs))
    return locked


def _reader(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def _check_row_values(scale, offset, ids, originals, next_id):
    """Values of loaded per-row arrays: finite, scales and ids >= 0, ids below next_id."""
    expect_finite(scale, "scale")
    expect_finite(offset, "offset")
    expect_finite(originals, "originals")
    if scale.size and ((scale < 0).any() or (ids < 0).any() or int(ids.max()) >= next_id):
        raise CorruptPayloadError("arrays['scale'], arrays['ids']: scales and ids must be >= 0, "
                                  "ids below config.next_id")


def _sorted_distinct(ids):
    """Loaded ``ids`` sorted, checked to be distinct (CorruptPayloadError otherwise)."""
    ordered = np.sort(ids)
    if ordered.size > 1 and not (np.diff(ordered) > 0).all():
        raise CorruptPayloadError("arrays['ids']: the loaded index holds duplicate ids")
    return ordered


def _check_ids(ids, count):
    """``ids`` as a 1-d int64 array of ``count`` distinct values."""
    array = as_array(ids, "ids")
    if array.ndim != 1:
        raise ShapeError(f"ids has shape {array.shape}; expected ({count},)")
    if array.shape[0] != count:
        raise LengthMismatchError(f"ids has {array.shape[0]} entries; there are {count} vectors")
    if array.dtype.kind not in "iu" or (array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max):
        raise InvalidParameterError(f"ids must be integers that fit int64, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.size and (array < 0).any():
        raise InvalidParameterError("ids must be >= 0 (-1 marks a missing result)")
    if np.unique(array).size != array.size:
        raise InvalidParameterError("ids holds duplicates")
    return array


class TurboQuantIndex(Persistent):
    """A nearest-neighbour index over TurboQuant MSE codes; needs no training.

    Vectors are rotated (seeded Hadamard or dense), stored as ``bits``-bit
    Lloyd-Max codes of their coordinates and a float32 norm, and searched
    without decoding: 1, 2 and 4-bit codes by a fast scan (uint8 lookup tables
    of 16 entries, summed in 16-bit integer lanes with PSHUFB, 32 rows at a
    time, then exact float64 rescoring of the best candidates), other widths
    by the fused float32 decoder. Results follow FAISS's ``search``
    convention; ties are broken by the smaller id, and results do not depend
    on the thread count.

    Parameters
    ----------
    dim : int
        Vector dimension, >= 2.
    bits : int, default=4
        Bits per coordinate, 1..8; a vector takes ``ceil(dim * bits / 8)``
        code bytes, 4 for its norm, 8 for its id (and 4 more with ``"l2"``).
    metric : {"ip", "cosine", "l2"}, default="ip"
        ``"ip"``: largest inner product first. ``"cosine"``: vectors and
        queries are normalised first (zero vectors stay zero), so scores are
        cosine similarities. ``"l2"``: smallest squared Euclidean distance
        first (FAISS's ``METRIC_L2`` reports squared distances too).
    seed : int, default=0
        Seed of the rotation.
    rotation : {"hadamard", "dense"}, default="hadamard"
    keep_originals : bool, default=False
        Keep a float32 copy of every vector as given for exact re-ranking
        (``search(..., rerank=r)``); it takes ``4 * dim`` bytes a vector.

    Attributes
    ----------
    dim, bits, metric, seed, rotation : as given
    keep_originals : bool

    Notes
    -----
    ``save``/``load``, ``to_bytes``/``from_bytes`` and pickling go through the
    checked format of :mod:`turboquant.io`. ``load(path, mmap=True)`` maps the
    codes, norms, ids and originals read-only from the file, so a large index
    opens at once and processes share its pages; the first ``add`` or
    ``remove`` copies them into memory (copy-on-write), and the file is never
    written. A mapped load checks the file's structure (every length, offset,
    dtype and the checksums of its small arrays) but reads no per-vector
    value: those are checked by the first change, or by :meth:`check_mapped`.

    Searches only read the index, and the scans release the GIL: several
    Python threads may search one index at the same time. ``add``, ``remove``
    and ``reset`` change it; they take a lock that searches share, so a writer
    waits for running searches and searches wait for a writer.

    Examples
    --------
    >>> import numpy as np
    >>> from turboquant import TurboQuantIndex
    >>> rng = np.random.default_rng(0)
    >>> base = rng.standard_normal((1000, 64)).astype(np.float32)
    >>> index = TurboQuantIndex(64, bits=4)
    >>> index.add(base)
    >>> scores, ids = index.search(base[:3], 5)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    _kind = "TurboQuantIndex"

    def __init__(self, dim, bits=4, *, metric="ip", seed=0, rotation="hadamard", keep_originals=False):
        self._lock = _ReadWriteLock()
        self.metric = check_choice(metric, "metric", METRICS)
        self.keep_originals = check_bool(keep_originals, "keep_originals")
        self._codec = MSECodec(dim, bits, seed, check_choice(rotation, "rotation", ROTATIONS))
        self.dim, self.bits, self.seed, self.rotation = self._codec.dim, self._codec.bits, seed, rotation
        self._fast = self.bits in FAST_SCAN_BITS
        self._nibbles = _core.scan_nibbles(self.dim, self.bits) if self._fast else 0
        self._query_matrix = None
        if self.dim <= QUERY_MATRIX_MAX_DIM:
            eye = np.eye(self.dim)
            self._query_matrix = readonly(np.ascontiguousarray(self._codec.rotate(eye, 1), dtype=np.float32))
        self.reset()

    # -- state --------------------------------------------------------------------------------------
    @_writer
    def reset(self):
        """Remove every vector (ids start again at 0)."""
        self._n = 0
        self._next_id = 0
        self._codes = self._empty_codes(0)
        self._scale = np.empty(0, dtype=np.float32)
        self._offset = np.empty(0, dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._originals = np.empty((0, self.dim), dtype=np.float32)
        self._sorted_ids = np.empty(0, dtype=np.int64)
        self._block_terms = np.empty((0, 3), dtype=np.float32)
        self._mapped = False

    def _refresh_block_terms(self, first_row):
        """Recompute the fast scan's per-block key bounds from the block holding
        ``first_row`` on: least and largest scale, largest offset (0 without)."""
        if not self._fast:
            return
        n, first = self._n, first_row // 32
        blocks = -(-n // 32)
        if len(self._block_terms) < blocks:
            grown = np.zeros((max(blocks, 2 * len(self._block_terms)), 3), dtype=np.float32)
            grown[:len(self._block_terms)] = self._block_terms
            self._block_terms = grown
        if blocks <= first:
            return
        # The last block's missing rows repeat its last row, leaving its extremes as they are.
        rows = slice(first * 32, n)
        padding = (0, blocks * 32 - n)
        scale = np.pad(self._scale[rows], padding, mode="edge").reshape(-1, 32)
        terms = self._block_terms[first:blocks]
        terms[:, 0] = scale.min(axis=1)
        terms[:, 1] = scale.max(axis=1)
        terms[:, 2] = 0.0
        if self.metric == "l2":
            terms[:, 2] = np.pad(self._offset[rows], padding, mode="edge").reshape(-1, 32).max(axis=1)

    def _own(self):
        """Copy memory-mapped arrays into memory before the first change (checking
        their values), and build the sorted ids a mapped load leaves for later
        (checking they are distinct)."""
        if self._mapped:
            n = self._n
            _check_row_values(self._scale[:n], self._offset, self._ids[:n], self._originals, self._next_id)
            self._codes, self._scale, self._offset = self._codes.copy(), self._scale.copy(), self._offset.copy()
            self._ids, self._originals = self._ids.copy(), self._originals.copy()
            self._block_terms = self._block_terms.copy()
            self._mapped = False
        if self._sorted_ids is None:
            self._sorted_ids = _sorted_distinct(self._ids[:self._n])

    def _empty_codes(self, capacity):
        if self._fast:
            blocks = (capacity + 31) // 32
            return np.zeros((blocks, 16 * self._nibbles), dtype=np.uint8)
        return np.zeros((capacity, self._codec.row_bytes), dtype=np.uint8)

    def _capacity(self):
        """Rows every per-row array has room for (the code blocks may hold more)."""
        return len(self._scale)

    def __len__(self):
        return self._n

    @property
    def ntotal(self):
        """Number of vectors held (FAISS's name for ``len(index)``)."""
        return self._n

    @property
    def ids(self):
        """(n,) int64 ids in storage order (a read-only copy)."""
        return readonly(self._ids[:self._n].copy())

    @property
    def nbytes(self):
        """Bytes held for the vectors: codes, norms, ids, the ``"l2"`` terms and
        originals (for the rows held, not the spare capacity)."""
        n = self._n
        code_bytes = n * self._codec.row_bytes if not self._fast else -(-n // 32) * 16 * self._nibbles
        per_row = 4 + 8 + (4 if self.metric == "l2" else 0) + (4 * self.dim if self.keep_originals else 0)
        return code_bytes + n * per_row

    @property
    def code_size(self):
        """Bytes of code per vector (FAISS's ``code_size``): ``ceil(dim * bits / 8)`` plus the norm."""
        return self._codec.row_bytes + 4

    def __repr__(self):
        return (f"TurboQuantIndex(dim={self.dim}, bits={self.bits}, metric={self.metric!r}, "
                f"seed={self.seed}, rotation={self.rotation!r}, ntotal={self._n})")

    # -- adding and removing ------------------------------------------------------------------------
    def _rows(self, vectors, name):
        """(raw, coded): the checked (n, dim) rows, and the rows that are coded
        or searched (the same, or normalised for ``"cosine"``)."""
        rows, _ = as_rows(vectors, self.dim, name)
        if self.metric != "cosine":
            return rows, rows
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows, np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)

    @_writer
    def add(self, vectors, ids=None, *, n_threads=None):
        """Add vectors, coded as they arrive (no training).

        Parameters
        ----------
        vectors : array_like, shape (n, dim) or (dim,)
            Finite real values; float32 and float64 are used as they are.
        ids : array_like of int, shape (n,), optional
            Distinct non-negative int64 ids, none already in the index. By
            default, consecutive ids from one more than the largest id ever
            added (0 for a new or reset index), so an index filled without
            ids numbers its vectors 0, 1, 2, ...
        n_threads : int or None, default=None

        Raises
        ------
        ShapeError, DTypeError, NonFiniteError, InvalidParameterError
            Nothing is added when any check fails.
        """
        raw, rows = self._rows(vectors, "vectors")
        count = rows.shape[0]
        self._own()
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + count, dtype=np.int64)
        else:
            new_ids = _check_ids(ids, count)
            if count and self._n:
                hits = np.searchsorted(self._sorted_ids, new_ids)
                hits = np.minimum(hits, self._n - 1)
                if (self._sorted_ids[hits] == new_ids).any():
                    raise InvalidParameterError("ids holds ids already in the index")
        n_threads = resolve_n_threads(n_threads)
        indices, norms, _ = self._codec.encode(rows, n_threads, name="vectors")
        scale, offset = self._keys(indices, norms, n_threads)
        if count == 0:
            return
        self._grow(self._n + count)
        start, stop = self._n, self._n + count
        if self._fast:
            _core.scan_pack(indices, self._codes, start)
        else:
            self._codes[start:stop] = indices
        self._scale[start:stop] = scale
        if self.metric == "l2":
            self._offset[start:stop] = offset
        self._ids[start:stop] = new_ids
        if self.keep_originals:
            self._originals[start:stop] = raw
        self._n = stop
        self._refresh_block_terms(start)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        # Two sorted runs: timsort merges them in linear time.
        self._sorted_ids = np.sort(np.concatenate([self._sorted_ids, np.sort(new_ids)]), kind="stable")

    def _keys(self, indices, norms, n_threads):
        """Per-row key terms: ``scale`` (n,) float32 and, for ``"l2"``, ``offset``
        ``-||x_hat||^2`` (n,) float32 (None otherwise)."""
        norms32 = norms.astype(np.float32)
        if self.metric != "l2":
            return norms32, None
        squares = np.empty(len(norms), dtype=np.float64)
        ones = np.ones(min(NORM_BLOCK, len(norms)), dtype=np.float32)
        for start in range(0, len(norms), NORM_BLOCK):
            block = indices[start:start + NORM_BLOCK]
            unit = self._codec.decode_rotated(block, ones[:len(block)], np.float64, n_threads)
            squares[start:start + len(block)] = np.einsum("ij,ij->i", unit, unit)
        norms64 = norms32.astype(np.float64)
        return (2.0 * norms64).astype(np.float32), (-(norms64 ** 2) * squares).astype(np.float32)

    def _grow(self, size):
        capacity = self._capacity()
        if size <= capacity:
            return
        capacity = max(size, 2 * capacity, 1024)
        codes = self._empty_codes(capacity)
        held = min(self._codes.shape[0], codes.shape[0])
        codes[:held] = self._codes[:held]
        self._codes = codes
        self._scale = np.resize(self._scale, capacity)
        self._offset = np.resize(self._offset, capacity if self.metric == "l2" else 0)
        self._ids = np.resize(self._ids, capacity)
        if self.keep_originals:
            originals = np.empty((capacity, self.dim), dtype=np.float32)
            originals[:self._n] = self._originals[:self._n]
            self._originals = originals

    @_writer
    def remove(self, ids):
        """Remove the vectors with these ids; ids not in the index are ignored.

        Parameters
        ----------
        ids : array_like of int, shape (r,)

        Returns
        -------
        int
            Number of vectors removed (FAISS's ``remove_ids`` convention).
        """
        array = as_array(ids, "ids")
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise InvalidParameterError(f"ids must be a 1-d array of integers, got shape {array.shape}, "
                                        f"dtype {array.dtype}")
        self._own()
        n = self._n
        drop = np.isin(self._ids[:n], array.astype(np.int64, copy=False))
        removed = int(drop.sum())
        if removed == 0:
            return 0
        kept = np.flatnonzero(~drop).astype(np.int64)
        size = len(kept)
        codes = self._empty_codes(max(size, 1))
        if self._fast:
            rows = np.empty((size, self._codec.row_bytes), dtype=np.uint8)
            _core.scan_unpack(self._codes, kept, rows)
            _core.scan_pack(rows, codes, 0)
        else:
            codes[:size] = self._codes[kept]
        scale, ids = self._scale[kept], self._ids[kept]
        offset = self._offset[kept] if self.metric == "l2" else self._offset[:0]
        originals = self._originals[kept] if self.keep_originals else self._originals
        self._codes, self._scale, self._offset, self._ids, self._originals = codes, scale, offset, ids, originals
        self._n = size
        self._block_terms = self._block_terms[:0]
        self._refresh_block_terms(0)
        self._sorted_ids = np.sort(ids)
        return removed

    # -- search -------------------------------------------------------------------------------------
    @_reader
    def search(self, queries, k, *, rerank=0, originals=None, n_threads=None):
        """The ``k`` nearest vectors of each query, best first.

        Parameters
        ----------
        queries : array_like, shape (m, dim) or (dim,)
            float32 or float64 (other real dtypes as float64); a 1-d query is a
            batch of one. The scan runs in float32 on the rotated query.
        k : int
            >= 1; more than ``len(index)`` pads the results.
        rerank : int, default=0
            When > 0, the best ``max(rerank, k)`` by their codes are rescored
            exactly against the original vectors (kept with
            ``keep_originals=True``, or passed as ``originals``) and the best
            ``k`` of those are returned with their exact scores.
        originals : array_like, shape (N, dim), optional
            The original vectors, row ``id`` being the vector of that id (so
            every id held must be < N); used instead of the kept copy.
        n_threads : int or None, default=None

        Returns
        -------
        scores : ndarray, shape (m, k), the queries' float dtype
            Inner products (``"ip"``), cosine similarities (``"cosine"``), both
            descending, or squared distances (``"l2"``), ascending; estimated
            from the codes, or exact when re-ranked. Missing results are -inf
            (``+inf`` for ``"l2"``).
        ids : ndarray, shape (m, k), int64
            -1 for missing results.

        Raises
        ------
        ShapeError, DTypeError, NonFiniteError, InvalidParameterError
        """
        _, rows = self._rows(queries, "queries")
        k = check_int(k, "k", low=1)
        rerank = check_int(rerank, "rerank", low=0)
        reference = self._reference(originals) if rerank else None
        n_threads = resolve_n_threads(n_threads)
        count = min(max(k, rerank), max(self._n, 1))
        keys, positions = self._scan(rows, count, n_threads)
        if reference is not None:
            scores, positions = self._rerank(rows, positions, reference, k)
        else:
            scores = self._scores(rows, keys)
        ids = self._ids[positions] if self._n else np.full(positions.shape, -1, dtype=np.int64)
        ids[positions < 0] = -1
        if count < k:
            missing = np.inf if self.metric == "l2" else -np.inf
            scores = np.pad(scores, ((0, 0), (0, k - count)), constant_values=missing)
            ids = np.pad(ids, ((0, 0), (0, k - count)), constant_values=-1)
        elif scores.shape[1] > k:
            scores, ids = np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])
        return scores.astype(rows.dtype, copy=False), ids

    def _reference(self, originals):
        if originals is None:
            if not self.keep_originals:
                raise InvalidParameterError("rerank needs keep_originals=True or an originals array")
            return None if self._n == 0 else self._originals
        table, _ = as_rows(originals, self.dim, "originals")
        if self._n and int(self._ids[:self._n].max()) >= table.shape[0]:
            raise InvalidParameterError(
                f"originals has {table.shape[0]} rows; the index holds id {int(self._ids[:self._n].max())}")
        return table

    def _scan(self, rows, count, n_threads):
        """(m, count) float64 keys (larger is better) and int64 positions (-1: none)."""
        m = rows.shape[0]
        keys = np.empty((m, count), dtype=np.float64)
        positions = np.empty((m, count), dtype=np.int64)
        if self._query_matrix is not None:
            rotated = rows.astype(np.float32, copy=False) @ self._query_matrix
        else:
            rotated = np.ascontiguousarray(self._codec.rotate(rows, n_threads), dtype=np.float32)
        n = self._n
        scale, ids = self._scale[:n], self._ids[:n]
        offset = self._offset[:n] if self.metric == "l2" else self._offset[:0]
        centroids = self._codec.codebook.centroids
        if self._fast:
            candidates = max(FAST_SCAN_FACTOR * count, count + FAST_SCAN_SLACK)
            _core.fast_scan_search(self._codes, n, self.bits, centroids, rotated, scale, offset,
                                   self._block_terms[:-(-n // 32)], ids, candidates, keys, positions, n_threads)
        else:
            _core.row_scan_search(self._codes, n, self.bits, centroids, rotated, scale, offset, ids,
                                  keys, positions, n_threads)
        return keys, positions

    def _scores(self, rows, keys):
        if self.metric != "l2":
            return keys
        squares = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)[:, None]
        return np.where(np.isfinite(keys), np.maximum(squares - keys, 0.0), np.inf)

    def _rerank(self, rows, positions, reference, k):
        """Exact scores of the candidates at ``positions`` against ``reference``
        (the kept originals, by position, or a user table, by id), best ``k`` first."""
        m, count = positions.shape
        valid = positions >= 0
        safe = np.maximum(positions, 0)
        index = safe if reference is self._originals else self._ids[safe] if self._n else safe
        queries = rows.astype(np.float64)
        exact = np.empty((m, count), dtype=np.float64)
        # Queries in groups whose gathered candidates take about RERANK_BYTES.
        group = max(1, RERANK_BYTES // max(1, count * self.dim * 8))
        for q0 in range(0, m, group):
            vectors = reference[index[q0:q0 + group]].astype(np.float64)   # (g, count, dim)
            block = queries[q0:q0 + group, None, :]
            if self.metric == "l2":
                diff = vectors - block
                exact[q0:q0 + group] = np.einsum("qij,qij->qi", diff, diff)
                continue
            products = np.einsum("qij,qj->qi", vectors, queries[q0:q0 + group])
            if self.metric == "cosine":
                norms = np.linalg.norm(vectors, axis=2)
                products = np.divide(products, norms, out=np.zeros_like(products), where=norms > 0)
            exact[q0:q0 + group] = products
        worst = np.inf if self.metric == "l2" else -np.inf
        exact[~valid] = worst
        ids = np.where(valid, self._ids[safe] if self._n else -1, np.iinfo(np.int64).max)
        sign = 1.0 if self.metric == "l2" else -1.0
        order = np.lexsort((ids, sign * exact), axis=-1)[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(positions, order, 1)

    # -- persistence ----------------------------------------------------------------------------------
    def check_mapped(self):
        """Check the values of a memory-mapped index now (``load(..., mmap=True)``
        defers them): finite norms, valid and distinct ids.

        Raises
        ------
        CorruptPayloadError
        """
        n = self._n
        _check_row_values(self._scale[:n], self._offset, self._ids[:n], self._originals, self._next_id)
        _sorted_distinct(self._ids[:n])

    def _rebuilt(self):
        return {"codec": self._codec}

    def _payload(self):
        n = self._n
        blocks = -(-n // 32) if self._fast else 0
        config = {"dim": self.dim, "bits": self.bits, "metric": self.metric, "seed": self.seed,
                  "rotation": self.rotation, "keep_originals": self.keep_originals, "ntotal": n,
                  "next_id": self._next_id}
        arrays = {"codes": self._codes[:blocks] if self._fast else self._codes[:n],
                  "scale": self._scale[:n], "offset": self._offset[:n if self.metric == "l2" else 0],
                  "ids": self._ids[:n], "originals": self._originals[:n if self.keep_originals else 0],
                  "block_terms": self._block_terms[:blocks]}
        return config, arrays

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        names = {"dim", "bits", "metric", "seed", "rotation", "keep_originals", "ntotal", "next_id"}
        if set(config) != names:
            raise CorruptPayloadError(f"config: expected the keys {sorted(names)}")
        if set(arrays) != {"codes", "scale", "offset", "ids", "originals", "block_terms"}:
            raise CorruptPayloadError("arrays: expected codes, scale, offset, ids, originals and block_terms")
        index = cls(config["dim"], config["bits"], metric=config["metric"], seed=config["seed"],
                    rotation=config["rotation"], keep_originals=config["keep_originals"])
        n = config_field(config, "ntotal", int)
        next_id = config_field(config, "next_id", int)
        if n < 0 or next_id < 0:
            raise CorruptPayloadError("config.ntotal, config.next_id: must be >= 0")
        blocks = -(-n // 32) if index._fast else 0
        width = 16 * index._nibbles if index._fast else index._codec.row_bytes
        codes = expect(arrays, "codes", np.uint8, (blocks if index._fast else n, width))
        scale = expect(arrays, "scale", np.float32, (n,))
        offset = expect(arrays, "offset", np.float32, (n if index.metric == "l2" else 0,))
        ids = expect(arrays, "ids", np.int64, (n,))
        originals = expect(arrays, "originals", np.float32, (n if index.keep_originals else 0, index.dim))
        block_terms = expect(arrays, "block_terms", np.float32, (blocks, 3))
        expect_finite(block_terms, "block_terms")
        index._n, index._next_id = n, next_id
        if mapped:
            # Read-only views of the map, whose shapes are checked: no read goes
            # out of bounds. Their values are checked when _own() copies them
            # before the first change (or by check_mapped()).
            index._codes, index._scale, index._offset, index._ids = codes, scale, offset, ids
            index._originals, index._block_terms = originals, block_terms
            index._sorted_ids, index._mapped = None, True
            return index
        _check_row_values(scale, offset, ids, originals, next_id)
        index._codes, index._scale, index._offset = codes.copy(), scale.copy(), offset.copy()
        index._ids, index._originals = ids.copy(), originals.copy()
        index._sorted_ids = None
        index._own()
        index._refresh_block_terms(0)
        return index
