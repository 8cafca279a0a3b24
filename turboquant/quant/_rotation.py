"""Seeded random rotations and sketches.

Two kinds of orthogonal rotation, both drawn once from
``numpy.random.default_rng`` at construction:

``"dense"``
    A Haar-distributed orthogonal matrix: the Q of a QR decomposition of a
    standard Gaussian matrix, with the signs of R's diagonal moved into Q. This
    is the paper's choice. Applying it is a matrix product (BLAS through numpy).

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
"""

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


def seeded_rng(seed, stream):
    """Independent generator for one role (rotation 0, sketch 1) of one seed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SEED_SALT, stream)))


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
    """Haar-random orthogonal rotation of R^dim.

    Parameters
    ----------
    dim : int
    rng : numpy.random.Generator
    """

    def __init__(self, dim, rng):
        gaussian = rng.standard_normal((dim, dim))
        q, r = np.linalg.qr(gaussian)
        signs = np.sign(np.diag(r))
        signs[signs == 0] = 1.0
        super().__init__(q * signs)
        self.dim = dim

    inverse = _MatrixTransform.apply_transpose


class GaussianSketch(_MatrixTransform):
    """The QJL sketch: a dim x dim matrix of i.i.d. standard normal entries."""

    def __init__(self, dim, rng):
        super().__init__(rng.standard_normal((dim, dim)))
        self.dim = dim


class HadamardRotation:
    """Randomized Hadamard rotation of R^dim for any dim >= 2 (see module docs).

    Parameters
    ----------
    dim : int
    rng : numpy.random.Generator
    """

    def __init__(self, dim, rng):
        self.dim = dim
        self.block = 1 << (dim.bit_length() - 1)
        signs = rng.integers(0, 2, size=(HADAMARD_ROUNDS, dim)) * 2.0 - 1.0
        self.signs = readonly(np.ascontiguousarray(signs, dtype=np.float64))

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
    return _shared(("rotation", kind, dim, seed), lambda: cls(dim, seeded_rng(seed, 0)))


def make_sketch(kind, dim, seed):
    """The QJL sketch ``kind`` ("gaussian" or "hadamard") for ``(dim, seed)``."""
    check_choice(kind, "sketch", SKETCHES)
    cls = GaussianSketch if kind == "gaussian" else HadamardRotation
    return _shared(("sketch", kind, dim, seed), lambda: cls(dim, seeded_rng(seed, 1)))
