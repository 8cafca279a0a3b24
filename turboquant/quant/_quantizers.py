"""The TurboQuant quantizers: :class:`TurboQuantMSE`, :class:`TurboQuantProd` and :class:`QJL`.

Python holds parameters, validation and allocation; every loop over vectors
runs in :mod:`turboquant._core`, reached only through the checked codecs of
:mod:`turboquant.quant._codec` (rotation by numpy's BLAS for ``"dense"``).
"""

import math

import numpy as np

from .._errors import CorruptPayloadError, InvalidParameterError
from ..io._persist import Persistent, config_field
from .._threads import resolve_n_threads
from .._validation import as_rows, check_bool, check_float_dtype
from ._codec import BlockMSECodec, MSECodec, ProdCodec, QJLCodec
from ._codes import CodeSpec, MSECodes, ProdCodes, QJLCodes, packed_row_bytes


class _Quantizer(Persistent):
    """Shared plumbing: argument checks, norms, query handling and output shapes,
    and persistence (``save``/``load``, ``to_bytes``/``from_bytes``, pickling:
    the settings, from which the codebook and rotation are rebuilt and checked)."""

    codes_type = None

    # -- persistence ----------------------------------------------------------------------------------
    def _payload(self):
        return {"spec": self.spec.to_dict()}, {}

    def _rebuilt(self):
        return {"codec": self._codec}

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        if set(config) != {"spec"} or arrays:
            raise CorruptPayloadError("config: a quantizer file holds its spec and no arrays")
        spec = CodeSpec.from_dict(config_field(config, "spec", dict))
        if spec.kind != cls.codes_type.kind:
            raise CorruptPayloadError(f"config.spec.kind: {spec.kind!r} codes are not made by {cls.__name__}")
        return cls._of_spec(spec)

    def __eq__(self, other):
        return type(other) is type(self) and other.spec == self.spec

    __hash__ = None

    # Quantizers are immutable: a copy is the quantizer itself (pickling goes through the bytes).
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

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
    block_scales : bool, default=False
        Spend the side information better (an option beside the paper's
        scheme, whose codes it leaves unchanged): instead of a float32 norm,
        a float16 scale ``g`` (the rms of the rotated vector) and, per block
        of 16 rotated coordinates, the 4-bit index of the factor ``f[k]``
        (of 16) with the least squared error, with a codebook fitted jointly
        with the factors to Gaussian blocks. A vector takes
        ``ceil(dim * bits / 8) + ceil(ceil(dim / 16) / 2) + 2`` bytes:
        ``bits + 0.25 + 16 / dim`` bits per coordinate, for about half the
        error at 4 bits (relative MSE 0.0048 against 0.0095 on Gaussian
        vectors; see the README's distortion table). Scales must fit
        float16: a vector whose rms exceeds 65504 raises NonFiniteError.
        Bits 1..4.

    Attributes
    ----------
    codebook : Codebook or None
        Centroids, boundaries and expected distortion for (dim, bits); None
        for block-scaled codes, whose tables are ``block_centroids`` and
        ``block_factors``.
    expected_distortion : float
        ``E||x - x_hat||^2`` for unit-norm ``x`` (the paper's D_mse); for
        block-scaled codes, the relative MSE of their fit on Gaussian vectors.
    spec : CodeSpec
    """

    codes_type = MSECodes
    _kind = "TurboQuantMSE"

    @classmethod
    def _of_spec(cls, spec):
        return cls(spec.dim, spec.bits, seed=spec.seed, rotation=spec.rotation, block_scales=spec.block_scales)

    def __init__(self, dim, bits, *, seed=0, rotation="dense", block_scales=False):
        codec = BlockMSECodec if check_bool(block_scales, "block_scales") else MSECodec
        self._adopt(codec(dim, bits, seed, rotation))

    def _adopt(self, codec):
        super()._adopt(codec)
        self.bits = codec.bits
        self.rotation = codec.spec.rotation
        self.block_scales = codec.spec.block_scales
        self.codebook = getattr(codec, "codebook", None)

    @property
    def block_centroids(self):
        """(2**bits,) float64 codebook of block-scaled codes (None otherwise)."""
        return getattr(self._codec, "centroids", None)

    @property
    def block_factors(self):
        """(16,) float64 block factors of block-scaled codes (None otherwise)."""
        return getattr(self._codec, "factors", None)

    @property
    def expected_distortion(self):
        """``E||x - x_hat||^2`` for unit-norm ``x`` (the codebook's exact distortion, the paper's D_mse;
        for block-scaled codes the relative MSE of their fit on Gaussian vectors)."""
        if self.block_scales:
            return self._codec.fitted_distortion
        return self.codebook.distortion

    @property
    def code_bytes(self):
        """Bytes per stored vector: packed indices plus a float32 norm (block-scaled codes:
        plus the packed block factors and a float16 scale)."""
        return sum(np.dtype(dtype).itemsize if width is None else width
                   for dtype, width in self.spec.row_layout().values())

    def __repr__(self):
        extra = ", block_scales=True" if self.block_scales else ""
        return (f"TurboQuantMSE(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
                f"rotation={self.rotation!r}{extra})")

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
        if self.block_scales:
            out = self._codec.weighted_sum(arrays, rows, resolve_n_threads(n_threads))
        else:
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

    _kind = "TurboQuantProd"

    @classmethod
    def _of_spec(cls, spec):
        return cls(spec.dim, spec.bits, seed=spec.seed, rotation=spec.rotation, sketch=spec.sketch)

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
    _kind = "QJL"

    @classmethod
    def _of_spec(cls, spec):
        return cls(spec.dim, seed=spec.seed, sketch=spec.sketch)

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
