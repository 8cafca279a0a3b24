"""The TurboQuant quantizers: :class:`TurboQuantMSE`, :class:`TurboQuantProd` and :class:`QJL`.

Python holds parameters, validation and allocation; every loop over vectors
runs in :mod:`turboquant._core` (rotation by numpy's BLAS for ``"dense"``).
"""

import math

import numpy as np

from .._kernels import _core
from ._codebook import float32_codebook
from ._codes import CodeSpec, MSECodes, ProdCodes, QJLCodes, packed_row_bytes
from .._errors import InvalidParameterError, NonFiniteError
from ._rotation import ROTATIONS, SKETCHES, make_rotation, make_sketch
from .._threads import resolve_n_threads
from .._validation import FLOAT32_MAX, FLOAT_DTYPES, as_rows, check_all_finite, check_choice, check_int

#: Rows per block of the dense rotation in ``encode``: about this many bytes of rotated rows.
ROTATED_BLOCK_BYTES = 1 << 23

SIGN_CENTROIDS = np.array([-1.0, 1.0])
SIGN_BOUNDARIES = np.array([0.0])

for _array in (SIGN_CENTROIDS, SIGN_BOUNDARIES):
    _array.setflags(write=False)


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
    c_d = math.exp(math.lgamma(dim / 2.0) - math.lgamma((dim + 1) / 2.0)) / math.sqrt(math.pi)
    return 1.0 / (dim * c_d)


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise InvalidParameterError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class _Quantizer:
    """Shared plumbing: argument checks, norms, query handling and output shapes."""

    codes_type = None

    def __init__(self, dim, seed):
        self.dim = check_int(dim, "dim", low=2)
        self.seed = check_int(seed, "seed", low=0)

    def _norms(self, rows, n_threads):
        norms = np.empty(rows.shape[0])
        _core.row_norms(rows, norms, n_threads)
        self._check_norms(norms, rows)
        return norms

    @staticmethod
    def _check_norms(norms, rows):
        """Refuse rows with NaN or infinity (their norm is not finite) and norms
        beyond float32."""
        if norms.size and not norms.max() <= FLOAT32_MAX:
            check_all_finite(rows, "x")
            raise NonFiniteError("a vector's norm exceeds the float32 range and cannot be stored")

    def _check_codes(self, codes):
        if not isinstance(codes, self.codes_type):
            raise InvalidParameterError(
                f"expected {self.codes_type.__name__}, got {type(codes).__name__}")
        codes.check_compatible(self.spec, "read")

    def _queries(self, queries):
        return as_rows(queries, self.dim, "queries")

    @staticmethod
    def _scores_shape(out, was_1d):
        return out[0] if was_1d else out

    def quantize(self, x, *, n_threads=None):
        """Quantize a vector or a batch of vectors.

        Parameters
        ----------
        x : array_like, shape (dim,) or (n, dim)
            Finite real values of any norm (a zero vector is allowed); float32
            and float64 are used as they are, other real dtypes as float64.
            A 1-d input is a batch of one.
        n_threads : int or None, default=None
            OpenMP threads (see :func:`turboquant.resolve_n_threads`).

        Returns
        -------
        Codes
            ``n`` codes (``len(codes) == n``).

        Raises
        ------
        ShapeError, DTypeError, NonFiniteError
        """
        rows, _ = as_rows(x, self.dim, "x", check_finite=False)   # the norms check it
        return self._quantize_rows(rows, resolve_n_threads(n_threads))

    def dequantize(self, codes, *, dtype=np.float64, n_threads=None):
        """Reconstruct vectors from codes.

        Parameters
        ----------
        codes : Codes
            Made by a quantizer with the same parameters.
        dtype : {numpy.float64, numpy.float32}, default=numpy.float64
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (n, dim), C-contiguous
        """
        self._check_codes(codes)
        return self._dequantize(codes, _check_dtype(dtype), resolve_n_threads(n_threads))

    def inner_products(self, codes, queries, *, n_threads=None):
        """Estimate ``<query, x>`` for every query and every coded vector, without dequantizing.

        Parameters
        ----------
        codes : Codes
            ``n`` codes from a quantizer with the same parameters.
        queries : array_like, shape (dim,) or (m, dim)
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (m, n), or (n,) for a 1-d query
            In the queries' float dtype (float64 for other real dtypes).
        """
        self._check_codes(codes)
        rows, was_1d = self._queries(queries)
        out = np.empty((rows.shape[0], len(codes)), dtype=rows.dtype)
        self._inner_products(codes, rows, out, resolve_n_threads(n_threads))
        return self._scores_shape(out, was_1d)


class TurboQuantMSE(_Quantizer):
    """TurboQuant optimised for mean squared error.

    A vector ``x`` is stored as its norm (float32) and the ``bits``-bit
    Lloyd-Max index of each coordinate of ``Pi x / ||x||``, where ``Pi`` is a
    seeded random rotation; the codebook is optimal for the exact density of a
    coordinate of a uniformly random unit vector in R^dim.

    Parameters
    ----------
    dim : int
        Vector dimension, >= 2.
    bits : int
        Bits per coordinate, 1..8. Indices are bit-packed: a vector takes
        ``ceil(dim * bits / 8)`` bytes plus 4 for its norm.
    seed : int, default=0
        Non-negative seed of the rotation; equal parameters give identical codes.
    rotation : {"dense", "hadamard"}, default="dense"
        ``"dense"``: Haar-random orthogonal matrix (the paper's choice), applied
        with BLAS. ``"hadamard"``: randomized Hadamard transform, O(d log d), for
        any dim (see :mod:`turboquant._rotation`).

    Attributes
    ----------
    codebook : Codebook
        Centroids, boundaries and expected distortion for (dim, bits).
    expected_distortion : float
        ``E||x - x_hat||^2`` for unit-norm ``x`` (the paper's D_mse).
    spec : CodeSpec
    """

    codes_type = MSECodes

    def __init__(self, dim, bits, *, seed=0, rotation="dense"):
        super().__init__(dim, seed)
        self.bits = check_int(bits, "bits", low=1, high=8)
        self.rotation = check_choice(rotation, "rotation", ROTATIONS)
        self.codebook = float32_codebook(self.dim, self.bits)
        self._rotation = make_rotation(self.rotation, self.dim, self.seed)
        self.spec = CodeSpec("mse", self.dim, self.bits, self.seed, self.rotation)

    @property
    def expected_distortion(self):
        """``E||x - x_hat||^2`` for unit-norm ``x`` (the codebook's exact distortion, the paper's D_mse)."""
        return self.codebook.distortion

    @property
    def code_bytes(self):
        """Bytes per stored vector: packed indices plus a float32 norm."""
        return packed_row_bytes(self.dim, self.bits) + 4

    def __repr__(self):
        return (f"TurboQuantMSE(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
                f"rotation={self.rotation!r})")

    # -- kernels plumbing, shared with TurboQuantProd and the KV cache ---------
    def rotate(self, rows, n_threads):
        """Rotate C-contiguous float rows into the codes' domain (``Pi x``)."""
        return self._rotation.apply(rows, n_threads)

    def unrotate(self, rows, n_threads):
        """Map rotated-domain rows back (``Pi^T y``)."""
        return self._rotation.inverse(rows, n_threads)

    def small_rotation(self, rows, *, inverse=False):
        """The float32 (dim, dim) ``B`` with ``x @ B`` what :meth:`rotate` (or
        :meth:`unrotate` when ``inverse``) computes for ``rows`` float32 rows, when
        that is a small dense product a kernel can run itself; else None."""
        return self._rotation.small_operand(rows, np.dtype(np.float32), inverse)

    def encode(self, rows, n_threads, want_residual=False):
        """Packed indices, float64 norms and (optionally) the rotated unit-domain residual."""
        n = rows.shape[0]
        indices = np.empty((n, packed_row_bytes(self.dim, self.bits)), dtype=np.uint8)
        residual = np.empty((n, self.dim) if want_residual else (0, 0), dtype=rows.dtype)
        book = self.codebook
        if self.rotation == "hadamard":
            # One fused pass: norms, rotation and packing.
            norms = np.empty(n)
            if n:
                _core.hadamard_quantize_pack(rows, self._rotation.signs, self._rotation.block,
                                             book.boundaries, book.centroids, self.bits, norms,
                                             indices, residual, want_residual, n_threads)
            self._check_norms(norms, rows)
            return indices, norms, residual
        operand = self._rotation.small_operand(n, rows.dtype, False)
        if operand is not None:
            # A few rows (a decode step's token): norms, the small product and the
            # packing in one call, with the bits of the three steps below.
            norms = np.empty(n)
            if n:
                _core.small_dense_quantize_pack(rows, operand, book.boundaries, book.centroids,
                                                self.bits, norms, indices, residual, want_residual)
            self._check_norms(norms, rows)
            return indices, norms, residual
        norms = self._norms(rows, n_threads)
        # Rotate and quantize in blocks of rows whose rotated copy fits in the
        # cache: the quantizer reads it back while it is still there, and no
        # (n, dim) rotated array is ever held.
        block = max(1, ROTATED_BLOCK_BYTES // (self.dim * rows.itemsize))
        for start in range(0, n, block):
            stop = min(n, start + block)
            _core.quantize_pack(self.rotate(rows[start:stop], n_threads), norms[start:stop],
                                book.boundaries, book.centroids, self.bits, indices[start:stop],
                                residual[start:stop] if want_residual else residual, want_residual,
                                n_threads)
        return indices, norms, residual

    def decode_rotated(self, indices, scales, dtype, n_threads):
        """Rotated-domain reconstruction ``scales[i] * centroids[index]``."""
        out = np.empty((indices.shape[0], self.dim), dtype=dtype)
        if out.shape[0]:
            _core.dequantize_rows(indices, self.bits, self.codebook.centroids,
                                  np.asarray(scales, dtype=np.float64), out, n_threads)
        return out

    def score_rotated(self, indices, scales, rotated_queries, out, accumulate, n_threads):
        """``out[q, i] (+)= scales[i] <rotated_queries[q], centroids[indices[i]]>``."""
        if out.size:
            _core.lut_inner_products(indices, self.bits, self.codebook.centroids, rotated_queries,
                                     np.asarray(scales, dtype=np.float64), out, accumulate, n_threads)

    def weighted_sum(self, codes, weights, *, n_threads=None):
        """Weighted sums of the reconstructed vectors, without reconstructing them.

        ``out[q] = sum_i weights[q, i] * dequantize(codes)[i]``, accumulated in
        the rotated domain from the packed codes, then rotated back once per
        row of ``weights`` (this is how attention applies softmax weights to
        quantized values).

        Parameters
        ----------
        codes : MSECodes
            ``n`` codes from a quantizer with the same parameters.
        weights : array_like, shape (n,) or (m, n)
            Finite real weights.
        n_threads : int or None, default=None

        Returns
        -------
        ndarray, shape (dim,) or (m, dim), float64
            Identical for every thread count.
        """
        self._check_codes(codes)
        rows, was_1d = as_rows(weights, len(codes), "weights", dtype=np.float64)
        out = self.weighted_sum_rows(codes.indices, codes.norms, rows, resolve_n_threads(n_threads))
        return out[0] if was_1d else out

    def weighted_sum_rows(self, indices, scales, weights, n_threads):
        """``sum_i weights[q, i] * scales[i] * Pi^T centroids[indices[i]]`` for every row of
        the float64 C-contiguous ``weights``."""
        rotated = np.empty((weights.shape[0], self.dim))
        _core.lut_weighted_sum(indices, self.bits, self.codebook.centroids, weights,
                               np.asarray(scales, dtype=np.float64), rotated, n_threads)
        return self.unrotate(rotated, n_threads)

    # -- public operations ------------------------------------------------------
    def _quantize_rows(self, rows, n_threads):
        indices, norms, _ = self.encode(rows, n_threads)
        return MSECodes(self.spec, {"indices": indices, "norms": norms.astype(np.float32)})

    def _dequantize(self, codes, dtype, n_threads):
        rotated = self.decode_rotated(codes.indices, codes.norms, dtype, n_threads)
        return self.unrotate(rotated, n_threads)

    def _inner_products(self, codes, rows, out, n_threads):
        rotated = self.rotate(rows, n_threads)
        self.score_rotated(codes.indices, codes.norms, rotated, out, False, n_threads)


class _SignSketch:
    """Packed signs of ``S r`` and their inner products (shared by QJL and Prod)."""

    def __init__(self, dim, seed, sketch):
        self.kind = check_choice(sketch, "sketch", SKETCHES)
        self.dim = dim
        self.transform = make_sketch(self.kind, dim, seed)
        self.scale = qjl_scale(dim, self.kind)

    def signs(self, rows, n_threads):
        """(n, ceil(dim/8)) packed signs of ``S rows`` (bit set where the value is > 0)."""
        sketched = self.transform.apply(rows, n_threads)
        n = rows.shape[0]
        packed = np.empty((n, packed_row_bytes(self.dim, 1)), dtype=np.uint8)
        if n:
            _core.quantize_pack(sketched, np.ones(n), SIGN_BOUNDARIES, SIGN_CENTROIDS, 1,
                                packed, np.empty((0, 0), dtype=rows.dtype), False, n_threads)
        return packed

    def reconstruct(self, signs, weights, dtype, n_threads):
        """``weights[i] * S^T sign_i`` for every row."""
        out = np.empty((signs.shape[0], self.dim), dtype=dtype)
        if out.shape[0]:
            _core.dequantize_rows(signs, 1, SIGN_CENTROIDS, weights, out, n_threads)
        return self.transform.apply_transpose(out, n_threads)

    def score(self, signs, weights, queries, out, accumulate, n_threads):
        """``out[q, i] (+)= weights[i] <S queries[q], sign_i>``."""
        if out.size:
            sketched = self.transform.apply(queries, n_threads)
            _core.lut_inner_products(signs, 1, SIGN_CENTROIDS, sketched, weights, out,
                                     accumulate, n_threads)


class TurboQuantProd(_Quantizer):
    """TurboQuant optimised for unbiased inner products.

    A ``(bits - 1)``-bit :class:`TurboQuantMSE` stage, then a 1-bit QJL sketch of
    its residual ``r`` (signs of ``S r`` packed 8 per byte) and ``||r||`` as
    float32. ``inner_products`` is an unbiased estimator of ``<q, x>``.

    Parameters
    ----------
    dim : int
        Vector dimension, >= 2.
    bits : int
        Total bits per coordinate, 2..8 (``bits - 1`` for the MSE stage, 1 for QJL).
    seed : int, default=0
    rotation : {"dense", "hadamard"}, default="dense"
        Rotation of the MSE stage.
    sketch : {"gaussian", "hadamard"}, default="gaussian"
        ``"gaussian"``: the paper's i.i.d. N(0, 1) matrix, scale ``sqrt(pi/2)/dim``.
        ``"hadamard"``: an orthogonal randomized Hadamard sketch, scale
        ``1/(dim E|s_1|)`` (about ``sqrt(pi/2)/sqrt(dim)``), lower variance.

    Attributes
    ----------
    mse : TurboQuantMSE
        The first stage.
    qjl_scale : float
    spec : CodeSpec
    """

    codes_type = ProdCodes

    def __init__(self, dim, bits, *, seed=0, rotation="dense", sketch="gaussian"):
        super().__init__(dim, seed)
        self.bits = check_int(bits, "bits", low=2, high=8)
        self.mse = TurboQuantMSE(self.dim, self.bits - 1, seed=self.seed, rotation=rotation)
        self.rotation = self.mse.rotation
        self._sketch = _SignSketch(self.dim, self.seed, sketch)
        self.sketch = self._sketch.kind
        self.qjl_scale = self._sketch.scale
        self.spec = CodeSpec("prod", self.dim, self.bits, self.seed, self.rotation, self.sketch)

    @property
    def code_bytes(self):
        """Bytes per stored vector: MSE indices, signs, and two float32 norms."""
        return packed_row_bytes(self.dim, self.bits - 1) + packed_row_bytes(self.dim, 1) + 8

    @property
    def expected_distortion(self):
        """``E||x - x_hat||^2`` for unit ``x``.

        The QJL stage reconstructs the residual ``r`` with expected squared error
        ``(pi/2 - 1/dim) ||r||^2`` for the Gaussian sketch and
        ``(gamma^2 dim - 1) ||r||^2`` for the orthogonal one; ``E||r||^2`` is the
        MSE stage's distortion.
        """
        if self.sketch == "gaussian":
            factor = math.pi / 2.0 - 1.0 / self.dim
        else:
            factor = self.qjl_scale ** 2 * self.dim - 1.0
        return factor * self.mse.expected_distortion

    def __repr__(self):
        return (f"TurboQuantProd(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
                f"rotation={self.rotation!r}, sketch={self.sketch!r})")

    def _quantize_rows(self, rows, n_threads):
        indices, norms, residual = self.mse.encode(rows, n_threads, want_residual=True)
        residual_norms = np.empty(rows.shape[0])
        _core.row_norms(residual, residual_norms, n_threads)
        signs = self._sketch.signs(residual, n_threads)
        return ProdCodes(self.spec, {"indices": indices, "signs": signs,
                                     "norms": norms.astype(np.float32),
                                     "residual_norms": residual_norms.astype(np.float32)})

    def _qjl_weights(self, codes):
        return codes.norms.astype(np.float64) * codes.residual_norms * self.qjl_scale

    def _dequantize(self, codes, dtype, n_threads):
        rotated = self.mse.decode_rotated(codes.indices, codes.norms, dtype, n_threads)
        rotated += self._sketch.reconstruct(codes.signs, self._qjl_weights(codes), dtype, n_threads)
        return self.mse.unrotate(rotated, n_threads)

    def _inner_products(self, codes, rows, out, n_threads):
        rotated = self.mse.rotate(rows, n_threads)
        self.mse.score_rotated(codes.indices, codes.norms, rotated, out, False, n_threads)
        self._sketch.score(codes.signs, self._qjl_weights(codes), rotated, out, True, n_threads)


class QJL(_Quantizer):
    """The 1-bit Quantized Johnson-Lindenstrauss sketch.

    A vector is stored as ``sign(S x)`` packed 8 per byte and its norm. The
    asymmetric estimator ``||x|| gamma <S q, sign(S x)>`` of ``<q, x>`` is
    unbiased, with variance at most ``pi/(2 dim) ||q||^2 ||x||^2`` for the
    Gaussian sketch.

    Parameters
    ----------
    dim : int
        Vector dimension, >= 2.
    seed : int, default=0
    sketch : {"gaussian", "hadamard"}, default="gaussian"

    Attributes
    ----------
    scale : float
        The estimator constant ``gamma``.
    spec : CodeSpec
    """

    codes_type = QJLCodes
    bits = 1

    def __init__(self, dim, *, seed=0, sketch="gaussian"):
        super().__init__(dim, seed)
        self._sketch = _SignSketch(self.dim, self.seed, sketch)
        self.sketch = self._sketch.kind
        self.scale = self._sketch.scale
        self.spec = CodeSpec("qjl", self.dim, 1, self.seed, "", self.sketch)

    @property
    def code_bytes(self):
        """Bytes per stored vector: packed signs plus a float32 norm."""
        return packed_row_bytes(self.dim, 1) + 4

    def __repr__(self):
        return f"QJL(dim={self.dim}, seed={self.seed}, sketch={self.sketch!r})"

    def _quantize_rows(self, rows, n_threads):
        norms = self._norms(rows, n_threads)
        return QJLCodes(self.spec, {"signs": self._sketch.signs(rows, n_threads),
                                    "norms": norms.astype(np.float32)})

    def _weights(self, codes):
        return codes.norms.astype(np.float64) * self.scale

    def _dequantize(self, codes, dtype, n_threads):
        return self._sketch.reconstruct(codes.signs, self._weights(codes), dtype, n_threads)

    def _inner_products(self, codes, rows, out, n_threads):
        self._sketch.score(codes.signs, self._weights(codes), rows, out, False, n_threads)
