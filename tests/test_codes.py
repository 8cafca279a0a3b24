"""The codes containers: sequence protocol, concatenation, layout, (de)serialisation."""

import math

import numpy as np
import pytest

from conftest import random_unit_vectors
from turboquant import (
    QJL,
    CodeSpec,
    Codes,
    CorruptPayloadError,
    IncompatibleCodesError,
    InvalidParameterError,
    MSECodes,
    ProdCodes,
    QJLCodes,
    TurboQuantMSE,
    TurboQuantProd,
)

DIM = 101
N = 9


def make_quantizer(kind, dim=DIM, bits=3, seed=0):
    if kind == "mse":
        return TurboQuantMSE(dim, bits, seed=seed, rotation="hadamard")
    if kind == "prod":
        return TurboQuantProd(dim, bits, seed=seed, rotation="hadamard", sketch="hadamard")
    return QJL(dim, seed=seed, sketch="hadamard")


KINDS = ("mse", "prod", "qjl")
CODES_TYPES = {"mse": MSECodes, "prod": ProdCodes, "qjl": QJLCodes}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def data():
    x = random_unit_vectors(N, DIM, 11) * np.linspace(0.5, 3.0, N)[:, None]
    x[4] = 0.0
    return x


@pytest.fixture
def quantizer(kind):
    return make_quantizer(kind)


@pytest.fixture
def codes(quantizer, data):
    return quantizer.quantize(data)


def rows_of(codes, rows):
    """The arrays of ``codes`` restricted to ``rows`` (reference for indexing)."""
    return {name: array[rows] for name, array in codes.to_arrays().items()}


def assert_codes_hold(codes, expected_arrays):
    arrays = codes.to_arrays()
    assert set(arrays) == set(expected_arrays)
    for name, array in arrays.items():
        assert array.dtype == expected_arrays[name].dtype
        assert np.array_equal(array, expected_arrays[name]), name


# -- type and sequence protocol -------------------------------------------------
def test_quantize_returns_the_matching_codes_type(kind, codes):
    assert type(codes) is CODES_TYPES[kind]
    assert isinstance(codes, Codes)
    assert codes.spec.kind == kind
    assert codes.dim == DIM
    assert len(codes) == N


def test_int_index_gives_one_row(codes):
    for i in range(N):
        row = codes[i]
        assert type(row) is type(codes) and len(row) == 1 and row.spec == codes.spec
        assert_codes_hold(row, rows_of(codes, [i]))
    assert codes[np.int64(3)] == codes[3]
    assert codes[np.uint8(3)] == codes[3]


def test_negative_index(codes):
    assert codes[-1] == codes[N - 1]
    assert codes[-N] == codes[0]


@pytest.mark.parametrize("index", [N, N + 5, -N - 1, 10**12])
def test_index_out_of_range(codes, index):
    with pytest.raises(IndexError, match=str(index)):
        codes[index]


@pytest.mark.parametrize("key", [slice(2, 7), slice(None, None, 2), slice(None, None, -1),
                                 slice(5, 2), slice(-3, None), slice(0, 100)])
def test_slice(codes, key):
    part = codes[key]
    assert type(part) is type(codes)
    assert len(part) == len(range(N)[key])
    assert_codes_hold(part, rows_of(codes, key))


def test_integer_array_index(codes):
    order = np.array([8, 0, 3, 3, -1])
    assert_codes_hold(codes[order], rows_of(codes, order))
    assert_codes_hold(codes[[1, 2]], rows_of(codes, [1, 2]))
    with pytest.raises(IndexError):
        codes[np.array([0, N])]


def test_boolean_index(codes):
    mask = np.arange(N) % 3 == 0
    assert_codes_hold(codes[mask], rows_of(codes, mask))
    assert len(codes[np.zeros(N, dtype=bool)]) == 0
    with pytest.raises(IndexError):
        codes[np.ones(N + 1, dtype=bool)]


@pytest.mark.parametrize("key", [1.5, "a", np.array([0.0, 1.0]), None])
def test_bad_index_type(codes, key):
    with pytest.raises(IndexError, match="int, a slice"):
        codes[key]


@pytest.mark.parametrize("key", [True, np.bool_(False), np.array([[0, 1]]), np.ones((1, N), dtype=bool)])
def test_index_that_is_not_one_dimensional_is_refused(data, key):
    # A scalar boolean or a 2-d index must not reach numpy: ``indices[True]`` has
    # shape (1, n, width) and ``indices[[[0, 1]]]`` shape (1, 2, width), which
    # would make a corrupt container whose len() is 1.
    codes = make_quantizer("mse").quantize(data)
    with pytest.raises(IndexError):
        codes[key]


def test_slices_are_views_and_read_only(codes):
    part = codes[2:5]
    for name, array in part._arrays.items():
        assert np.shares_memory(array, codes._arrays[name])
        assert not array.flags.writeable


def test_arrays_are_read_only(kind, codes):
    names = {"mse": ["indices", "norms"], "prod": ["indices", "signs", "norms", "residual_norms"],
             "qjl": ["signs", "norms"]}[kind]
    derived = [codes, codes[1:4], codes[[0, 2]], codes[3], codes.drop_oldest(2),
               Codes.concatenate([codes, codes]), type(codes).from_arrays(codes.spec, **codes.to_arrays())]
    for item in derived:
        for name in names:
            array = getattr(item, name)
            assert not array.flags.writeable
            with pytest.raises(ValueError):
                array[...] = 0


def test_to_arrays_returns_independent_copies(codes):
    arrays = codes.to_arrays()
    before = codes.to_arrays()
    for array in arrays.values():
        assert array.flags.writeable and array.flags.c_contiguous
        array[...] = 1
    assert_codes_hold(codes, before)


# -- drop_oldest ----------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 4, N])
def test_drop_oldest_equals_slicing(codes, count):
    dropped = codes.drop_oldest(count)
    assert dropped == codes[count:]
    assert len(dropped) == N - count


@pytest.mark.parametrize("count", [-1, N + 1, True, 1.0, "1", None])
def test_drop_oldest_validates_count(codes, count):
    with pytest.raises(InvalidParameterError, match="count"):
        codes.drop_oldest(count)


# -- concatenate -------------------------------------------------------------------------
def test_concatenate_equals_quantizing_the_concatenated_input(quantizer, data):
    parts = [data[:3], data[3:4], data[4:4], data[4:]]
    joined = Codes.concatenate(quantizer.quantize(part) for part in parts)
    assert joined == quantizer.quantize(data)
    assert type(joined) is CODES_TYPES[quantizer.spec.kind]
    assert Codes.concatenate([quantizer.quantize(data)]) == quantizer.quantize(data)


def test_concatenate_does_not_alias_its_inputs(codes):
    joined = Codes.concatenate([codes, codes])
    for name, array in joined._arrays.items():
        assert not np.shares_memory(array, codes._arrays[name])


@pytest.mark.parametrize("change", ["bits", "seed", "dim", "kind", "rotation", "sketch"])
def test_concatenate_different_specs_raises(change, data):
    base = TurboQuantProd(DIM, 3, seed=0)
    other = {
        "bits": lambda: TurboQuantProd(DIM, 4, seed=0),
        "seed": lambda: TurboQuantProd(DIM, 3, seed=1),
        "dim": lambda: TurboQuantProd(DIM + 1, 3, seed=0),
        "kind": lambda: TurboQuantMSE(DIM, 3, seed=0),
        "rotation": lambda: TurboQuantProd(DIM, 3, seed=0, rotation="hadamard"),
        "sketch": lambda: TurboQuantProd(DIM, 3, seed=0, sketch="hadamard"),
    }[change]()
    other_data = np.zeros((2, other.dim))
    with pytest.raises(IncompatibleCodesError, match="concatenate"):
        Codes.concatenate([base.quantize(data), other.quantize(other_data)])


def test_concatenate_nothing_raises():
    with pytest.raises(InvalidParameterError, match="at least one"):
        Codes.concatenate([])


# -- layout and nbytes --------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [2, 3, 97, 101, 128])
def test_nbytes_and_dense_packing(bits, dim):
    n = 5
    x = random_unit_vectors(n, dim, dim + bits)
    row_bytes = math.ceil(dim * bits / 8)
    sign_bytes = math.ceil(dim / 8)

    mse = TurboQuantMSE(dim, bits, rotation="hadamard")
    codes = mse.quantize(x)
    assert codes.indices.shape == (n, row_bytes) and codes.indices.dtype == np.uint8
    assert codes.norms.shape == (n,) and codes.norms.dtype == np.float32
    assert codes.nbytes == n * row_bytes + 4 * n
    assert mse.code_bytes == row_bytes + 4

    if bits >= 2:
        prod = TurboQuantProd(dim, bits, rotation="hadamard", sketch="hadamard")
        codes = prod.quantize(x)
        stage_bytes = math.ceil(dim * (bits - 1) / 8)
        assert codes.indices.shape == (n, stage_bytes)
        assert codes.signs.shape == (n, sign_bytes) and codes.signs.dtype == np.uint8
        assert codes.residual_norms.shape == (n,) and codes.residual_norms.dtype == np.float32
        assert codes.nbytes == n * (stage_bytes + sign_bytes + 8)
        assert prod.code_bytes == stage_bytes + sign_bytes + 8

    if bits == 1:
        qjl = QJL(dim, sketch="hadamard")
        codes = qjl.quantize(x)
        assert codes.signs.shape == (n, sign_bytes)
        assert codes.nbytes == n * (sign_bytes + 4)
        assert qjl.code_bytes == sign_bytes + 4


def test_row_layout_matches_codes(kind, codes):
    layout = codes.spec.row_layout()
    arrays = codes.to_arrays()
    assert set(layout) == set(arrays)
    for name, (dtype, width) in layout.items():
        assert arrays[name].dtype == np.dtype(dtype)
        assert arrays[name].shape == ((N,) if width is None else (N, width))


# -- from_arrays -------------------------------------------------------------------------------
def test_from_arrays_round_trip(kind, codes):
    cls = CODES_TYPES[kind]
    rebuilt = cls.from_arrays(codes.spec, **codes.to_arrays())
    assert rebuilt == codes
    assert cls.from_arrays(codes.spec.to_dict(), **codes.to_arrays()) == codes
    assert CodeSpec.from_dict(codes.spec.to_dict()) == codes.spec


def test_from_arrays_round_trip_keeps_meaning(quantizer, codes, data):
    rebuilt = type(codes).from_arrays(codes.spec, **codes.to_arrays())
    queries = random_unit_vectors(3, DIM, 5)
    assert np.array_equal(quantizer.dequantize(rebuilt), quantizer.dequantize(codes))
    assert np.array_equal(quantizer.inner_products(rebuilt, queries),
                          quantizer.inner_products(codes, queries))


def test_from_arrays_copies(kind, codes):
    arrays = codes.to_arrays()
    rebuilt = CODES_TYPES[kind].from_arrays(codes.spec, **arrays)
    for array in arrays.values():
        array[...] = 0
    assert rebuilt == codes


def test_from_arrays_accepts_empty_and_non_contiguous(kind, codes):
    cls = CODES_TYPES[kind]
    empty = {name: array[:0] for name, array in codes.to_arrays().items()}
    assert len(cls.from_arrays(codes.spec, **empty)) == 0
    strided = {name: np.repeat(array, 2, axis=0)[::2] for name, array in codes.to_arrays().items()}
    assert cls.from_arrays(codes.spec, **strided) == codes


def corrupt(kind, case, a):
    """``a`` (the arrays of valid codes of ``kind``) damaged as ``case`` says."""
    packed = {"mse": "indices", "prod": "signs", "qjl": "signs"}[kind]
    nan_norms = np.where(np.arange(N) == 2, np.nan, a["norms"]).astype(np.float32)
    return {
        "missing": lambda: {k: v for k, v in a.items() if k != "norms"},
        "extra": lambda: {**a, "bogus": a["norms"]},
        "wrong dtype": lambda: {**a, packed: a[packed].astype(np.int16)},
        "wrong norm dtype": lambda: {**a, "norms": a["norms"].astype(np.float64)},
        "wrong width": lambda: {**a, packed: a[packed][:, :-1]},
        "wrong ndim": lambda: {**a, "norms": a["norms"][:, None]},
        "1-d packed": lambda: {**a, packed: a[packed].ravel()},
        "mismatched rows": lambda: {**a, "norms": a["norms"][:-1]},
        "negative norm": lambda: {**a, "norms": -a["norms"] - 1},
        "nan norm": lambda: {**a, "norms": nan_norms},
        "inf norm": lambda: {**a, "norms": np.full(N, np.inf, dtype=np.float32)},
        "negative residual norm": lambda: {**a, "residual_norms": -a["residual_norms"] - 1},
        "nan residual norm": lambda: {**a, "residual_norms": np.full(N, np.nan, dtype=np.float32)},
        "mismatched indices rows": lambda: {**a, "indices": a["indices"][:-2]},
    }[case]()


COMMON_CASES = {"missing": "needs arrays", "extra": "needs arrays", "wrong dtype": "dtype",
                "wrong norm dtype": "dtype", "wrong width": "shape", "wrong ndim": "shape",
                "1-d packed": "shape", "mismatched rows": "rows", "negative norm": "non-negative",
                "nan norm": "finite", "inf norm": "finite"}
PROD_CASES = {"negative residual norm": "non-negative", "nan residual norm": "finite",
              "mismatched indices rows": "rows"}
CORRUPT_CASES = [(kind, case, message) for kind in KINDS for case, message in COMMON_CASES.items()]
CORRUPT_CASES += [("prod", case, message) for case, message in PROD_CASES.items()]


@pytest.mark.parametrize("kind, case, message", CORRUPT_CASES)
def test_from_arrays_rejects_corrupt_payloads(kind, case, message, data):
    codes = make_quantizer(kind).quantize(data)
    arrays = corrupt(kind, case, codes.to_arrays())
    with pytest.raises(CorruptPayloadError, match=message):
        CODES_TYPES[kind].from_arrays(codes.spec, **arrays)


def test_from_arrays_rejects_a_spec_of_another_kind(codes):
    other = {MSECodes: QJLCodes, ProdCodes: MSECodes, QJLCodes: ProdCodes}[type(codes)]
    with pytest.raises(CorruptPayloadError, match="kind"):
        other.from_arrays(codes.spec, **codes.to_arrays())


# -- equality and repr ----------------------------------------------------------------------
def test_equality(quantizer, codes, data):
    assert codes == quantizer.quantize(data)
    assert codes != codes[1:]
    assert codes != codes[::-1]
    assert codes[0] != codes[1]
    assert codes != make_quantizer(codes.spec.kind, seed=1).quantize(data)
    assert codes != "codes"
    assert codes.__eq__(1) is NotImplemented
    with pytest.raises(TypeError):
        hash(codes)


def test_equality_needs_equal_specs(data):
    x = np.zeros((2, DIM))
    a = TurboQuantMSE(DIM, 3, seed=0).quantize(x)
    b = TurboQuantMSE(DIM, 3, seed=1).quantize(x)
    assert all(np.array_equal(a.to_arrays()[k], b.to_arrays()[k]) for k in a.to_arrays())
    assert a != b


def test_repr(kind, codes):
    text = repr(codes)
    name = CODES_TYPES[kind].__name__
    assert text == (f"{name}(n={N}, dim={DIM}, bits={codes.spec.bits}, nbytes={codes.nbytes})")


def test_spec_repr_and_dict(codes):
    spec = codes.spec
    assert spec.to_dict() == {"kind": spec.kind, "dim": DIM, "bits": spec.bits, "seed": 0,
                              "rotation": spec.rotation, "sketch": spec.sketch}
    with pytest.raises(Exception):
        spec.dim = 3                                   # frozen
