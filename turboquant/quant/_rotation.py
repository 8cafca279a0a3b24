"""Seeded random rotations and sketches, the same bits on every machine.

Two kinds of orthogonal rotation, drawn once at construction:

``"dense"``
    A Haar-distributed orthogonal matrix: the Q of a QR decomposition of a
    standard Gaussian matrix, with the signs of R's diagonal moved into Q. This
    is the paper's choice. Applying it is a matrix product (BLAS through numpy
    for large batches, the ``_core`` kernels for a few rows).

``"hadamard"``
    A randomized Hadamard transform in O(d log d), computed by the ``_core``
    kernels for any ``d >= 2``. With ``B`` the largest power of two ``<= d``,
    one round is: multiply every coordinate by an independent random sign,
    apply the orthonormal Walsh-Hadamard transform ``H_B`` to the first ``B``
    coordinates, then (only when ``B < d``) apply ``H_B`` to the last ``B``
    coordinates. The two blocks overlap (``B > d/2``), so after one round every
    coordinate of the tail depends on every input, and a second round spreads
    that to the head. Two rounds are used; each step is orthogonal, so the whole
    map is an exact rotation and its inverse runs the steps backwards.

The QJL sketch ``S`` of :class:`GaussianSketch` is an i.i.d. N(0, 1) matrix (not
orthogonal); its transpose is applied for reconstruction.

How the random numbers are made
-------------------------------
Saved codes must decode with the rotation that made them, on another machine
and under another numpy. numpy keeps the *methods* of ``Generator``
(``standard_normal``, ``integers``) stable only within one numpy version, and
``numpy.linalg.qr`` gives LAPACK's bits, which vary with the BLAS library, the
CPU and the thread count. So nothing here uses them:

* **Words.** Every ``(seed, role)`` has its own bit generator,
  ``PCG64(SeedSequence(seed, spawn_key=(0x54555242, role)))`` (role 0: the
  rotation, 1: the QJL sketch; the salt keeps them apart from data a user draws
  with ``default_rng(seed)``). Only its raw 64-bit output ``random_raw`` is used:
  numpy guarantees the raw streams of its bit generators and seed sequences
  across versions.
* **Signs.** Sign ``t`` (row-major over ``(rounds, dim)``) is bit ``t % 64`` of
  word ``t // 64``, least significant bit first: set is +1, clear is -1.
* **Gaussians.** Consecutive pairs of words become ``u, v = (w >> 11) / 2**52 - 1``
  (exact, uniform on [-1, 1)); a pair with ``s = u*u + v*v`` in (0, 1) gives the
  two normals ``u f, v f``, ``f = sqrt(-2 log(s) / s)`` (Marsaglia's polar
  method), other pairs are skipped. The logarithm is computed with ``+ - * /``
  only (an exact exponent split and an atanh series, within 3 ulps), not with
  libm, whose last bit differs between C libraries and CPUs. Matrices are
  filled row-major.
* **Orthogonalisation.** The Gaussian matrix ``G`` becomes ``Q diag(sign(diag R))``
  with ``G = Q R`` its Householder QR, in C (``include/tq_random.h``) with a fixed
  order of operations, inner loops that are element-wise updates (so compiler
  vectorization cannot change a bit) and no FMA contraction. It takes about
  1 ms at ``dim = 128``, 1.5 s at ``dim = 1536`` and 30 s at ``dim = 4096``
  (memory-bound), once per ``(dim, seed)`` and process.

Guarantee: the rotation matrices, Hadamard signs and Gaussian sketches (and the
float32-rounded codebooks of :mod:`._codebook`) are bit-identical on every
machine with IEEE-754 double arithmetic (any x86-64 or ARM CPU and kernel
variant), with every numpy >= 1.25 and every BLAS and thread count. Codes are
then the same bits too wherever the rotated values are: the Hadamard kernels
and the dense products of a few rows (``_core.small_product``) compute them in
a fixed order; a large dense batch goes through BLAS, whose rounding may differ
in the last bit between libraries, which flips a code only for a coordinate
within that rounding of a cell boundary.
"""

import math
import threading
import weakref

import numpy as np

from .._kernels import _core
from .._validation import check_choice, readonly

ROTATIONS = ("dense", "hadamard")
SKETCHES = ("gaussian", "hadamard")
HADAMARD_ROUNDS = 2
#: Dense products of at most this many multiply-adds (rows x dim x dim) run in
#: _core.small_product rather than BLAS: one to 64 queries at dim 128.
SMALL_PRODUCT_WORK = 1 << 20


# Salt of the seed sequences, so that transforms never share random numbers
# with data a user draws from ``default_rng(seed)`` with the same seed.
_SEED_SALT = 0x54555242


def seeded_bit_generator(seed, stream):
    """The PCG64 bit generator of one role (rotation 0, sketch 1) of one seed."""
    return np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SEED_SALT, stream)))


def random_signs(bit_generator, shape):
    """float64 array of +-1: sign ``t`` (row-major) is bit ``t % 64`` of raw word
    ``t // 64`` of ``bit_generator``, least significant first; set is +1."""
    n = math.prod(shape)
    words = bit_generator.random_raw(-(-n // 64))
    bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return (bits.reshape(-1)[:n].astype(np.float64) * 2.0 - 1.0).reshape(shape)


def standard_normal(bit_generator, shape):
    """float64 array of standard normals made from the raw words of ``bit_generator``
    (Marsaglia's polar method, see the module docs), filled row-major; the same
    bits on every machine."""
    n = math.prod(shape)
    out = np.empty(n)
    filled = 0
    while filled < n:
        # A pair of words gives two normals with probability pi/4: 1.27 words a
        # normal, so one draw almost always suffices. Unused words are dropped.
        n_words = 2 * (int(0.66 * (n - filled)) + 16)
        filled = _core.standard_normal_from_raw(bit_generator.random_raw(n_words), out, filled)
    return out.reshape(shape)


class _MatrixTransform:
    """``y = x @ matrix.T`` and its transpose ``x = y @ matrix``, in the input's dtype."""

    def __init__(self, matrix):
        self.matrix = readonly(np.ascontiguousarray(matrix, dtype=np.float64))
        self._matrix32 = readonly(self.matrix.astype(np.float32))
        self._small_operands = {}

    def _for(self, dtype):
        return self._matrix32 if dtype == np.float32 else self.matrix

    def small_operand(self, rows, dtype, transpose):
        """The C-contiguous ``B`` with ``x @ B`` the product (:meth:`apply`, or
        :meth:`apply_transpose` when ``transpose``) of ``rows`` rows of ``dtype``
        when it runs as ``_core.small_product``, else None (BLAS). Kernels that
        rotate a few queries themselves use it and get the same bits."""
        if rows * self.matrix.size > SMALL_PRODUCT_WORK:
            return None
        key = (dtype.char, transpose)
        operand = self._small_operands.get(key)
        if operand is None:
            matrix = self._for(dtype)
            operand = readonly(np.ascontiguousarray(matrix if transpose else matrix.T))
            operand = self._small_operands.setdefault(key, operand)
        return operand

    def _product(self, x, transpose):
        operand = self.small_operand(x.shape[0], x.dtype, transpose)
        if operand is not None:
            # A few rows (queries): a plain loop beats a BLAS call and its thread hand-offs.
            out = np.empty(x.shape, dtype=x.dtype)
            _core.small_product(np.ascontiguousarray(x), operand, out)
            return out
        matrix = self._for(x.dtype)
        return np.ascontiguousarray(x @ (matrix if transpose else matrix.T))

    def apply(self, x, n_threads):
        """Rows of ``x`` multiplied by the matrix (``x @ M.T``), C-contiguous.

        Large products go to BLAS, which sizes its own thread team; ``n_threads``
        is accepted so that every transform has the same interface."""
        return self._product(x, False)

    def apply_transpose(self, y, n_threads):
        """Rows of ``y`` multiplied by the transpose (``y @ M``), C-contiguous."""
        return self._product(y, True)


class DenseRotation(_MatrixTransform):
    """Haar-random orthogonal rotation of R^dim (see the module docs for how it is made).

    Parameters
    ----------
    dim : int
    bit_generator : numpy.random.BitGenerator
        Source of raw words (:func:`seeded_bit_generator`).
    """

    def __init__(self, dim, bit_generator):
        matrix = standard_normal(bit_generator, (dim, dim))
        _core.haar_orthogonal(matrix)
        super().__init__(matrix)
        self.dim = dim

    inverse = _MatrixTransform.apply_transpose


class GaussianSketch(_MatrixTransform):
    """The QJL sketch: a dim x dim matrix of i.i.d. standard normal entries.

    Parameters
    ----------
    dim : int
    bit_generator : numpy.random.BitGenerator
    """

    def __init__(self, dim, bit_generator):
        super().__init__(standard_normal(bit_generator, (dim, dim)))
        self.dim = dim


class HadamardRotation:
    """Randomized Hadamard rotation of R^dim for any dim >= 2 (see module docs).

    Parameters
    ----------
    dim : int
    bit_generator : numpy.random.BitGenerator
    """

    def __init__(self, dim, bit_generator):
        self.dim = dim
        self.block = 1 << (dim.bit_length() - 1)
        self.signs = readonly(random_signs(bit_generator, (HADAMARD_ROUNDS, dim)))

    def _run(self, x, inverse, n_threads):
        out = np.empty_like(x)
        if x.shape[0]:
            _core.hadamard_rotate(x, out, self.signs, self.block, inverse, n_threads)
        return out

    def apply(self, x, n_threads):
        """Rotate every row of the C-contiguous float array ``x``."""
        return self._run(x, False, n_threads)

    def inverse(self, y, n_threads):
        """Undo :meth:`apply` on every row."""
        return self._run(y, True, n_threads)

    apply_transpose = inverse

    def small_operand(self, rows, dtype, transpose):
        """Always None: the transform is no matrix product (see
        :meth:`_MatrixTransform.small_operand`)."""
        return None

    @property
    def matrix(self):
        """The rotation as a dense (dim, dim) float64 matrix (for tests and inspection)."""
        eye = np.eye(self.dim)
        return self.apply(eye, 1).T


# Transforms are immutable, so live quantizers with the same parameters share
# one (many KV-cache layers use the same seeds). Entries vanish with their last user.
_LIVE_TRANSFORMS = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def _shared(key, build):
    with _LIVE_LOCK:
        transform = _LIVE_TRANSFORMS.get(key)
    if transform is None:
        transform = build()
        with _LIVE_LOCK:
            transform = _LIVE_TRANSFORMS.setdefault(key, transform)
    return transform


def make_rotation(kind, dim, seed):
    """The rotation ``kind`` ("dense" or "hadamard") for ``(dim, seed)``."""
    check_choice(kind, "rotation", ROTATIONS)
    cls = DenseRotation if kind == "dense" else HadamardRotation
    return _shared(("rotation", kind, dim, seed), lambda: cls(dim, seeded_bit_generator(seed, 0)))


def make_sketch(kind, dim, seed):
    """The QJL sketch ``kind`` ("gaussian" or "hadamard") for ``(dim, seed)``."""
    check_choice(kind, "sketch", SKETCHES)
    cls = GaussianSketch if kind == "gaussian" else HadamardRotation
    return _shared(("sketch", kind, dim, seed), lambda: cls(dim, seeded_bit_generator(seed, 1)))
