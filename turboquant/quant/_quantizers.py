"""The TurboQuant quantizers: :class:`TurboQuantMSE`, :class:`TurboQuantProd` and :class:`QJL`.

Python holds parameters, validation and allocation; every loop over vectors
runs in :mod:`turboquant._core`, reached only through the checked codecs of
:mod:`turboquant.quant._codec` (rotation by numpy's BLAS for ``"dense"``).
"""

import math

import numpy as np

from .._errors import InvalidParameterError
from .._threads import resolve_n_threads
from .._validation import as_rows, check_float_dtype
from ._codec import MSECodec, ProdCodec, QJLCodec
from ._codes import MSECodes, ProdCodes, QJLCodes, packed_row_bytes


class _Quantizer:
    """Shared plumbing: argument checks, norms, query handling and output shapes."""

    codes_type = None

    @classmethod
    def _of(cls, codec):
        """The quantizer of an existing codec of the matching kind (the MSE stage of
        Prod codes, the KV cache's codecs)."""
        quantizer = cls.__new__(cls)
        quantizer._adopt(codec)
        return quantizer

    def _adopt(self, codec):
        """Take the parameters of a checked codec (constructors build one)."""
        self._codec = codec
        self.spec = codec.spec
        self.dim = codec.spec.dim
        self.seed = codec.spec.seed

    def _check_codes(self, codes):
        if not isinstance(codes, self.codes_type):
            raise InvalidParameterError(
                f"expected {self.codes_type.__name__}, got {type(codes).__name__}")
        codes.check_compatible(self.spec, "read")
        return codes._arrays

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
        return self.codes_type(self.spec, self._codec.quantize(rows, resolve_n_threads(n_threads), "x"))

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
        arrays = self._check_codes(codes)
        return self._codec.dequantize(arrays, check_float_dtype(dtype), resolve_n_threads(n_threads))

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
        arrays = self._check_codes(codes)
        rows, was_1d = as_rows(queries, self.dim, "queries")
        n_threads = resolve_n_threads(n_threads)
        out = self._codec.inner_products(arrays, rows, n_threads)
        return out[0] if was_1d else out


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
        self._adopt(MSECodec(dim, bits, seed, rotation))

    def _adopt(self, codec):
        super()._adopt(codec)
        self.bits = codec.bits
        self.rotation = codec.spec.rotation
        self.codebook = codec.codebook

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
        arrays = self._check_codes(codes)
        rows, was_1d = as_rows(weights, len(codes), "weights", dtype=np.float64)
        out = self._codec.weighted_sum(arrays["indices"], arrays["norms"], rows, resolve_n_threads(n_threads))
        return out[0] if was_1d else out


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
        self._adopt(ProdCodec(dim, bits, seed, rotation, sketch))

    def _adopt(self, codec):
        super()._adopt(codec)
        self.bits = codec.spec.bits
        self.mse = TurboQuantMSE._of(codec.mse)
        self.rotation = codec.spec.rotation
        self.sketch = codec.spec.sketch
        self.qjl_scale = codec.sketch.scale

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
        self._adopt(QJLCodec(dim, seed, sketch))

    def _adopt(self, codec):
        super()._adopt(codec)
        self.sketch = codec.spec.sketch
        self.scale = codec.sketch.scale

    @property
    def code_bytes(self):
        """Bytes per stored vector: packed signs plus a float32 norm."""
        return packed_row_bytes(self.dim, 1) + 4

    def __repr__(self):
        return f"QJL(dim={self.dim}, seed={self.seed}, sketch={self.sketch!r})"
