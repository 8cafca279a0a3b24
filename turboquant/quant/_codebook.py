"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector.

After a random rotation every coordinate ``x`` of a unit vector in ``R^dim``
has the density

.. math:: f_d(x) = (1 - x^2)^{(d - 3)/2} / B(1/2, (d - 1)/2), \\qquad -1 \\le x \\le 1,

(the arcsine law for ``d = 2``, the uniform law for ``d = 3``, close to
``N(0, 1/d)`` for large ``d``). This module computes the MSE-optimal scalar
quantizer of that density for ``2**bits`` levels, exactly (to rounding), in
pure numpy.

Method
------
Everything is done in the angle ``theta`` with ``x = sin(theta)``, where the
mass element is ``cos(theta)**(d - 2) dtheta``: smooth for every ``d >= 2``,
including the arcsine case whose density is singular at ``x = +-1``.

* The codebook is searched among antisymmetric ones, so only the ``K/2``
  positive centroids are unknowns and the middle boundary is exactly 0.
* Each cell's mass and first moment are computed by composite Gauss-Legendre
  quadrature over that cell alone (4 panels of 16 nodes, split where the log
  density drops by equal amounts; the outermost cell is cut where the density
  has fallen by ``exp(-50)``). Every cell is therefore accurate to a few ulps
  *relative to its own mass*, also the tiny tail cells, which differencing a
  CDF would not give; the cost does not depend on ``d``.
* The start is the Panter-Dite point density ``f**(1/3)``; the Lloyd fixed
  point ``c = T(c)`` (``T`` maps centroids to the conditional means of the
  cells their midpoints define) is then solved by Newton's method with the
  exact tridiagonal Jacobian of ``T``, halving steps that would break the
  ordering of the centroids. It converges in a handful of steps.

The quantizers use :func:`float32_codebook`: the same centroids rounded to
float32. numpy's exp, log, sin and cos may differ in the last bit between CPUs
(their SIMD code paths) and the solver stops at a residual of ``1e-13 /
sqrt(dim)``, so the float64 codebook can differ by a few ulps between machines;
rounded to float32 (24 bits) it is the same everywhere unless a centroid lies
within that difference (at most ``1e-13`` relative) of a point halfway between
two float32 numbers: a chance below ``1e-5`` per centroid, and far smaller for
the usual differences of a few ulps. The golden tests pin the rounded arrays.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .._errors import ShapeError
from .._validation import check_int

__all__ = [
    "Codebook",
    "coordinate_density",
    "distortion_lower_bound",
    "float32_codebook",
    "lloyd_max_codebook",
]

MIN_BITS = 1
MAX_BITS = 8
MIN_DIM = 2

# Quadrature layout of one cell: panels x Gauss-Legendre nodes.
_PANELS_PER_CELL = 4
_NODES_PER_PANEL = 16
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
# A cell is integrated only where the density is above exp(-_MAX_LOG_DROP) times
# its value at the cell's inner end (the omitted mass is below 1e-21 of the cell's).
_MAX_LOG_DROP = 50.0
# Cells whose log density drops by more than this are split at equal drops, others evenly.
_EQUAL_DROP_THRESHOLD = 2.0

# Newton's method: the largest |T(c) - c| accepted, relative to the scale 1/sqrt(dim).
_RESIDUAL_TOLERANCE = 1e-13
_MAX_NEWTON_STEPS = 50
_MAX_STEP_HALVINGS = 60
_PANTER_DITE_GRID = 4097


@dataclass(frozen=True, eq=False, repr=False)
class Codebook:
    """Lloyd-Max scalar quantizer of one coordinate of a random unit vector.

    Instances are immutable and every array is read-only; get them from
    :func:`lloyd_max_codebook`, which caches one instance per ``(dim, bits)``.

    Attributes
    ----------
    dim : int
        Dimension ``d >= 2`` of the unit vectors.
    bits : int
        Bits per coordinate, ``1..8``; the codebook has ``K = 2**bits`` levels.
    centroids : ndarray, shape (K,), float64, read-only
        Reconstruction levels, strictly increasing and exactly antisymmetric:
        ``centroids[i] == -centroids[K - 1 - i]``. Each is the conditional
        mean of the coordinate density over its cell.
    boundaries : ndarray, shape (K - 1,), float64, read-only
        Decision thresholds, the midpoints of adjacent centroids; cell ``i`` is
        ``boundaries[i - 1] <= x < boundaries[i]``. ``boundaries[K//2 - 1]`` is
        exactly 0.
    distortion : float
        Expected squared error of a whole quantized unit vector,
        ``dim * E[(x - Q(x))**2]`` under :func:`coordinate_density` (the
        paper's ``D_mse``). Below ``sqrt(3) * pi / 2`` times
        :func:`distortion_lower_bound`; above it except at small ``dim``
        (``dim = 2`` gives 0.60 to 0.76 times it, ``dim = 3`` exactly 1).
    probabilities : ndarray, shape (K,), float64, read-only
        Probability of each cell; antisymmetric order, sums to 1.
    """

    dim: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float
    probabilities: np.ndarray

    def __post_init__(self):
        n_levels = 1 << self.bits
        expected = {
            "centroids": (n_levels,),
            "boundaries": (n_levels - 1,),
            "probabilities": (n_levels,),
        }
        for name, shape in expected.items():
            array = np.array(getattr(self, name), dtype=np.float64, order="C")  # private copy
            if array.shape != shape:
                raise ShapeError(
                    f"{name} has shape {array.shape}; expected {shape} for bits={self.bits}"
                )
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "distortion", float(self.distortion))

    def __repr__(self):
        return f"Codebook(dim={self.dim}, bits={self.bits}, distortion={self.distortion:.6g})"


def lloyd_max_codebook(dim, bits):
    """MSE-optimal (Lloyd-Max) codebook for one coordinate of a random unit vector.

    Solves the Lloyd-Max conditions (every centroid is the conditional mean of
    its cell, every boundary the midpoint of its neighbours) for the exact
    density :func:`coordinate_density` to about ``1e-13 / sqrt(dim)``. Results
    are cached: the same ``(dim, bits)`` returns the same object. Deterministic;
    pure numpy; a few milliseconds per new ``(dim, bits)`` whatever ``dim``.

    Parameters
    ----------
    dim : int
        Dimension of the vectors, ``>= 2``. Python or numpy integer, not bool.
    bits : int
        Bits per coordinate, ``1..8``.

    Returns
    -------
    Codebook
        Frozen, with read-only float64 arrays of ``2**bits`` centroids and
        ``2**bits - 1`` boundaries.

    Raises
    ------
    InvalidParameterError
        If ``dim`` or ``bits`` is not an integer in range.
    RuntimeError
        If Newton's method fails to converge (not known to happen).

    Examples
    --------
    >>> import numpy as np
    >>> cb = lloyd_max_codebook(128, 2)
    >>> np.round(cb.centroids * 128 ** 0.5, 4)  # near the Gaussian levels +-0.4528, +-1.5104
    array([-1.5052, -0.4525,  0.4525,  1.5052])
    >>> round(cb.distortion, 4)
    0.116
    """
    dim = _check_dim(dim)
    bits = _check_bits(bits)
    return _cached_codebook(dim, bits)


def float32_codebook(dim, bits):
    """The codebook quantizers use: :func:`lloyd_max_codebook` rounded to float32.

    The centroids are the Lloyd-Max centroids rounded to the nearest float32 and
    the boundaries the float32 midpoints of those (both stored as float64), so
    they are the same bits on every machine (see the module docs), and float32
    and float64 inputs are compared with the same thresholds. The rounding moves
    a centroid by at most ``2**-24`` relative, far below the quantization error;
    the codebook stays exactly antisymmetric with its middle boundary 0.
    ``distortion`` and ``probabilities`` are those of the exact codebook.
    Cached like :func:`lloyd_max_codebook`.

    Parameters
    ----------
    dim : int
        Dimension of the vectors, ``>= 2``.
    bits : int
        Bits per coordinate, ``1..8``.

    Returns
    -------
    Codebook

    Raises
    ------
    InvalidParameterError
        If ``dim`` or ``bits`` is not an integer in range.
    """
    return _cached_float32_codebook(_check_dim(dim), _check_bits(bits))


@functools.lru_cache(maxsize=None)
def _cached_float32_codebook(dim, bits):
    exact = _cached_codebook(dim, bits)
    centroids = exact.centroids.astype(np.float32).astype(np.float64)
    midpoints = 0.5 * (centroids[:-1] + centroids[1:])   # exact: neighbouring float32 numbers
    return Codebook(
        dim=dim,
        bits=bits,
        centroids=centroids,
        boundaries=midpoints.astype(np.float32).astype(np.float64),
        distortion=exact.distortion,
        probabilities=exact.probabilities,
    )


def coordinate_density(x, dim):
    """Density of one coordinate of a uniformly random unit vector in ``R^dim``.

    ``f_d(x) = (1 - x**2)**((dim - 3) / 2) / B(1/2, (dim - 1) / 2)`` on
    ``[-1, 1]`` and 0 outside. At ``x = +-1`` it is ``inf`` for ``dim = 2``,
    ``1/2`` for ``dim = 3`` and 0 above. Vectorised; NaN stays NaN.

    Parameters
    ----------
    x : array_like of real numbers
        Points, any shape.
    dim : int
        Dimension, ``>= 2``.

    Returns
    -------
    ndarray, float64, same shape as ``x``
        The density at each point (a 0-d array for a scalar ``x``).

    Raises
    ------
    InvalidParameterError
        If ``dim`` is not an integer ``>= 2``.
    """
    dim = _check_dim(dim)
    x = np.asarray(x, dtype=np.float64)
    one_minus_x2 = (1.0 - x) * (1.0 + x)
    with np.errstate(divide="ignore", invalid="ignore"):
        if dim == 3:
            unnormalised = np.ones_like(x)
        else:
            unnormalised = np.exp((dim - 3) / 2.0 * np.log(one_minus_x2))
        density = unnormalised * math.exp(-_log_normaliser(dim))
    density = np.where(np.abs(x) > 1.0, 0.0, density)
    return np.asarray(density, dtype=np.float64)


def distortion_lower_bound(bits):
    """The TurboQuant paper's lower bound ``4**-bits`` on the MSE distortion.

    The Shannon lower bound for quantizing unit vectors with ``bits`` bits per
    coordinate, which binds as ``dim`` grows (at small ``dim`` a codebook can
    go below it: ``dim = 2`` gives 0.60 to 0.76 times it). The distortion of
    :func:`lloyd_max_codebook` stays below ``sqrt(3) * pi / 2 ~= 2.72`` times it.

    Parameters
    ----------
    bits : int
        Bits per coordinate, ``1..8``.

    Returns
    -------
    float

    Raises
    ------
    InvalidParameterError
        If ``bits`` is not an integer in ``1..8``.
    """
    bits = _check_bits(bits)
    return 4.0 ** -bits


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _check_dim(dim):
    return check_int(dim, "dim", low=MIN_DIM)


def _check_bits(bits):
    return check_int(bits, "bits", low=MIN_BITS, high=MAX_BITS)


# --------------------------------------------------------------------------- #
# Solver
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _cached_codebook(dim, bits):
    positive = _solve_positive_centroids(dim, bits)
    cells = _half_line_cells(positive, dim - 2)
    total_half_mass = cells.mass.sum()
    squared_error = _cell_integrals(cells.theta_lo, cells.theta_hi, dim - 2, centres=positive)[2]
    distortion = dim * squared_error.sum() / total_half_mass
    half_probabilities = cells.mass / (2.0 * total_half_mass)

    centroids = np.concatenate([-positive[::-1], positive])
    boundaries = 0.5 * (centroids[:-1] + centroids[1:])
    probabilities = np.concatenate([half_probabilities[::-1], half_probabilities])
    return Codebook(
        dim=dim,
        bits=bits,
        centroids=centroids,
        boundaries=boundaries,
        distortion=float(distortion),
        probabilities=probabilities,
    )


def _solve_positive_centroids(dim, bits):
    """The ``2**(bits - 1)`` positive centroids of the antisymmetric Lloyd-Max codebook."""
    n = dim - 2
    n_half = 1 << (bits - 1)
    tolerance = _RESIDUAL_TOLERANCE / math.sqrt(dim)
    centroids = _panter_dite_start(dim, n_half)
    for _ in range(_MAX_NEWTON_STEPS):
        cells = _half_line_cells(centroids, n)
        means = cells.moment / cells.mass
        residual = means - centroids
        if np.max(np.abs(residual)) <= tolerance:
            return centroids
        step = _solve_tridiagonal(*_newton_matrix(cells, means, dim), residual)
        centroids = _ordered_step(centroids, step)
    raise RuntimeError(
        f"Lloyd-Max iteration did not converge for dim={dim}, bits={bits} "
        f"(largest |T(c) - c| = {np.max(np.abs(residual)):.3g})"
    )


def _newton_matrix(cells, means, dim):
    """Diagonals of ``I - dT/dc`` for the map ``T`` from centroids to their cells' means.

    ``T_j`` depends on the boundaries ``t_j, t_(j+1)`` of cell ``j`` with
    ``dT_j/dt_j = f(t_j) (T_j - t_j) / P_j`` and
    ``dT_j/dt_(j+1) = f(t_(j+1)) (t_(j+1) - T_j) / P_j``; each inner boundary is the
    midpoint of its two centroids, and the boundaries 0 and 1 are fixed.

    Returns ``(sub, diag, sup)``: ``sub[j] = A[j+1, j]``, ``sup[j] = A[j, j+1]``.
    """
    inner = cells.boundaries[1:-1]
    density = np.exp((dim - 3) / 2.0 * np.log1p(-inner * inner))  # unnormalised, like cells.mass
    lower = 0.5 * density * (means[1:] - inner) / cells.mass[1:]  # dT_j/dc_(j-1), j = 1..m-1
    upper = 0.5 * density * (inner - means[:-1]) / cells.mass[:-1]  # dT_j/dc_(j+1), j = 0..m-2
    diag = np.ones_like(means)
    diag[1:] -= lower
    diag[:-1] -= upper
    return -lower, diag, -upper


def _solve_tridiagonal(sub, diag, sup, rhs):
    """Solve a tridiagonal system by Gaussian elimination with partial pivoting.

    The algorithm of LAPACK ``dgtsv``, on Python floats: at ``K/2 <= 128``
    unknowns this is faster than a dense solve and never wakes BLAS threads.
    """
    dl = [float(v) for v in sub]
    d = [float(v) for v in diag]
    du = [float(v) for v in sup]
    b = [float(v) for v in rhs]
    n = len(d)
    for i in range(n - 1):
        if abs(d[i]) >= abs(dl[i]):
            if d[i] == 0.0:
                raise RuntimeError("singular Newton matrix in the Lloyd-Max solver")
            fact = dl[i] / d[i]
            d[i + 1] -= fact * du[i]
            b[i + 1] -= fact * b[i]
            dl[i] = 0.0  # from here on dl[i] holds U[i, i+2]
        else:
            fact = d[i] / dl[i]
            d[i] = dl[i]
            temp = d[i + 1]
            d[i + 1] = du[i] - fact * temp
            if i < n - 2:
                dl[i] = du[i + 1]
                du[i + 1] = -fact * dl[i]
            else:
                dl[i] = 0.0
            du[i] = temp
            b[i], b[i + 1] = b[i + 1], b[i] - fact * b[i + 1]
    if d[n - 1] == 0.0:
        raise RuntimeError("singular Newton matrix in the Lloyd-Max solver")
    b[n - 1] /= d[n - 1]
    if n > 1:
        b[n - 2] = (b[n - 2] - du[n - 2] * b[n - 1]) / d[n - 2]
    for i in range(n - 3, -1, -1):
        b[i] = (b[i] - du[i] * b[i + 1] - dl[i] * b[i + 2]) / d[i]
    return np.array(b)


def _ordered_step(centroids, step):
    """``centroids + step``, halving the step until the centroids stay ordered in (0, 1)."""
    scale = 1.0
    for _ in range(_MAX_STEP_HALVINGS):
        trial = centroids + scale * step
        if trial[0] > 0.0 and trial[-1] < 1.0 and np.all(np.diff(trial) > 0.0):
            return trial
        scale *= 0.5
    raise RuntimeError("Lloyd-Max Newton step could not keep the centroids ordered")


def _panter_dite_start(dim, n_half):
    """Positive centroids at the quantiles of the point density ``f**(1/3)``.

    In ``theta`` that density is ``cos(theta)**(dim/3)``, integrated with the
    trapezoid rule out to where it falls below ``exp(-50)``.
    """
    top = min(math.pi / 2.0, math.sqrt(300.0 / dim))
    theta = np.linspace(0.0, top, _PANTER_DITE_GRID)
    density = np.exp(dim / 3.0 * _log_cos(theta))
    cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
    cumulative /= cumulative[-1]
    targets = (2.0 * np.arange(n_half) + 1.0) / (2.0 * n_half)
    return np.sin(np.interp(targets, cumulative, theta))


class _Cells:
    """Positive half-line cells of a set of positive centroids, with their integrals."""

    __slots__ = ("boundaries", "theta_lo", "theta_hi", "mass", "moment")

    def __init__(self, boundaries, theta_lo, theta_hi, mass, moment):
        self.boundaries = boundaries
        self.theta_lo = theta_lo
        self.theta_hi = theta_hi
        self.mass = mass
        self.moment = moment


def _half_line_cells(positive_centroids, n):
    """Cells ``[t_j, t_(j+1)]`` of ``[0, 1]``, ``t_0 = 0``, inner ``t`` midpoints, ``t_m = 1``.

    ``mass`` and ``moment`` are the integrals of ``(1 - x**2)**(n/2 - 1/2)`` and of
    ``x`` times it over each cell (unnormalised).
    """
    c = positive_centroids
    boundaries = np.concatenate([[0.0], 0.5 * (c[:-1] + c[1:]), [1.0]])
    theta = np.arcsin(boundaries)
    theta[-1] = math.pi / 2.0
    theta_lo, theta_hi = theta[:-1], theta[1:]
    mass, moment = _cell_integrals(theta_lo, theta_hi, n)[:2]
    return _Cells(boundaries, theta_lo, theta_hi, mass, moment)


def _cell_integrals(theta_lo, theta_hi, n, centres=None):
    """Integrals of ``cos(t)**n``, ``sin(t) cos(t)**n`` and optionally
    ``(sin(t) - centre)**2 cos(t)**n`` over each ``[theta_lo, theta_hi]``,
    with ``0 <= theta_lo < theta_hi <= pi/2``.

    Returns ``(mass, moment, squared_error)``; ``squared_error`` is None
    without ``centres``.
    """
    theta, weight = _cell_quadrature(theta_lo, theta_hi, n)
    sin_theta = np.sin(theta)
    mass = weight.sum(axis=1)
    moment = (weight * sin_theta).sum(axis=1)
    squared_error = None
    if centres is not None:
        squared_error = (weight * (sin_theta - centres[:, None]) ** 2).sum(axis=1)
    return mass, moment, squared_error


def _cell_quadrature(theta_lo, theta_hi, n):
    """Nodes and weights (times ``cos(theta)**n``) of every cell, shape ``(cells, nodes)``.

    Each cell is cut where ``n * log(cos)`` has dropped by ``_MAX_LOG_DROP`` from its
    value at ``theta_lo`` (the density decreases on ``[0, pi/2]``) and split into
    ``_PANELS_PER_CELL`` panels: at equal drops of ``n * log(cos)`` when the cell's drop
    is large (tails), evenly otherwise.
    """
    cos_lo = np.cos(theta_lo)
    sin_lo = np.sin(theta_lo)
    if n > 0:
        log_drop = n * (_log_cos(theta_lo) - _log_cos(theta_hi))
        truncated = log_drop > _MAX_LOG_DROP
        log_drop = np.minimum(log_drop, _MAX_LOG_DROP)
        theta_end = np.where(
            truncated, _angle_after_drop(cos_lo, sin_lo, log_drop / n), theta_hi
        )
    else:
        log_drop = np.zeros_like(theta_lo)
        theta_end = theta_hi

    fractions = np.arange(_PANELS_PER_CELL + 1) / _PANELS_PER_CELL
    even = theta_lo[:, None] + (theta_end - theta_lo)[:, None] * fractions
    if n > 0:
        equal_drop = _angle_after_drop(
            cos_lo[:, None], sin_lo[:, None], (log_drop / n)[:, None] * fractions
        )
        splits = np.where((log_drop > _EQUAL_DROP_THRESHOLD)[:, None], equal_drop, even)
    else:
        splits = even
    splits[:, 0] = theta_lo
    splits[:, -1] = theta_end
    splits = np.maximum.accumulate(splits, axis=1)

    left = splits[:, :-1, None]
    half_width = 0.5 * (splits[:, 1:, None] - left)
    theta = left + half_width * (1.0 + _GL_NODES)
    weight = half_width * _GL_WEIGHTS
    if n > 0:
        weight = weight * np.exp(n * _log_cos(theta))
    n_cells = theta_lo.shape[0]
    return theta.reshape(n_cells, -1), weight.reshape(n_cells, -1)


def _angle_after_drop(cos_lo, sin_lo, log_ratio):
    """``arccos(cos_lo * exp(-log_ratio))``, accurate also for tiny ``log_ratio``."""
    cos_end = cos_lo * np.exp(-log_ratio)
    sin_end = np.sqrt(sin_lo * sin_lo - cos_lo * cos_lo * np.expm1(-2.0 * log_ratio))
    return np.arctan2(sin_end, cos_end)


def _log_cos(theta):
    """``log(cos(theta))`` for ``0 <= theta <= pi/2``, accurate near 0 too.

    Near 0, ``log1p(-2 sin(theta/2)**2)`` keeps the relative accuracy that
    ``n * log(cos)`` needs for large ``n``; near ``pi/2`` ``cos`` itself is accurate.
    """
    theta = np.asarray(theta, dtype=np.float64)
    half_sin = np.sin(0.5 * theta)
    with np.errstate(divide="ignore"):
        return np.where(
            theta < 1.0, np.log1p(-2.0 * half_sin * half_sin), np.log(np.cos(theta))
        )


# --------------------------------------------------------------------------- #
# Normalising constant
# --------------------------------------------------------------------------- #
def _log_normaliser(dim):
    """``log B(1/2, (dim - 1)/2)`` to a few ulps.

    (A difference of ``math.lgamma`` values would lose ~1e-12 at large ``dim``.)
    """
    z = (dim - 1) / 2.0
    return 0.5 * math.log(math.pi) - _log_gamma_ratio_half(z)


def _log_gamma_ratio_half(z):
    """``log(Gamma(z + 1/2) / Gamma(z))`` for ``z >= 1/2``."""
    if z < 50.0:
        return math.log(math.gamma(z + 0.5) / math.gamma(z))
    # Stirling series of both log-gammas; the large terms cancel analytically.
    return (
        0.5 * math.log(z)
        + (z * math.log1p(0.5 / z) - 0.5)
        + _stirling_tail(z + 0.5)
        - _stirling_tail(z)
    )


def _stirling_tail(w):
    """``log Gamma(w) - ((w - 1/2) log w - w + log(2 pi)/2)`` for ``w >= 50`` (error < 1e-18)."""
    inv = 1.0 / w
    inv2 = inv * inv
    return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
