"""Checked block operations on packed codes: the one way Python reaches the
encode and score kernels.

Every operation takes whole ``(n, d)`` blocks and checks, in O(1) per call
(never per row), what the kernel will read and write: array type, dtype,
number of dimensions, row width, row count and C-contiguity; codes of the
wrong width raise :class:`IncompatibleCodesError`. Nothing reaches a kernel
before that. What is checked here is the layout, not the values: callers that
take user data (the quantizers' and caches' public methods) also check
finiteness, and convert inputs with :func:`turboquant._validation.as_rows`.

Three kinds of codec share one array-level interface over
``{name: array}`` dicts laid out as :meth:`CodeSpec.row_layout` says
(``quantize``, ``dequantize``, ``inner_products``, ``check_arrays``):
:class:`MSECodec`, :class:`ProdCodec` and :class:`QJLCodec`. :class:`MSECodec`
also exposes the rotated-domain block operations (``encode``,
``decode_rotated``, ``score_rotated``, ``weighted_sum``, ``rotate``,
``unrotate``, ``small_rotation``, ``attention_operands``) that the KV cache and
a search index build on. :class:`BlockMSECodec` is the block-scaled variant
(``TurboQuantMSE(..., block_scales=True)``), with the array-level interface and
``weighted_sum``.
"""

import math
import typing

import numpy as np

from .._errors import (DTypeError, IncompatibleCodesError, InvalidParameterError, LengthMismatchError,
                       NonFiniteError, ShapeError)
from .._kernels import _core
from .._validation import (FLOAT32_MAX, FLOAT_DTYPES, check_all_finite, check_choice, check_float_dtype,
                           check_int, readonly)
from ._block_tables import TABLES as BLOCK_TABLES
from ._codebook import float32_codebook
from ._codes import CodeSpec, packed_row_bytes
from ._rotation import ROTATIONS, SKETCHES, make_rotation, make_sketch

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
U8 = np.dtype(np.uint8)
NORM_DTYPES = (F32, F64)


#: Largest vector dimension (a dense rotation of this dim takes 32 GiB).
MAX_DIM = 1 << 16

#: Rows per block of the dense rotation in ``encode``: about this many bytes of rotated rows.
ROTATED_BLOCK_BYTES = 1 << 23

SIGN_CENTROIDS = readonly(np.array([-1.0, 1.0]))
SIGN_BOUNDARIES = readonly(np.array([0.0]))


# -- O(1) layout checks ---------------------------------------------------------------------------
def _dtype_names(dtypes):
    return " or ".join(str(dtype) for dtype in dtypes)


def _check_array(array, name, ndim, dtypes):
    if not isinstance(array, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype not in dtypes:
        raise DTypeError(f"{name} has dtype {array.dtype}; expected {_dtype_names(dtypes)}")
    if array.ndim != ndim:
        raise ShapeError(f"{name} has shape {array.shape}; expected a {ndim}-d array")
    if not array.flags.c_contiguous:
        raise ShapeError(f"{name} must be C-contiguous")


def _check_rows(array, name, expected):
    if expected is not None and array.shape[0] != expected:
        raise LengthMismatchError(f"{name} has {array.shape[0]} rows; expected {expected}")


def check_block(array, name, *, width=None, rows=None, dtypes=FLOAT_DTYPES):
    """Check a 2-d C-contiguous block of ``dtypes`` with ``width`` columns and
    ``rows`` rows (None: any), and return it.

    Raises
    ------
    DTypeError, ShapeError, LengthMismatchError
    """
    _check_array(array, name, 2, dtypes)
    if width is not None and array.shape[1] != width:
        raise ShapeError(f"{name} has shape {array.shape}; expected (n, {width})")
    _check_rows(array, name, rows)
    return array


def check_output(out, name, shape, dtype):
    """Check a writeable C-contiguous output array of exactly ``shape`` and ``dtype``."""
    _check_array(out, name, len(shape), (np.dtype(dtype),))
    if out.shape != tuple(shape):
        raise ShapeError(f"{name} has shape {out.shape}; expected {tuple(shape)}")
    if not out.flags.writeable:
        raise InvalidParameterError(f"{name} is read-only")
    return out


def check_packed(codes, name, row_bytes, *, rows=None):
    """Check ``(n, row_bytes)`` uint8 C-contiguous packed codes; a different
    width means codes of another dim or bit width (IncompatibleCodesError)."""
    _check_array(codes, name, 2, (U8,))
    if codes.shape[1] != row_bytes:
        raise IncompatibleCodesError(
            f"{name} has rows of {codes.shape[1]} bytes; these codes have {row_bytes} bytes per row")
    _check_rows(codes, name, rows)
    return codes


def check_scales(scales, name, rows, dtypes=NORM_DTYPES):
    """Check ``(rows,)`` C-contiguous per-row scales and return them as the
    float64 array the kernels read (float32 ones are converted)."""
    _check_array(scales, name, 1, dtypes)
    if scales.shape[0] != rows:
        raise LengthMismatchError(f"{name} has {scales.shape[0]} entries; the codes have {rows} rows")
    return scales if scales.dtype == F64 else scales.astype(F64)


def check_thread_count(n_threads):
    """A resolved thread count (a positive int, see :func:`turboquant.resolve_n_threads`)."""
    return check_int(n_threads, "n_threads", low=1)


def _check_storable(norms, rows, name):
    """Refuse rows with NaN or infinity (their norm is not finite) and norms beyond float32."""
    if norms.size and not norms.max() <= FLOAT32_MAX:
        check_all_finite(rows, name)
        raise NonFiniteError(f"a vector of {name} has a norm beyond the float32 range and cannot be stored")


def row_norms(rows, n_threads, name="x"):
    """(n,) float64 Euclidean norms of a float block; NonFiniteError when one does
    not fit float32 (so a NaN or infinite entry is refused too)."""
    check_block(rows, name)
    norms = np.empty(rows.shape[0])
    _core.row_norms(rows, norms, check_thread_count(n_threads))
    _check_storable(norms, rows, name)
    return norms


def qjl_scale(dim, sketch):
    """Constant ``gamma`` of the QJL estimator ``<q, r> ~ ||r|| gamma <S q, sign(S r)>``.

    For the Gaussian sketch (rows of squared norm ~ dim) ``E[sign(<s, r>) <s, q>] =
    sqrt(2/pi) <q, r>/||r||`` exactly, so ``gamma = sqrt(pi/2) / dim``. For the
    orthogonal Hadamard sketch (unit rows) the matching expectation for a uniformly
    random unit row is ``c_d <q, r>/||r||`` with ``c_d = E|s_1| =
    Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))``, so ``gamma = 1 / (dim c_d)``, which
    is ``sqrt(pi/2)/sqrt(dim) * (1 + O(1/dim))``.
    """
    if sketch == "gaussian":
        return math.sqrt(math.pi / 2.0) / dim
    # 1/c_d from c_2 = 2/pi, c_3 = 1/2 and c_(k+2) = c_k k/(k+1): only + * / of
    # exact operands, so the constant is the same bits on every machine (libm's
    # lgamma and exp are not).
    inverse_c = math.pi / 2.0 if dim % 2 == 0 else 2.0
    for k in range(2 + dim % 2, dim, 2):
        inverse_c = inverse_c * (k + 1) / k
    return inverse_c / dim


def _decode_rows(packed, name, row_bytes, bits, centroids, scales, dim, dtype, n_threads):
    """(n, dim) ``scales[i] * centroids[index(i, :)]`` of ``dtype``, checked."""
    check_packed(packed, name, row_bytes)
    scales = check_scales(scales, "scales", packed.shape[0])
    dtype, n_threads = check_float_dtype(dtype), check_thread_count(n_threads)
    out = np.empty((packed.shape[0], dim), dtype=dtype)
    if out.shape[0]:
        _core.dequantize_rows(packed, bits, centroids, scales, out, n_threads)
    return out


def _score_rows(packed, name, row_bytes, bits, centroids, scales, queries, dim, out, accumulate, n_threads):
    """``out[q, i] (+)= scales[i] <queries[q], centroids[index(i, :)]>``, checked;
    ``out`` is allocated when None (``accumulate`` must then be False)."""
    check_packed(packed, name, row_bytes)
    scales = check_scales(scales, "scales", packed.shape[0])
    check_block(queries, "queries", width=dim)
    shape = (queries.shape[0], packed.shape[0])
    if out is None:
        if accumulate:
            raise InvalidParameterError("accumulate needs an out array")
        out = np.empty(shape, dtype=queries.dtype)
    check_output(out, "out", shape, queries.dtype)
    n_threads = check_thread_count(n_threads)
    if out.size:
        _core.lut_inner_products(packed, bits, centroids, queries, scales, out, bool(accumulate), n_threads)
    return out


class _ArrayCodec:
    """Array-level interface shared by the three codecs (``spec`` set by each).

    Codecs are immutable: copies (``copy.copy``, ``copy.deepcopy``) are the codec itself.
    """

    spec = None

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def check_arrays(self, arrays):
        """Check a ``{name: array}`` dict against the spec's row layout; return its row count.

        Raises
        ------
        IncompatibleCodesError
            If a name is missing or extra, or packed rows have another width.
        DTypeError, ShapeError, LengthMismatchError
        """
        layout = self.spec.row_layout()
        if not isinstance(arrays, dict) or set(arrays) != set(layout):
            got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
            raise IncompatibleCodesError(f"{self.spec.kind} codes need arrays {sorted(layout)}, got {got}")
        rows = None
        for name, (dtype, width) in layout.items():
            array = arrays[name]
            if width is None:
                _check_array(array, name, 1, (np.dtype(dtype),))
            else:
                check_packed(array, name, width)
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise LengthMismatchError(f"{name} has {array.shape[0]} rows; the other arrays have {rows}")
        return rows

    def inner_products(self, arrays, queries, n_threads):
        """(m, n) estimates of ``<queries[q], x_i>`` in the queries' dtype, for (m, dim)
        C-contiguous float ``queries``."""
        n = self.check_arrays(arrays)
        check_block(queries, "queries", width=self.spec.dim)
        out = np.empty((queries.shape[0], n), dtype=queries.dtype)
        self._score(arrays, queries, out, check_thread_count(n_threads))
        return out


class _SignCodec:
    """Packed signs of ``S r`` for a seeded sketch ``S`` (the QJL stage of Prod and QJL codes)."""

    def __init__(self, dim, seed, sketch):
        self.kind = check_choice(sketch, "sketch", SKETCHES)
        self.dim = dim
        self.transform = make_sketch(self.kind, dim, seed)
        self.scale = qjl_scale(dim, self.kind)
        self.row_bytes = packed_row_bytes(dim, 1)

    def encode(self, rows, n_threads):
        """(n, ceil(dim/8)) packed signs of ``S rows`` (bit set where the value is > 0)."""
        check_block(rows, "rows", width=self.dim)
        n_threads = check_thread_count(n_threads)
        n = rows.shape[0]
        packed = np.empty((n, self.row_bytes), dtype=np.uint8)
        if n:
            sketched = self.transform.apply(rows, n_threads)
            _core.quantize_pack(sketched, np.ones(n), SIGN_BOUNDARIES, SIGN_CENTROIDS, 1,
                                packed, np.empty((0, 0), dtype=rows.dtype), False, n_threads)
        return packed

    def decode(self, signs, weights, dtype, n_threads):
        """``weights[i] * S^T sign_i`` for every row, (n, dim) of ``dtype``."""
        out = _decode_rows(signs, "signs", self.row_bytes, 1, SIGN_CENTROIDS, weights, self.dim, dtype, n_threads)
        return self.transform.apply_transpose(out, check_thread_count(n_threads))

    def score(self, signs, weights, queries, out, accumulate, n_threads):
        """``out[q, i] (+)= weights[i] <S queries[q], sign_i>`` (queries not yet sketched)."""
        check_block(queries, "queries", width=self.dim)
        sketched = self.transform.apply(queries, check_thread_count(n_threads))
        return _score_rows(signs, "signs", self.row_bytes, 1, SIGN_CENTROIDS, weights, sketched, self.dim, out,
                           accumulate, n_threads)


class _RotatedCodec(_ArrayCodec):
    """Rotation helpers of the codecs that quantize rotated rows (``rotation``, ``dim`` set by each)."""

    def rotate(self, rows, n_threads):
        """``rows @ Pi.T``: (n, dim) C-contiguous float rows into the codes' rotated domain."""
        check_block(rows, "rows", width=self.dim)
        return self.rotation.apply(rows, check_thread_count(n_threads))

    def unrotate(self, rows, n_threads):
        """``rows @ Pi``: rotated-domain rows back (the inverse of :meth:`rotate`)."""
        check_block(rows, "rows", width=self.dim)
        return self.rotation.inverse(rows, check_thread_count(n_threads))

    def fused_parts(self, arrays, rows, queries, n_threads):
        """``[(FusedSide, rotated queries)]``: the codes ``arrays`` (``rows`` of
        them) as coded key parts of the fused kernels, for (m, dim) float32 ``queries``."""
        return [(self.fused_side(arrays, rows), self.rotate(queries, n_threads))]

    def small_rotation(self, rows, *, inverse=False):
        """The C-contiguous float32 (dim, dim) ``B`` with ``x @ B`` what :meth:`rotate`
        (or :meth:`unrotate` when ``inverse``) computes for ``rows`` float32 rows,
        when that is a small product a kernel can run itself; else None."""
        rows = check_int(rows, "rows", low=0)
        operand = self.rotation.small_operand(rows, F32, bool(inverse))
        if operand is not None:
            check_block(operand, "rotation operand", width=self.dim, rows=self.dim, dtypes=(F32,))
        return operand


class FusedSide(typing.NamedTuple):
    """One side (keys or values) of the fused attention kernels, checked.

    ``codes`` (n, row_bytes) uint8, ``bits`` (1..8; 1..4 block-scaled), ``centroids``
    float64, ``norms`` (n,) float32; for block-scaled codes ``block_scales``
    (n, block_bytes) uint8 and the 16 float64 ``factors``, else None. Row ``i``
    is scaled by ``norms[i] * norms2[i] * factor`` (``norms2`` (n,) float32 or
    None for 1: the QJL stage of Prod codes).
    """

    codes: np.ndarray
    bits: int
    centroids: np.ndarray
    norms: np.ndarray
    block_scales: object = None
    factors: object = None
    norms2: object = None
    factor: float = 1.0

    def key_part(self, queries):
        """This side as an ``extra_keys`` part of ``_core.small_code_attention``,
        scored against (m, width) float32 ``queries``."""
        return (self.codes, self.bits, self.centroids, self.norms, self.norms2, self.factor,
                self.block_scales, self.factors, queries)


class MSECodec(_RotatedCodec):
    """``bits``-bit Lloyd-Max codes of rotated unit rows, with their norms.

    Parameters
    ----------
    dim : int
        >= 2.
    bits : int
        1..8.
    seed : int
        >= 0, seed of the rotation.
    rotation : {"dense", "hadamard"}

    Attributes
    ----------
    codebook : Codebook
    rotation : DenseRotation or HadamardRotation
    row_bytes : int
        ``ceil(dim * bits / 8)``, bytes per packed row.
    spec : CodeSpec
    """

    def __init__(self, dim, bits, seed, rotation):
        self.dim = check_int(dim, "dim", low=2, high=MAX_DIM)
        self.bits = check_int(bits, "bits", low=1, high=8)
        seed = check_int(seed, "seed", low=0)
        kind = check_choice(rotation, "rotation", ROTATIONS)
        self.codebook = float32_codebook(self.dim, self.bits)
        self.rotation = make_rotation(kind, self.dim, seed)
        self.row_bytes = packed_row_bytes(self.dim, self.bits)
        self.spec = CodeSpec("mse", self.dim, self.bits, seed, kind)

    # -- rotated-domain block operations ----------------------------------------------------------
    def encode(self, rows, n_threads, want_residual=False, name="rows"):
        """Quantize (n, dim) C-contiguous float rows.

        Returns
        -------
        indices : (n, row_bytes) uint8
        norms : (n,) float64
        residual : (n, dim) of the rows' dtype when ``want_residual`` (the rotated
            unit-domain residual ``Pi x/||x|| - centroids[index]``), else (0, 0)

        Raises
        ------
        NonFiniteError
            If a row holds NaN or infinity or its norm exceeds float32.
        """
        check_block(rows, name, width=self.dim)
        n_threads = check_thread_count(n_threads)
        n = rows.shape[0]
        indices = np.empty((n, self.row_bytes), dtype=np.uint8)
        residual = np.empty((n, self.dim) if want_residual else (0, 0), dtype=rows.dtype)
        book = self.codebook
        if hasattr(self.rotation, "signs"):
            # One fused pass: norms, rotation and packing.
            norms = np.empty(n)
            if n:
                _core.hadamard_quantize_pack(rows, self.rotation.signs, self.rotation.block,
                                             book.boundaries, book.centroids, self.bits, norms,
                                             indices, residual, want_residual, n_threads)
            _check_storable(norms, rows, name)
            return indices, norms, residual
        operand = self.rotation.small_operand(n, rows.dtype, False)
        if operand is not None:
            # A few rows (a decode step's token): norms, the small product and the
            # packing in one call, with the bits of the three steps below.
            norms = np.empty(n)
            if n:
                _core.small_dense_quantize_pack(rows, operand, book.boundaries, book.centroids,
                                                self.bits, norms, indices, residual, want_residual)
            _check_storable(norms, rows, name)
            return indices, norms, residual
        norms = row_norms(rows, n_threads, name)
        # Rotate and quantize in blocks of rows whose rotated copy fits in the
        # cache: the quantizer reads it back while it is still there, and no
        # (n, dim) rotated array is ever held.
        block = max(1, ROTATED_BLOCK_BYTES // (self.dim * rows.itemsize))
        for start in range(0, n, block):
            stop = min(n, start + block)
            _core.quantize_pack(self.rotation.apply(rows[start:stop], n_threads), norms[start:stop],
                                book.boundaries, book.centroids, self.bits, indices[start:stop],
                                residual[start:stop] if want_residual else residual, want_residual,
                                n_threads)
        return indices, norms, residual

    def decode_rotated(self, indices, scales, dtype, n_threads):
        """(n, dim) rotated-domain rows ``scales[i] * centroids[index(i, :)]`` of ``dtype``."""
        return _decode_rows(indices, "indices", self.row_bytes, self.bits, self.codebook.centroids, scales,
                            self.dim, dtype, n_threads)

    def score_rotated(self, indices, scales, rotated_queries, out=None, accumulate=False, n_threads=1):
        """``out[q, i] (+)= scales[i] <rotated_queries[q], centroids[index(i, :)]>``.

        ``rotated_queries`` is (m, dim) C-contiguous float, already rotated;
        ``out`` (m, n) of the queries' dtype is allocated when None (and then
        ``accumulate`` must be False). Returns ``out``.
        """
        return _score_rows(indices, "indices", self.row_bytes, self.bits, self.codebook.centroids, scales,
                           rotated_queries, self.dim, out, accumulate, n_threads)

    def weighted_sum(self, indices, scales, weights, n_threads):
        """(m, dim) float64 ``sum_i weights[q, i] * scales[i] * Pi^T centroids[index(i, :)]``
        for (m, n) C-contiguous float ``weights``, summed in the rotated domain and
        rotated back once per row."""
        check_packed(indices, "indices", self.row_bytes)
        scales = check_scales(scales, "scales", indices.shape[0])
        check_block(weights, "weights", width=indices.shape[0])
        n_threads = check_thread_count(n_threads)
        rotated = np.empty((weights.shape[0], self.dim))
        _core.lut_weighted_sum(indices, self.bits, self.codebook.centroids, weights, scales, rotated,
                               n_threads)
        return self.rotation.inverse(rotated, n_threads)

    def attention_operands(self, indices, norms, rows=None):
        """``(indices, bits, centroids, norms)`` for the fused attention kernels,
        checked: (n, row_bytes) packed ``indices`` and (n,) float32 ``norms``,
        both C-contiguous, ``n == rows`` when given."""
        check_packed(indices, "indices", self.row_bytes, rows=rows)
        _check_array(norms, "norms", 1, (F32,))
        if norms.shape[0] != indices.shape[0]:
            raise LengthMismatchError(f"norms has {norms.shape[0]} entries; the codes have {indices.shape[0]} rows")
        return indices, self.bits, self.codebook.centroids, norms

    def fused_side(self, arrays, rows):
        """:class:`FusedSide` of the codes ``arrays`` (``rows`` of them)."""
        return FusedSide(*self.attention_operands(arrays["indices"], arrays["norms"], rows))

    # -- array level --------------------------------------------------------------------------------
    def quantize(self, rows, n_threads, name="rows"):
        """``{"indices", "norms"}`` codes of (n, dim) C-contiguous float rows (``name``
        is used in error messages)."""
        indices, norms, _ = self.encode(rows, n_threads, name=name)
        return {"indices": indices, "norms": norms.astype(np.float32)}

    def dequantize(self, arrays, dtype, n_threads):
        """(n, dim) reconstruction of ``dtype``."""
        self.check_arrays(arrays)
        rotated = self.decode_rotated(arrays["indices"], arrays["norms"], dtype, n_threads)
        return self.unrotate(rotated, n_threads)

    def _score(self, arrays, queries, out, n_threads):
        rotated = self.rotation.apply(queries, n_threads)
        self.score_rotated(arrays["indices"], arrays["norms"], rotated, out, False, n_threads)


class ProdCodec(_ArrayCodec):
    """A ``(bits - 1)``-bit :class:`MSECodec` stage and the packed QJL signs of its residual.

    Parameters
    ----------
    dim : int
    bits : int
        2..8 in total.
    seed : int
    rotation : {"dense", "hadamard"}
    sketch : {"gaussian", "hadamard"}
    """

    def __init__(self, dim, bits, seed, rotation, sketch):
        bits = check_int(bits, "bits", low=2, high=8)
        self.mse = MSECodec(dim, bits - 1, seed, rotation)
        self.sketch = _SignCodec(self.mse.dim, self.mse.spec.seed, sketch)
        self.spec = CodeSpec("prod", self.mse.dim, bits, self.mse.spec.seed, self.mse.spec.rotation,
                             self.sketch.kind)

    def quantize(self, rows, n_threads, name="rows"):
        """``{"indices", "signs", "norms", "residual_norms"}`` codes of (n, dim) float rows."""
        indices, norms, residual = self.mse.encode(rows, n_threads, want_residual=True, name=name)
        residual_norms = row_norms(residual, n_threads, "residual")
        return {"indices": indices, "signs": self.sketch.encode(residual, n_threads),
                "norms": norms.astype(np.float32), "residual_norms": residual_norms.astype(np.float32)}

    def _qjl_weights(self, arrays):
        return arrays["norms"].astype(np.float64) * arrays["residual_norms"] * self.sketch.scale

    def dequantize(self, arrays, dtype, n_threads):
        """(n, dim) reconstruction of ``dtype``."""
        self.check_arrays(arrays)
        rotated = self.mse.decode_rotated(arrays["indices"], arrays["norms"], dtype, n_threads)
        rotated += self.sketch.decode(arrays["signs"], self._qjl_weights(arrays), dtype, n_threads)
        return self.mse.unrotate(rotated, n_threads)

    def _score(self, arrays, queries, out, n_threads):
        rotated = self.mse.rotation.apply(queries, n_threads)
        self.mse.score_rotated(arrays["indices"], arrays["norms"], rotated, out, False, n_threads)
        self.sketch.score(arrays["signs"], self._qjl_weights(arrays), rotated, out, True, n_threads)

    def fused_parts(self, arrays, rows, queries, n_threads):
        """``[(FusedSide, queries)]`` of the MSE stage (rotated queries) and of the
        QJL signs (the rotated queries sketched; rows scaled by ``norms *
        residual_norms * gamma``), for (m, dim) float32 ``queries``."""
        self.check_arrays(arrays)
        mse = self.mse.fused_side({"indices": arrays["indices"], "norms": arrays["norms"]}, rows)
        rotated = self.mse.rotate(queries, n_threads)
        signs = FusedSide(arrays["signs"], 1, SIGN_CENTROIDS, arrays["norms"], norms2=arrays["residual_norms"],
                          factor=self.sketch.scale)
        sketched = self.sketch.transform.apply(rotated, check_thread_count(n_threads))
        return [(mse, rotated), (signs, check_block(sketched, "sketched queries", dtypes=(F32,)))]


class QJLCodec(_ArrayCodec):
    """Packed signs of ``S x`` and the norms of ``x``.

    Parameters
    ----------
    dim : int
    seed : int
    sketch : {"gaussian", "hadamard"}
    """

    def __init__(self, dim, seed, sketch):
        dim, seed = check_int(dim, "dim", low=2, high=MAX_DIM), check_int(seed, "seed", low=0)
        self.sketch = _SignCodec(dim, seed, sketch)
        self.spec = CodeSpec("qjl", dim, 1, seed, "", self.sketch.kind)

    def quantize(self, rows, n_threads, name="rows"):
        """``{"signs", "norms"}`` codes of (n, dim) C-contiguous float rows."""
        norms = row_norms(rows, n_threads, name)
        return {"signs": self.sketch.encode(rows, n_threads), "norms": norms.astype(np.float32)}

    def _weights(self, arrays):
        return arrays["norms"].astype(np.float64) * self.sketch.scale

    def dequantize(self, arrays, dtype, n_threads):
        """(n, dim) reconstruction of ``dtype``."""
        self.check_arrays(arrays)
        return self.sketch.decode(arrays["signs"], self._weights(arrays), dtype, n_threads)

    def _score(self, arrays, queries, out, n_threads):
        self.sketch.score(arrays["signs"], self._weights(arrays), queries, out, False, n_threads)


class BlockMSECodec(_RotatedCodec):
    """Block-scaled ``bits``-bit codes of rotated rows (``TurboQuantMSE(..., block_scales=True)``).

    A row ``x`` is rotated to ``y = Pi x`` and held as ``g = rms(y)`` rounded to
    float16 (``norms``), per block of BLOCK_SCALE_SIZE coordinates the index of
    the factor ``f[k]`` of least squared error (``block_scales``, 4 bits each)
    and per coordinate the index of ``y[j] / (g f[k])`` in a codebook fitted
    with the factors to Gaussian blocks (``turboquant.quant._block_tables``).

    Parameters
    ----------
    dim, seed, rotation
        As for :class:`MSECodec`.
    bits : int
        1..4 (the bit widths of turboquant.quant._block_tables).

    Attributes
    ----------
    centroids : (2**bits,) float64, read-only
    boundaries : (2**bits - 1,) float64, read-only, midpoints of ``centroids``
    factors : (16,) float64, read-only
    fitted_distortion : float
        Relative MSE of the fit on Gaussian vectors (see bench/fit_block_tables.py).
    rotation : DenseRotation or HadamardRotation
    spec : CodeSpec
    """

    def __init__(self, dim, bits, seed, rotation):
        self.dim = check_int(dim, "dim", low=2, high=MAX_DIM)
        self.bits = check_int(bits, "bits (block-scaled codes)", low=1, high=max(BLOCK_TABLES))
        seed = check_int(seed, "seed", low=0)
        kind = check_choice(rotation, "rotation", ROTATIONS)
        centroids, factors, self.fitted_distortion = BLOCK_TABLES[self.bits]
        self.centroids = readonly(np.array(centroids, dtype=np.float64))
        self.boundaries = readonly((self.centroids[1:] + self.centroids[:-1]) / 2)
        self.factors = readonly(np.array(factors, dtype=np.float64))
        self.rotation = make_rotation(kind, self.dim, seed)
        self.spec = CodeSpec("mse", self.dim, self.bits, seed, kind, block_scales=True)
        layout = self.spec.row_layout()
        self.row_bytes, self.block_bytes = layout["indices"][1], layout["block_scales"][1]

    def quantize(self, rows, n_threads, name="rows"):
        """``{"indices", "block_scales", "norms"}`` codes of (n, dim) C-contiguous float rows.

        Raises
        ------
        NonFiniteError
            If a row holds NaN or infinity, or its rms overflows float16 (65504).
        """
        check_block(rows, name, width=self.dim)
        n_threads = check_thread_count(n_threads)
        rotated = self.rotation.apply(rows, n_threads)
        rms = row_norms(rotated, n_threads, name) / math.sqrt(self.dim)
        with np.errstate(over="ignore"):
            scales = rms.astype(np.float16)
        if not np.isfinite(scales).all():
            raise NonFiniteError(f"{name} has a row whose rms exceeds float16's range (65504); "
                                 "block-scaled codes store it as float16")
        n = rows.shape[0]
        indices = np.empty((n, self.row_bytes), dtype=np.uint8)
        block_scales = np.empty((n, self.block_bytes), dtype=np.uint8)
        if n:
            _core.block_quantize_pack(rotated, scales.astype(np.float64), self.boundaries, self.centroids,
                                      self.factors, self.bits, indices, block_scales, n_threads)
        return {"indices": indices, "block_scales": block_scales, "norms": scales}

    def _operands(self, arrays):
        """``(indices, block_scales, bits, centroids, factors, float64 scales)`` of checked codes."""
        self.check_arrays(arrays)
        return (arrays["indices"], arrays["block_scales"], self.bits, self.centroids, self.factors,
                arrays["norms"].astype(np.float64))

    def dequantize(self, arrays, dtype, n_threads):
        """(n, dim) reconstruction of ``dtype``."""
        operands = self._operands(arrays)
        dtype, n_threads = check_float_dtype(dtype), check_thread_count(n_threads)
        rotated = np.empty((operands[0].shape[0], self.dim), dtype=dtype)
        if rotated.shape[0]:
            _core.block_dequantize(*operands, rotated, n_threads)
        return self.rotation.inverse(rotated, n_threads)

    def _score(self, arrays, queries, out, n_threads):
        operands = self._operands(arrays)
        rotated = self.rotation.apply(queries, n_threads)
        if out.size:
            _core.block_inner_products(*operands, rotated, out, n_threads)

    def fused_side(self, arrays, rows):
        """:class:`FusedSide` of the codes ``arrays`` (``rows`` of them; the
        float16 scales widened to float32)."""
        self.check_arrays(arrays)
        if arrays["indices"].shape[0] != rows:
            raise LengthMismatchError(f"the codes have {arrays['indices'].shape[0]} rows, expected {rows}")
        return FusedSide(arrays["indices"], self.bits, self.centroids, arrays["norms"].astype(F32),
                         arrays["block_scales"], self.factors)

    def weighted_sum(self, arrays, weights, n_threads):
        """(m, dim) float64 ``sum_i weights[q, i] * x_hat_i`` for (m, n) C-contiguous float64 ``weights``."""
        operands = self._operands(arrays)
        check_block(weights, "weights", width=operands[0].shape[0], dtypes=(F64,))
        n_threads = check_thread_count(n_threads)
        rotated = np.empty((weights.shape[0], self.dim))
        if rotated.size:
            _core.block_weighted_sum(*operands, weights, rotated, n_threads)
        return self.rotation.inverse(rotated, n_threads)
