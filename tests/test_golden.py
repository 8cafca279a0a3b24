"""Bit-exact reproducibility of rotations, sketches, codebooks and codes, and the
statistics of the generator behind them (turboquant/quant/_rotation.py).

The golden digests pin SHA-256 checksums (first 16 hex digits) of the little-endian
bytes of every array, so a change of a single bit anywhere fails. They must hold on
every machine, numpy version, BLAS, thread count and kernel variant; a fresh process
with one thread and the portable kernels, and one with two threads, recompute them.
"""

import math

import numpy as np
import pytest

from conftest import run_python
from turboquant import TurboQuantMSE
from turboquant._kernels import _core
from turboquant.quant._codebook import float32_codebook, lloyd_max_codebook
from turboquant.quant._rotation import (
    DenseRotation,
    make_rotation,
    random_signs,
    seeded_bit_generator,
    standard_normal,
)

Z = 4.0                                  # standard errors allowed in statistical tests
EPS64 = np.finfo(np.float64).eps

DIGEST_SCRIPT = '''
import hashlib

import numpy as np

from turboquant import QJL, TurboQuantMSE, TurboQuantProd
from turboquant import TurboQuantMSE
from turboquant._kernels import _core
from turboquant.quant._codebook import float32_codebook
from turboquant.quant._rotation import make_rotation, make_sketch, standard_normal

CODE_ROWS = 8        # 8 * dim**2 <= 2**20: the dense products run in _core.small_product


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()[:16]


def quantizers(dim, seed):
    return {
        "mse dense": TurboQuantMSE(dim, 3, seed=seed),
        "mse hadamard": TurboQuantMSE(dim, 5, seed=seed, rotation="hadamard"),
        "prod dense": TurboQuantProd(dim, 4, seed=seed),
        "prod hadamard": TurboQuantProd(dim, 3, seed=seed, rotation="hadamard", sketch="hadamard"),
        "qjl gaussian": QJL(dim, seed=seed),
        "qjl hadamard": QJL(dim, seed=seed, sketch="hadamard"),
    }


def digests(dims, seeds, codes=True, variant=None):
    if variant is not None:
        with _core._use_kernel_variant(variant):
            return digests(dims, seeds, codes)
    out = {}
    for dim in dims:
        books = [float32_codebook(dim, bits) for bits in range(1, 9)]
        out[f"codebook {dim}"] = digest(*[a for b in books for a in (b.centroids, b.boundaries)])
        for seed in seeds:
            hadamard = make_rotation("hadamard", dim, seed)
            out[f"rotation dense {dim} {seed}"] = digest(make_rotation("dense", dim, seed).matrix)
            out[f"rotation hadamard {dim} {seed}"] = digest(hadamard.signs, hadamard.matrix)
            out[f"sketch gaussian {dim} {seed}"] = digest(make_sketch("gaussian", dim, seed).matrix)
            out[f"sketch hadamard {dim} {seed}"] = digest(make_sketch("hadamard", dim, seed).signs)
            if not codes:
                continue
            x = standard_normal(np.random.PCG64(np.random.SeedSequence([dim, seed])), (CODE_ROWS, dim))
            for name, quantizer in quantizers(dim, seed).items():
                arrays = []
                for dtype in (np.float64, np.float32):
                    coded = quantizer.quantize(x.astype(dtype)).to_arrays()
                    arrays += [coded[key] for key in sorted(coded)]
                out[f"codes {name} {dim} {seed}"] = digest(*arrays)
    return out
'''

CODE_DIMS = (2, 3, 64, 96, 128)
LARGE_DIMS = (1536,)          # rotations and sketches only: 1.5 s, and its dense codes go through BLAS
SEEDS = (0, 1, 12345)

# Computed with turboquant 0.1.0 (raw-word generator, Householder rotations, float32 codebooks).
GOLDEN = {
    "codebook 2": "7b76541412a41f5b",
    "rotation dense 2 0": "d42452f7ae16bce5",
    "rotation hadamard 2 0": "3a14b20bf9543522",
    "sketch gaussian 2 0": "6e420db674ce23ce",
    "sketch hadamard 2 0": "60fa5ef14a79de35",
    "codes mse dense 2 0": "6aadfa8a22300a6f",
    "codes mse hadamard 2 0": "e4ded6766fa9558b",
    "codes prod dense 2 0": "782a0026d85cda0a",
    "codes prod hadamard 2 0": "f564c85c80596dc3",
    "codes qjl gaussian 2 0": "e6b755913f6721c1",
    "codes qjl hadamard 2 0": "13242f76d51c773e",
    "rotation dense 2 1": "30a247a9df6b6a57",
    "rotation hadamard 2 1": "ec522a0bbfec6868",
    "sketch gaussian 2 1": "71b32f9e444fda47",
    "sketch hadamard 2 1": "6930aca52f50b962",
    "codes mse dense 2 1": "a3c7e239afc24041",
    "codes mse hadamard 2 1": "c0f07c2464952952",
    "codes prod dense 2 1": "1f0d2ddb67784979",
    "codes prod hadamard 2 1": "e8a51ece55261f14",
    "codes qjl gaussian 2 1": "c0da46d5fae81666",
    "codes qjl hadamard 2 1": "b5704657509b3b4f",
    "rotation dense 2 12345": "19d9bccae8326aa9",
    "rotation hadamard 2 12345": "137fe2ffa8246deb",
    "sketch gaussian 2 12345": "7df8c6c9dd283c4b",
    "sketch hadamard 2 12345": "6930aca52f50b962",
    "codes mse dense 2 12345": "4416d8230d89f954",
    "codes mse hadamard 2 12345": "f212406d560595e9",
    "codes prod dense 2 12345": "46ccec6651fb2f3b",
    "codes prod hadamard 2 12345": "7ba0b93fef214152",
    "codes qjl gaussian 2 12345": "af9e314f58e79355",
    "codes qjl hadamard 2 12345": "5c81be97977a71c4",
    "codebook 3": "eb92c270bdad5487",
    "rotation dense 3 0": "a133a1c3a391a0a5",
    "rotation hadamard 3 0": "ccae1d550f412ad7",
    "sketch gaussian 3 0": "f840fbad282a54d5",
    "sketch hadamard 3 0": "cb71c3033bc5b68f",
    "codes mse dense 3 0": "e941a8e57aa4866a",
    "codes mse hadamard 3 0": "ca104d697863281c",
    "codes prod dense 3 0": "4ce58dbff3514466",
    "codes prod hadamard 3 0": "373b1bca703c9039",
    "codes qjl gaussian 3 0": "39704c79ead825e1",
    "codes qjl hadamard 3 0": "3e93429f9fc56c77",
    "rotation dense 3 1": "605a0721ece81886",
    "rotation hadamard 3 1": "726e11b54da63a35",
    "sketch gaussian 3 1": "a4bbf305d008e166",
    "sketch hadamard 3 1": "747e085899a63d14",
    "codes mse dense 3 1": "b5e70be5fd154c38",
    "codes mse hadamard 3 1": "35379faf12694a92",
    "codes prod dense 3 1": "b1075ee3b1500bcc",
    "codes prod hadamard 3 1": "a6841a6c001326bf",
    "codes qjl gaussian 3 1": "4349ff122cd1734b",
    "codes qjl hadamard 3 1": "3044623c534ad29f",
    "rotation dense 3 12345": "9fde6be8652df098",
    "rotation hadamard 3 12345": "831234ddcb4b4899",
    "sketch gaussian 3 12345": "020df6a5a4d2220a",
    "sketch hadamard 3 12345": "19d329d6209c7057",
    "codes mse dense 3 12345": "9d8b714b4412e1d0",
    "codes mse hadamard 3 12345": "c3aa60ec546ac24e",
    "codes prod dense 3 12345": "6024eb5971dabdfe",
    "codes prod hadamard 3 12345": "b14d746bd3a9bf10",
    "codes qjl gaussian 3 12345": "0e7bb63eb633e5b8",
    "codes qjl hadamard 3 12345": "34b173442b88300f",
    "codebook 64": "988f6545e32405b6",
    "rotation dense 64 0": "3a47bf7177803e8e",
    "rotation hadamard 64 0": "dfa58a5fd11ef081",
    "sketch gaussian 64 0": "7bbbaaf0071bbe9b",
    "sketch hadamard 64 0": "05977e58f0c7ee9d",
    "codes mse dense 64 0": "f5e38e3386b24fc8",
    "codes mse hadamard 64 0": "ed8642a11af1bd67",
    "codes prod dense 64 0": "523ba9cfb17dd2df",
    "codes prod hadamard 64 0": "e0519272744b5a4c",
    "codes qjl gaussian 64 0": "f1da52758caad7d0",
    "codes qjl hadamard 64 0": "37aa71ef5050702d",
    "rotation dense 64 1": "40000af65cb28730",
    "rotation hadamard 64 1": "ac8b913d158786b5",
    "sketch gaussian 64 1": "c3676293a9346715",
    "sketch hadamard 64 1": "9d126bdaf341a4c1",
    "codes mse dense 64 1": "f5707b0e27956d8a",
    "codes mse hadamard 64 1": "304d675b7af3c961",
    "codes prod dense 64 1": "b9476b28d6ef6f38",
    "codes prod hadamard 64 1": "e70d528b057ad9f7",
    "codes qjl gaussian 64 1": "16add571d98aa608",
    "codes qjl hadamard 64 1": "9734df34d554ca02",
    "rotation dense 64 12345": "f95f11a2f810e6b8",
    "rotation hadamard 64 12345": "8bb32659e57424f8",
    "sketch gaussian 64 12345": "6560c905cc665d10",
    "sketch hadamard 64 12345": "a2238265534e1b48",
    "codes mse dense 64 12345": "0021faa7ba956515",
    "codes mse hadamard 64 12345": "c432ac178441a980",
    "codes prod dense 64 12345": "99cc4c817f0006b2",
    "codes prod hadamard 64 12345": "b52293869feb7c8c",
    "codes qjl gaussian 64 12345": "a04c109be749ffc6",
    "codes qjl hadamard 64 12345": "64657f3bdd395f07",
    "codebook 96": "0e9c75d049f15b51",
    "rotation dense 96 0": "7342110a6bf19f92",
    "rotation hadamard 96 0": "dcaffb6d23c2d304",
    "sketch gaussian 96 0": "49299c61034e16b4",
    "sketch hadamard 96 0": "47cac6ef8732bf1d",
    "codes mse dense 96 0": "4cbdc03602134744",
    "codes mse hadamard 96 0": "d4e0b47bddf481fb",
    "codes prod dense 96 0": "312d674eb7525e5c",
    "codes prod hadamard 96 0": "696ff758a4d09cb4",
    "codes qjl gaussian 96 0": "dfa284c24194330d",
    "codes qjl hadamard 96 0": "f7151982ba24ad25",
    "rotation dense 96 1": "c705e9d2cb02e9f5",
    "rotation hadamard 96 1": "96c29c55465902e9",
    "sketch gaussian 96 1": "7d20acbb2ec468f6",
    "sketch hadamard 96 1": "f73713902e0a16e9",
    "codes mse dense 96 1": "00098b044096d9e2",
    "codes mse hadamard 96 1": "636f8d87ef09fde7",
    "codes prod dense 96 1": "fe9e508d78fac2ed",
    "codes prod hadamard 96 1": "4970344f7c56a234",
    "codes qjl gaussian 96 1": "a41151c3c1cb5210",
    "codes qjl hadamard 96 1": "2a544fa46c1fd2c4",
    "rotation dense 96 12345": "6d8148473490b2d1",
    "rotation hadamard 96 12345": "8a6af47174948d03",
    "sketch gaussian 96 12345": "6ac012c4890bd900",
    "sketch hadamard 96 12345": "6a209f93ad573971",
    "codes mse dense 96 12345": "91788859653bb212",
    "codes mse hadamard 96 12345": "455b2abba9f972c0",
    "codes prod dense 96 12345": "9efc8e9062dc21bb",
    "codes prod hadamard 96 12345": "efc35b5b432c0931",
    "codes qjl gaussian 96 12345": "077c9b81046937d3",
    "codes qjl hadamard 96 12345": "2ef95e1b097dfc62",
    "codebook 128": "af671fa6d73affb5",
    "rotation dense 128 0": "cbe9b5e905e4ea4a",
    "rotation hadamard 128 0": "a6b3cd27ed36fce9",
    "sketch gaussian 128 0": "022002ce0e0262bd",
    "sketch hadamard 128 0": "c1a6b624e2b2dbde",
    "codes mse dense 128 0": "e7238dc3d76bd52d",
    "codes mse hadamard 128 0": "997952172ccdbf28",
    "codes prod dense 128 0": "07d9da5847b08d4b",
    "codes prod hadamard 128 0": "cc819c7519ddb518",
    "codes qjl gaussian 128 0": "6ede08df8dea9d01",
    "codes qjl hadamard 128 0": "19dfbf33255e01b5",
    "rotation dense 128 1": "4ccf5ae429842497",
    "rotation hadamard 128 1": "1b53ad8773886bf0",
    "sketch gaussian 128 1": "5ece11af1bf2cc7f",
    "sketch hadamard 128 1": "b6f720b487626613",
    "codes mse dense 128 1": "28769bbcf69c1035",
    "codes mse hadamard 128 1": "bf57c64c75ddedb3",
    "codes prod dense 128 1": "78491c19d48ad3fd",
    "codes prod hadamard 128 1": "f32cc8bc0f0ffa1e",
    "codes qjl gaussian 128 1": "2f1cdffd3573ffdd",
    "codes qjl hadamard 128 1": "1487d541a9d8592d",
    "rotation dense 128 12345": "c949b28acfb4cd7e",
    "rotation hadamard 128 12345": "fb9d7a8713b6d645",
    "sketch gaussian 128 12345": "281cec53599a5443",
    "sketch hadamard 128 12345": "9280a79bf8ae18b5",
    "codes mse dense 128 12345": "499fd261f5e57060",
    "codes mse hadamard 128 12345": "f81e93a7a348727e",
    "codes prod dense 128 12345": "43254b23a521a2bf",
    "codes prod hadamard 128 12345": "a245ea3358548ac3",
    "codes qjl gaussian 128 12345": "81e5aba2419a1870",
    "codes qjl hadamard 128 12345": "d3b68df1b76ecf5d",
}
GOLDEN_LARGE = {
    "codebook 1536": "6eb8c83afe76e7d3",
    "rotation dense 1536 0": "e12ac74b316d767b",
    "rotation hadamard 1536 0": "038fb006367a1963",
    "sketch gaussian 1536 0": "17793a5e54fd9df8",
    "sketch hadamard 1536 0": "65639ab5b4fa8a96",
}


def computed(dims, seeds, codes):
    namespace = {}
    exec(DIGEST_SCRIPT, namespace)
    return namespace["digests"](dims, seeds, codes)


def test_golden_digests():
    assert computed(CODE_DIMS, SEEDS, codes=True) == GOLDEN


@pytest.fixture(scope="module")
def large_rotation():
    """The dense rotation of R^1536 (1.5 s), kept alive so the tests below share it."""
    return make_rotation("dense", LARGE_DIMS[0], SEEDS[0])


def test_golden_digests_of_a_large_rotation(large_rotation):
    assert computed(LARGE_DIMS, SEEDS[:1], codes=False) == GOLDEN_LARGE


@pytest.mark.parametrize("threads, variant", [("1", "portable"), ("2", None)])
def test_golden_digests_in_a_fresh_process(threads, variant):
    script = DIGEST_SCRIPT + (
        f"\nfor key, value in digests({CODE_DIMS!r}, {SEEDS!r}, True, {variant!r}).items():"
        "\n    print(key, value)\n")
    result = run_python("-c", script, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
                        MKL_NUM_THREADS=threads)
    assert result.returncode == 0, result.stderr
    lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert lines == GOLDEN


# == The generator: kernels against numpy references ======================================
def reference_standard_normal(words):
    """Marsaglia's polar method in numpy, with numpy's log (equal to a few ulps)."""
    u, v = (((words[k::2] >> np.uint64(11)).astype(np.float64) - 2.0 ** 52) / 2.0 ** 52
            for k in (0, 1))
    s = u * u + v * v
    keep = (s > 0.0) & (s < 1.0)
    f = np.sqrt(-2.0 * np.log(s[keep]) / s[keep])
    return np.stack([u[keep] * f, v[keep] * f], axis=1).reshape(-1)


def test_standard_normals_match_a_numpy_reference():
    words = np.random.PCG64(5).random_raw(20000)
    expected = reference_standard_normal(words)
    out = np.empty(expected.size)
    assert _core.standard_normal_from_raw(words, out, 0) == expected.size
    # f = sqrt(-2 log(s) / s): half the two logs' relative errors (<= 3 + 1 ulps) plus
    # four roundings, for the sqrt, the divisions and the product.
    np.testing.assert_allclose(out, expected, rtol=8 * EPS64, atol=0)


@pytest.mark.parametrize("chunk", [2, 6, 1000])
def test_standard_normals_do_not_depend_on_how_the_words_are_split(chunk):
    words = np.random.PCG64(6).random_raw(3000)
    whole = np.empty(1001)
    assert _core.standard_normal_from_raw(words, whole, 0) == whole.size   # 2000 words suffice
    pieces = np.empty(1001)
    filled = 0
    for start in range(0, words.size, chunk):
        filled = _core.standard_normal_from_raw(words[start:start + chunk], pieces, filled)
    assert filled == pieces.size
    assert np.array_equal(pieces, whole)
    # A longer request starts with the same values.
    assert np.array_equal(standard_normal(np.random.PCG64(6), (1001,)),
                          standard_normal(np.random.PCG64(6), (3, 1001))[0])


def test_standard_normal_kernel_refuses_odd_word_counts():
    out = np.empty(4)
    with pytest.raises(ValueError, match="even number of words"):
        _core.standard_normal_from_raw(np.zeros(3, dtype=np.uint64), out, 0)
    with pytest.raises(ValueError, match="filled"):
        _core.standard_normal_from_raw(np.zeros(2, dtype=np.uint64), out, 5)


def test_signs_are_the_bits_of_the_raw_words():
    n = 1000
    words = np.random.PCG64(7).random_raw(-(-n // 64))
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:n]
    signs = random_signs(np.random.PCG64(7), (4, n // 4))
    assert np.array_equal(signs.reshape(-1), np.where(bits == 1, 1.0, -1.0))


@pytest.mark.parametrize("dim", [2, 3, 64, 128])
def test_dense_rotation_matches_lapack_qr(dim):
    # The same Q diag(sign(diag R)) as LAPACK, to rounding: Q's perturbation is
    # about cond(G) * eps, and a Gaussian G has cond(G) of a few times dim.
    gaussian = standard_normal(seeded_bit_generator(3, 0), (dim, dim))
    q, r = np.linalg.qr(gaussian)
    expected = q * np.sign(np.diag(r))
    matrix = DenseRotation(dim, seeded_bit_generator(3, 0)).matrix
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=10 * dim * EPS64)


# == The generator: statistics =============================================================
N_NORMALS = 1 << 20


@pytest.fixture(scope="module")
def normals():
    return standard_normal(seeded_bit_generator(2024, 0), (N_NORMALS,))


@pytest.mark.parametrize("order, moment, variance", [
    (1, 0.0, 1.0), (2, 1.0, 2.0), (3, 0.0, 15.0), (4, 3.0, 96.0)])
def test_standard_normal_moments(normals, order, moment, variance):
    # E z^k and Var z^k = E z^2k - (E z^k)^2 of N(0, 1): 1, 3, 15, 105 for k = 2, 4, 6, 8.
    measured = float(np.mean(normals ** order))
    assert abs(measured - moment) <= Z * math.sqrt(variance / N_NORMALS), measured


def test_standard_normal_kolmogorov_smirnov(normals):
    # The empirical CDF on a grid of 801 points against Phi. The KS statistic D
    # (a maximum over all points, so at least this one) has P(sqrt(n) D > x) ~ 2 exp(-2 x^2):
    # x below is where that equals the two-sided tail of Z standard errors.
    grid = np.linspace(-4.0, 4.0, 801)
    empirical = np.searchsorted(np.sort(normals), grid, side="right") / N_NORMALS
    phi = np.array([0.5 * (1.0 + math.erf(t / math.sqrt(2.0))) for t in grid])
    tail = math.erfc(Z / math.sqrt(2.0))
    x = math.sqrt(math.log(2.0 / tail) / 2.0)
    assert np.max(np.abs(empirical - phi)) <= x / math.sqrt(N_NORMALS)


def test_signs_are_balanced():
    signs = random_signs(seeded_bit_generator(2024, 1), (N_NORMALS,))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) <= Z / math.sqrt(N_NORMALS)


@pytest.mark.parametrize("dim", [*CODE_DIMS, *LARGE_DIMS])
def test_dense_rotation_is_the_q_of_a_qr_with_positive_diagonal(dim, large_rotation):
    # Householder QR keeps Q orthogonal to c * dim * eps (c of order one; random
    # inputs give about sqrt(dim) * eps), and R = M^T G upper triangular with R_kk > 0.
    seed = SEEDS[0]
    matrix = make_rotation("dense", dim, seed).matrix
    assert np.abs(matrix @ matrix.T - np.eye(dim)).max() <= dim * EPS64
    r = matrix.T @ standard_normal(seeded_bit_generator(seed, 0), (dim, dim))
    assert np.abs(np.tril(r, -1)).max() <= dim * EPS64 * np.abs(r).max()
    assert np.all(np.diag(r) > 0.0)


HAAR_DIM = 16
HAAR_SAMPLES = 4000


@pytest.fixture(scope="module")
def haar_samples():
    return np.stack([DenseRotation(HAAR_DIM, seeded_bit_generator(seed, 0)).matrix
                     for seed in range(HAAR_SAMPLES)])


@pytest.mark.parametrize("entry", [(0, 0), (HAAR_DIM - 1, HAAR_DIM - 1), (0, HAAR_DIM - 1), (5, 2)])
def test_dense_rotation_entries_are_haar_distributed(haar_samples, entry):
    # An entry x of a Haar orthogonal matrix: x^2 ~ Beta(1/2, (d - 1)/2), mean 1/d and
    # variance 2 (d - 1) / (d^2 (d + 2)); x is symmetric, E x = 0, Var x = 1/d. Without
    # the sign fix the diagonal entries would be biased (Householder makes R_kk < 0 for
    # G_kk > 0).
    d, n = HAAR_DIM, HAAR_SAMPLES
    x = haar_samples[:, entry[0], entry[1]]
    assert abs(x.mean()) <= Z * math.sqrt(1.0 / d / n)
    variance = 2.0 * (d - 1) / (d * d * (d + 2))
    assert abs(np.mean(x * x) - 1.0 / d) <= Z * math.sqrt(variance / n)


def test_dense_rotation_traces_are_haar_distributed(haar_samples):
    # For Haar O(d), d >= 4, the trace has the moments of N(0, 1) up to order 4:
    # E tr = 0, E tr^2 = 1, E tr^4 = 3, so Var tr^2 = 2.
    traces = np.trace(haar_samples, axis1=1, axis2=2)
    n = HAAR_SAMPLES
    assert abs(traces.mean()) <= Z / math.sqrt(n)
    assert abs(np.mean(traces ** 2) - 1.0) <= Z * math.sqrt(2.0 / n)


# == Codebooks the quantizers use ==========================================================
@pytest.mark.parametrize("dim", [*CODE_DIMS, *LARGE_DIMS])
@pytest.mark.parametrize("bits", range(1, 9))
def test_float32_codebook(dim, bits):
    book, exact = float32_codebook(dim, bits), lloyd_max_codebook(dim, bits)
    for array in (book.centroids, book.boundaries):
        assert array.dtype == np.float64 and not array.flags.writeable
        assert np.array_equal(array.astype(np.float32).astype(np.float64), array)
    c, b = book.centroids, book.boundaries
    assert np.array_equal(c, -c[::-1]) and np.array_equal(b, -b[::-1])
    assert b[len(b) // 2] == 0.0
    assert np.all(c[:-1] < b) and np.all(b < c[1:])
    assert np.all(np.abs(c - exact.centroids) <= 2.0 ** -24 * np.abs(exact.centroids))
    assert book.distortion == exact.distortion
    assert float32_codebook(dim, bits) is book
    assert TurboQuantMSE(dim, bits).codebook is book
