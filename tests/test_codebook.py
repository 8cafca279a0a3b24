"""Tests of the Lloyd-Max codebooks of one coordinate of a random unit vector.

The optimality checks recompute every cell's mass and conditional mean with
their own quadrature (many Gauss-Legendre panels, ``cos**n`` evaluated
directly) and the closed-form first moment, so they do not share code with
the solver; scipy, when installed, gives a second independent check through
the regularised incomplete beta function.
"""

import dataclasses
import math

import numpy as np
import pytest

from turboquant.quant._codebook import (
    Codebook,
    _cached_codebook,
    coordinate_density,
    distortion_lower_bound,
    lloyd_max_codebook,
)
from turboquant._errors import InvalidParameterError

ALL_BITS = range(1, 9)
UPPER_RATIO = math.sqrt(3.0) * math.pi / 2.0  # ~2.72, the paper's bound on D_mse / 4**-b


# --------------------------------------------------------------------------- #
# Independent references
# --------------------------------------------------------------------------- #
def half_normal_mean(dim):
    """``E|x| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))`` via ``c_(d+2) = c_d * d / (d+1)``."""
    value, d = (2.0 / math.pi, 2) if dim % 2 == 0 else (0.5, 3)
    while d < dim:
        value *= d / (d + 1.0)
        d += 2
    return value


def reference_cells(boundaries, dim, panels=200, nodes=20):
    """Mass (normalised) and conditional mean of every cell of the codebook.

    Mass: composite Gauss-Legendre in ``theta`` (``x = sin(theta)``, mass element
    ``cos(theta)**(d-2) dtheta / B(1/2, (d-1)/2)``) on ``panels`` equal panels per
    cell. First moment: closed form ``-(1 - x**2)**((d-1)/2) / (d-1)``.
    """
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    theta = np.arcsin(edges)
    theta[0], theta[-1] = -math.pi / 2.0, math.pi / 2.0
    gl_x, gl_w = np.polynomial.legendre.leggauss(nodes)
    steps = np.linspace(0.0, 1.0, panels + 1)
    splits = theta[:-1, None] + (theta[1:] - theta[:-1])[:, None] * steps  # (cells, panels+1)
    left, right = splits[:, :-1, None], splits[:, 1:, None]
    points = 0.5 * (left + right) + 0.5 * (right - left) * gl_x
    weights = 0.5 * (right - left) * gl_w * np.cos(points) ** (dim - 2)
    unnormalised_mass = weights.sum(axis=(1, 2))

    exponent = (dim - 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lo = exponent * np.log1p(-edges[:-1] ** 2)
        log_hi = exponent * np.log1p(-edges[1:] ** 2)
        # (1 - a^2)^k - (1 - b^2)^k without cancellation, sign-aware for cells left of 0.
        first_moment = np.where(
            log_lo >= log_hi,
            np.exp(log_lo) * -np.expm1(log_hi - log_lo),
            -np.exp(log_hi) * -np.expm1(log_lo - log_hi),
        ) / (dim - 1)
    log_z = math.lgamma(0.5) + math.lgamma((dim - 1) / 2.0) - math.lgamma(dim / 2.0)
    return unnormalised_mass / math.exp(log_z), first_moment / unnormalised_mass


def reference_distortion(codebook, panels=200, nodes=20):
    """``dim * E[(x - Q(x))**2]`` by the same composite quadrature in ``theta``."""
    dim = codebook.dim
    edges = np.concatenate([[-1.0], codebook.boundaries, [1.0]])
    theta = np.arcsin(edges)
    theta[0], theta[-1] = -math.pi / 2.0, math.pi / 2.0
    gl_x, gl_w = np.polynomial.legendre.leggauss(nodes)
    steps = np.linspace(0.0, 1.0, panels + 1)
    splits = theta[:-1, None] + (theta[1:] - theta[:-1])[:, None] * steps
    left, right = splits[:, :-1, None], splits[:, 1:, None]
    points = 0.5 * (left + right) + 0.5 * (right - left) * gl_x
    weights = 0.5 * (right - left) * gl_w * np.cos(points) ** (dim - 2)
    error = (np.sin(points) - codebook.centroids[:, None, None]) ** 2
    return dim * (weights * error).sum() / weights.sum()


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "bits, expected",
    # Four significant digits (0.0340 and 0.00931 are often quoted with three).
    [(1, 0.3609), (2, 0.1160), (3, 0.03397), (4, 0.009315)],
)
def test_distortion_at_dim_128(bits, expected):
    assert lloyd_max_codebook(128, bits).distortion == pytest.approx(expected, rel=5e-4)


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 17, 128, 1000, 4096, 100_000])
def test_one_bit_is_the_conditional_mean_of_a_half(dim):
    codebook = lloyd_max_codebook(dim, 1)
    mean = half_normal_mean(dim)
    np.testing.assert_allclose(codebook.centroids, [-mean, mean], rtol=1e-12)
    np.testing.assert_array_equal(codebook.boundaries, [0.0])
    np.testing.assert_array_equal(codebook.probabilities, [0.5, 0.5])
    assert codebook.distortion == pytest.approx(1.0 - dim * mean**2, rel=1e-12)


@pytest.mark.parametrize("dim", [2, 3, 16, 128, 1536, 4096])
def test_distortion_between_bounds_and_decreasing_in_bits(dim):
    distortions = np.array([lloyd_max_codebook(dim, bits).distortion for bits in ALL_BITS])
    lower = np.array([distortion_lower_bound(bits) for bits in ALL_BITS])
    assert np.all(distortions > 0.0)
    assert np.all(distortions / lower < UPPER_RATIO)
    assert np.all(np.diff(distortions) < 0.0)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_density_at_dim_3(bits):
    levels = 2**bits
    codebook = lloyd_max_codebook(3, bits)
    uniform_midpoints = -1.0 + (2.0 * np.arange(levels) + 1.0) / levels
    np.testing.assert_allclose(codebook.centroids, uniform_midpoints, rtol=0, atol=1e-12)
    np.testing.assert_allclose(codebook.probabilities, 1.0 / levels, rtol=1e-12)
    # Uniform on [-1, 1] with cells of width 2/K: 3 * (2/K)**2 / 12 = 4**-bits exactly.
    assert codebook.distortion == pytest.approx(4.0**-bits, rel=1e-12)


@pytest.mark.parametrize(
    "bits, gaussian_levels",
    # Lloyd-Max levels of N(0, 1) (Max 1960): positive half.
    [(1, [0.7979]), (2, [0.4528, 1.5104])],
)
def test_large_dim_approaches_gaussian_levels(bits, gaussian_levels):
    dim = 4096
    scaled = np.sqrt(dim) * lloyd_max_codebook(dim, bits).centroids
    np.testing.assert_allclose(scaled[2 ** (bits - 1):], gaussian_levels, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- #
# Lloyd-Max optimality, checked independently
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dim", [2, 3, 5, 128, 1000, 4096])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_centroids_are_conditional_means(dim, bits):
    codebook = lloyd_max_codebook(dim, bits)
    probabilities, means = reference_cells(codebook.boundaries, dim)
    scale = 1.0 / math.sqrt(dim)
    np.testing.assert_allclose(codebook.centroids, means, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(codebook.probabilities, probabilities, rtol=1e-10)
    assert codebook.distortion == pytest.approx(reference_distortion(codebook), rel=1e-10)


@pytest.mark.parametrize("dim", [2, 7, 64, 300, 2048])
@pytest.mark.parametrize("bits", [4, 8])
def test_against_scipy_incomplete_beta(dim, bits):
    special = pytest.importorskip("scipy.special")
    codebook = lloyd_max_codebook(dim, bits)
    half = 2 ** (bits - 1)
    # P(x > t) = I_(1 - t^2)((d - 1)/2, 1/2) / 2 for t >= 0.
    t = np.concatenate([codebook.boundaries[half - 1:], [1.0]])
    upper_tail = 0.5 * special.betainc((dim - 1) / 2.0, 0.5, (1.0 - t) * (1.0 + t))
    masses = upper_tail[:-1] - upper_tail[1:]
    np.testing.assert_allclose(codebook.probabilities[half:], masses, rtol=1e-9)
    # First moment over [a, b]: ((1 - a^2)^((d-1)/2) - (1 - b^2)^((d-1)/2)) / ((d - 1) B).
    log_beta = special.betaln(0.5, (dim - 1) / 2.0)
    power = np.exp((dim - 1) / 2.0 * np.log1p(-(t * t)[:-1]))
    power_next = np.concatenate([power[1:], [0.0]])
    moments = (power - power_next) / ((dim - 1) * np.exp(log_beta))
    np.testing.assert_allclose(
        codebook.centroids[half:], moments / masses, rtol=0, atol=1e-9 / math.sqrt(dim)
    )


def test_boundaries_are_midpoints():
    for dim, bits in [(2, 8), (5, 3), (128, 6), (4096, 8)]:
        codebook = lloyd_max_codebook(dim, bits)
        c = codebook.centroids
        np.testing.assert_array_equal(codebook.boundaries, 0.5 * (c[:-1] + c[1:]))


# --------------------------------------------------------------------------- #
# Structure
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dim", [2, 3, 6, 128, 1536, 4096])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_structure(dim, bits):
    levels = 2**bits
    codebook = lloyd_max_codebook(dim, bits)
    c, t, p = codebook.centroids, codebook.boundaries, codebook.probabilities
    assert (codebook.dim, codebook.bits) == (dim, bits)
    assert c.shape == (levels,) and t.shape == (levels - 1,) and p.shape == (levels,)
    assert c.dtype == t.dtype == p.dtype == np.float64
    assert isinstance(codebook.distortion, float)
    assert np.all(np.diff(c) > 0.0)
    assert -1.0 < c[0] and c[-1] < 1.0
    np.testing.assert_array_equal(c, -c[::-1])
    np.testing.assert_array_equal(t, -t[::-1])
    assert t[levels // 2 - 1] == 0.0
    assert np.all((c[:-1] < t) & (t < c[1:]))
    np.testing.assert_array_equal(p, p[::-1])
    assert np.all(p > 0.0)
    assert p.sum() == pytest.approx(1.0, abs=1e-14)


def test_arrays_are_read_only_and_codebook_frozen():
    codebook = lloyd_max_codebook(64, 3)
    for array in (codebook.centroids, codebook.boundaries, codebook.probabilities):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        codebook.distortion = 0.0


def test_constructor_copies_and_freezes_arrays():
    centroids = np.array([-0.5, 0.5])
    codebook = Codebook(
        dim=3, bits=1, centroids=centroids, boundaries=[0.0], distortion=0.25,
        probabilities=[0.5, 0.5],
    )
    centroids[0] = 7.0
    assert codebook.centroids[0] == -0.5
    assert not codebook.boundaries.flags.writeable
    assert repr(codebook) == "Codebook(dim=3, bits=1, distortion=0.25)"


def test_cached_and_deterministic():
    first = lloyd_max_codebook(200, 5)
    assert lloyd_max_codebook(200, 5) is first
    assert lloyd_max_codebook(np.int64(200), np.uint8(5)) is first
    fresh = _cached_codebook.__wrapped__(200, 5)  # recompute without touching the cache
    assert fresh is not first
    for name in ("centroids", "boundaries", "probabilities"):
        np.testing.assert_array_equal(getattr(fresh, name), getattr(first, name))
    assert fresh.distortion == first.distortion


@pytest.mark.parametrize("dim", [1, 0, -4, 2.5, 128.0, True, np.float64(16), "64", None])
def test_bad_dim(dim):
    with pytest.raises(InvalidParameterError, match=r"dim must be an integer"):
        lloyd_max_codebook(dim, 2)
    with pytest.raises(InvalidParameterError):
        coordinate_density(0.0, dim)


@pytest.mark.parametrize("bits", [0, 9, -1, True, 2.0, np.float32(3), None])
def test_bad_bits(bits):
    with pytest.raises(InvalidParameterError, match=r"bits must be an integer"):
        lloyd_max_codebook(64, bits)
    with pytest.raises(InvalidParameterError):
        distortion_lower_bound(bits)


def test_error_messages_name_the_value():
    with pytest.raises(InvalidParameterError, match=r"bits must be an integer in 1\.\.8, got 9"):
        lloyd_max_codebook(64, 9)
    with pytest.raises(InvalidParameterError, match=r"dim must be an integer >= 2, got 1"):
        lloyd_max_codebook(1, 4)
    assert issubclass(InvalidParameterError, ValueError)


# --------------------------------------------------------------------------- #
# Density and lower bound
# --------------------------------------------------------------------------- #
def test_distortion_lower_bound():
    for bits in ALL_BITS:
        assert distortion_lower_bound(bits) == 4.0**-bits
    assert distortion_lower_bound(np.int32(3)) == 1.0 / 64.0


@pytest.mark.parametrize("dim", [2, 3, 4, 9, 128, 4096])
def test_density_normalised_with_variance_one_over_dim(dim):
    # Integrate in theta (x = sin theta, dx = cos theta dtheta): smooth even for dim = 2.
    gl_x, gl_w = np.polynomial.legendre.leggauss(40)
    edges = np.linspace(-math.pi / 2.0, math.pi / 2.0, 201)
    left, right = edges[:-1, None], edges[1:, None]
    theta = (0.5 * (left + right) + 0.5 * (right - left) * gl_x).ravel()
    weight = (0.5 * (right - left) * gl_w).ravel() * np.cos(theta)
    density = coordinate_density(np.sin(theta), dim)
    # At dim = 2 the density is infinite at +-1, where rounding x = sin(theta) costs digits.
    rel = 1e-9 if dim == 2 else 1e-12
    assert np.sum(weight * density) == pytest.approx(1.0, rel=rel)
    assert np.sum(weight * density * np.sin(theta) ** 2) == pytest.approx(1.0 / dim, rel=rel)


def test_density_special_values_and_shape():
    x = np.array([[-2.0, -1.0, 0.0], [0.5, 1.0, 3.0]])
    assert coordinate_density(x, 5).shape == (2, 3)
    np.testing.assert_array_equal(coordinate_density([-1.5, 1.5], 2), [0.0, 0.0])
    np.testing.assert_array_equal(coordinate_density([-1.0, 0.3, 1.0], 3), [0.5, 0.5, 0.5])
    assert np.all(np.isinf(coordinate_density([-1.0, 1.0], 2)))
    assert coordinate_density(0.0, 2) == pytest.approx(1.0 / math.pi, rel=1e-15)
    np.testing.assert_array_equal(coordinate_density([-1.0, 1.0], 4), [0.0, 0.0])
    assert coordinate_density(0.0, 4) == pytest.approx(2.0 / math.pi, rel=1e-15)
    assert np.isnan(coordinate_density(np.nan, 10))
    # Close to N(0, 1/d) for large d.
    gaussian_peak = math.sqrt(10**6 / (2 * math.pi))
    assert coordinate_density(0.0, 10**6) == pytest.approx(gaussian_peak, rel=1e-6)


@pytest.mark.parametrize("dim", [2, 3, 10, 1000, 4096])
def test_density_against_scipy_beta(dim):
    stats = pytest.importorskip("scipy.stats")
    x = np.linspace(-0.999, 0.999, 41)
    x = x[x != 0.0]
    # x**2 ~ Beta(1/2, (d-1)/2) and x is symmetric: f(x) = |x| * beta_pdf(x**2).
    expected = np.abs(x) * stats.beta.pdf(x * x, 0.5, (dim - 1) / 2.0)
    np.testing.assert_allclose(coordinate_density(x, dim), expected, rtol=1e-10, atol=1e-300)
