"""API fuzzing: every public method and constructor, and the private codec,
given wrong shapes, dtypes, layouts, code widths, lengths, parameters and
thread counts.

Every call either returns the answer the same call gives on a clean
C-contiguous float copy of its input, or raises one of our errors (a
:class:`turboquant.TurboQuantError`); never another exception, never a crash
(CI runs this file under a bounds-checked build). A failed call leaves the
object exactly as it was.

``TURBOQUANT_FUZZ_EXAMPLES`` sets the examples per test (default 25).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turboquant as tq
from kv_model import assert_same_snapshot, snapshot
from turboquant import TurboQuantError
from turboquant.quant._codec import MSECodec, ProdCodec, QJLCodec

EXAMPLES = int(os.environ.get("TURBOQUANT_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DIM = 12
SEEDS = st.integers(0, 2**32 - 1)

# -- strategies ---------------------------------------------------------------------------------
BAD_INTS = st.sampled_from([0, 1, 2, 3, 8, 9, -1, 2**40, 2.0, 1.5, True, None, "4", np.int64(4), np.uint8(3),
                            np.float64(4.0), [4]])
N_THREADS = st.sampled_from([None, 1, 2, -1, -100, 0, 1.5, "2", True, np.int32(2), [1]])
DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int32, np.int8, np.uint64, np.bool_,
                          np.complex128, object, "U4", "S3"])
OUT_DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int64, "float32", "nonsense", object, None, 3])
SHAPES_FOR = {
    "rows": lambda d: [(d,), (3, d), (0, d), (1, d), (5, d)],
    "bad": lambda d: [(), (0,), (d + 1,), (2, d + 1), (2, d - 1), (2, 3, d), (1, 1, 1, d), (3, 0)],
}


@st.composite
def arrays(draw, dim, rows=None):
    """Arrays aimed at a ``(n, dim)`` argument: mostly valid shapes, of every dtype
    and layout, some with NaN, infinity or huge entries; now and then no array at all."""
    if draw(st.integers(0, 15)) == 0:
        return draw(st.sampled_from([None, "text", 3.5, {}, [[1.0, 2.0], [3.0]], object()]))
    shapes = SHAPES_FOR["rows"](dim) if rows is None else [(rows, dim), (dim,)]
    shape = draw(st.sampled_from(shapes) | st.sampled_from(SHAPES_FOR["bad"](dim)))
    shape = tuple(max(size, 0) for size in shape)
    rng = np.random.default_rng(draw(SEEDS))
    base = np.asarray(np.asarray(rng.standard_normal(shape)) * draw(st.sampled_from([1.0, 1e-3, 30.0])))
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "huge"]))
    if base.size and special != "none":
        base.flat[rng.integers(base.size)] = {"nan": np.nan, "inf": -np.inf, "huge": 1e300}[special]
    dtype = draw(DTYPES)
    with np.errstate(all="ignore"):
        array = base.astype(dtype) if dtype is not object else base.astype(object)
    layout = draw(st.sampled_from(["c", "c", "strided", "fortran", "readonly"]))
    if layout == "strided" and array.ndim:
        wide = np.repeat(array, 2, axis=-1)
        array = wide[..., ::2]
    elif layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "readonly":
        array = array.copy()
        array.setflags(write=False)
    return array


def clean(x):
    """The C-contiguous float copy a successful call must agree with."""
    array = np.asarray(x)
    return np.array(array, dtype=np.float32 if array.dtype == np.float32 else np.float64, order="C")


def attempt(call):
    """``(result, None)`` or ``(None, error)`` for one of our errors; anything else propagates."""
    try:
        return call(), None
    except TurboQuantError as error:
        return None, error


def same(a, b):
    if isinstance(a, tq.Codes):
        return a == b
    return np.array_equal(a, b, equal_nan=True) and np.asarray(a).dtype == np.asarray(b).dtype


# -- quantizers ---------------------------------------------------------------------------------
def make_quantizer(kind, seed=0):
    return {"mse": lambda: tq.TurboQuantMSE(DIM, 3, seed=seed, rotation="hadamard"),
            "mse-dense": lambda: tq.TurboQuantMSE(DIM, 2, seed=seed),
            "prod": lambda: tq.TurboQuantProd(DIM, 3, seed=seed, sketch="hadamard"),
            "qjl": lambda: tq.QJL(DIM, seed=seed)}[kind]()


KINDS = ["mse", "mse-dense", "prod", "qjl"]
GOOD_DATA = np.random.default_rng(3).standard_normal((6, DIM))


@FUZZ
@given(dim=BAD_INTS, bits=BAD_INTS, seed=BAD_INTS,
       rotation=st.sampled_from(["dense", "hadamard", "foo", None, 1]),
       sketch=st.sampled_from(["gaussian", "hadamard", "", None]))
def test_quantizer_constructors(dim, bits, seed, rotation, sketch):
    for build in (lambda: tq.TurboQuantMSE(dim, bits, seed=seed, rotation=rotation),
                  lambda: tq.TurboQuantProd(dim, bits, seed=seed, rotation=rotation, sketch=sketch),
                  lambda: tq.QJL(dim, seed=seed, sketch=sketch)):
        quantizer, error = attempt(build)
        if error is None:
            codes = quantizer.quantize(np.ones((2, quantizer.dim)), n_threads=1)
            assert len(codes) == 2 and codes.spec == quantizer.spec


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data(), n_threads=N_THREADS)
def test_quantize(kind, data, n_threads):
    quantizer = make_quantizer(kind)
    x = data.draw(arrays(DIM))
    codes, error = attempt(lambda: quantizer.quantize(x, n_threads=n_threads))
    if error is None:
        assert same(codes, quantizer.quantize(clean(x), n_threads=1))
    assert quantizer.quantize(GOOD_DATA, n_threads=1) == make_quantizer(kind).quantize(GOOD_DATA, n_threads=1)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data(), n_threads=N_THREADS, dtype=OUT_DTYPES)
def test_reads(kind, data, n_threads, dtype):
    quantizer = make_quantizer(kind)
    codes = quantizer.quantize(GOOD_DATA, n_threads=1)
    other = data.draw(st.sampled_from([codes, codes[:0], make_quantizer(kind, seed=1).quantize(GOOD_DATA),
                                       make_quantizer("qjl" if kind != "qjl" else "mse").quantize(GOOD_DATA),
                                       "codes", None, GOOD_DATA]))
    before = codes.to_arrays()
    out, error = attempt(lambda: quantizer.dequantize(other, dtype=dtype, n_threads=n_threads))
    if error is None:
        assert same(out, quantizer.dequantize(other, dtype=np.dtype(dtype), n_threads=1))
    queries = data.draw(arrays(DIM))
    out, error = attempt(lambda: quantizer.inner_products(other, queries, n_threads=n_threads))
    if error is None:
        assert same(out, quantizer.inner_products(other, clean(queries), n_threads=1))
    if isinstance(quantizer, tq.TurboQuantMSE):
        n = len(other) if isinstance(other, tq.Codes) else 6
        weights = data.draw(arrays(n, rows=2))
        out, error = attempt(lambda: quantizer.weighted_sum(other, weights, n_threads=n_threads))
        if error is None:
            assert same(out, quantizer.weighted_sum(other, clean(weights), n_threads=1))
    assert all(np.array_equal(before[k], v) for k, v in codes.to_arrays().items())


# -- codes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mse", "prod", "qjl"])
@FUZZ
@given(data=st.data())
def test_codes_methods(kind, data):
    codes = make_quantizer(kind).quantize(GOOD_DATA, n_threads=1)
    before = codes.to_arrays()
    arrays_in = codes.to_arrays()
    name = data.draw(st.sampled_from(sorted(arrays_in)))
    change = data.draw(st.sampled_from(["none", "width", "rows", "dtype", "ndim", "nan", "negative",
                                        "missing", "extra", "strided", "list"]))
    array = arrays_in[name]
    if change == "width":
        arrays_in[name] = array[:, :-1] if array.ndim == 2 else array[:, None]
    elif change == "rows":
        arrays_in[name] = array[:-1]
    elif change == "dtype":
        arrays_in[name] = array.astype(data.draw(st.sampled_from([np.float64, np.int16, np.uint8, object])))
    elif change == "ndim":
        arrays_in[name] = array[None]
    elif change == "nan" and array.dtype == np.float32:
        arrays_in[name] = np.where(np.arange(array.shape[0]) == 1, np.nan, array).astype(np.float32)
    elif change == "negative" and array.dtype == np.float32:
        arrays_in[name] = -array - 1.0
    elif change == "missing":
        del arrays_in[name]
    elif change == "extra":
        arrays_in["spare"] = array
    elif change == "strided":
        arrays_in[name] = np.repeat(array, 2, axis=0)[::2]
    elif change == "list":
        arrays_in[name] = array.tolist()
    spec = data.draw(st.sampled_from([codes.spec, codes.spec.to_dict(), {"kind": kind}, "spec", None,
                                      dict(codes.spec.to_dict(), bits=99), dict(codes.spec.to_dict(), dim=-3),
                                      dict(codes.spec.to_dict(), rotation="foo")]))
    rebuilt, error = attempt(lambda: type(codes).from_arrays(spec, **arrays_in))
    if error is None:
        assert len(rebuilt) == len(codes)
        harmless = change in ("none", "strided", "list") or (
            change == "dtype" and arrays_in[name].dtype == array.dtype) or (
            change in ("nan", "negative") and array.dtype != np.float32)
        assert harmless, change
    key = data.draw(st.sampled_from([0, -1, 5, 6, -7, 10**12, 1.5, "a", None, True, slice(1, 4),
                                     slice(None, None, -2), [0, 5], [0, 6], [-7], np.arange(6) % 2 == 0,
                                     np.ones(7, dtype=bool), np.array([[0]]), np.array([0.0]), [], [[0, 1]]]))
    part, error = attempt(lambda: codes[key])
    if error is None:
        assert len(part) == len(np.arange(6)[key if not isinstance(key, int) else slice(key % 6, key % 6 + 1)])
    else:
        assert isinstance(error, IndexError)
    count = data.draw(BAD_INTS)
    part, error = attempt(lambda: codes.drop_oldest(count))
    if error is None:
        assert part == codes[int(count):]
    batches = data.draw(st.sampled_from([[codes], [codes, codes[:2]], [], [codes, "x"], None, 3,
                                         [codes, make_quantizer("mse-dense").quantize(GOOD_DATA)]]))
    joined, error = attempt(lambda: tq.Codes.concatenate(batches))
    if error is None:
        assert len(joined) == sum(len(b) for b in batches)
    assert all(np.array_equal(before[k], v) for k, v in codes.to_arrays().items())


# -- the codec ----------------------------------------------------------------------------------
CODECS = {"mse": lambda: MSECodec(DIM, 3, 0, "hadamard"), "mse-dense": lambda: MSECodec(DIM, 4, 0, "dense"),
          "mse-8": lambda: MSECodec(DIM, 8, 0, "dense"),
          "prod": lambda: ProdCodec(DIM, 3, 0, "dense", "gaussian"), "qjl": lambda: QJLCodec(DIM, 0, "hadamard")}


@st.composite
def packed(draw, row_bytes, n):
    """Packed codes of the right or a wrong width, row count, dtype or layout."""
    rows = draw(st.sampled_from([n, n, 0, n + 1, max(n - 1, 0)]))
    width = draw(st.sampled_from([row_bytes, row_bytes, row_bytes - 1, row_bytes + 1, 1, 5 * row_bytes]))
    array = np.random.default_rng(draw(SEEDS)).integers(0, 256, size=(rows, max(width, 0)), dtype=np.uint8)
    change = draw(st.sampled_from(["none", "none", "dtype", "strided", "1d", "list"]))
    if change == "dtype":
        return array.astype(np.int64)
    if change == "strided":
        return np.repeat(array, 2, axis=1)[:, ::2]
    if change == "1d":
        return array.ravel()
    if change == "list":
        return array.tolist()
    return array


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.data(), n=st.integers(0, 4), n_threads=st.sampled_from([1, 2, 0, -1, 1.5, None]))
def test_codec_block_operations(name, data, n, n_threads):
    """Wrong code widths, lengths, norms and blocks go to the kernels' direct callers:
    each call returns or raises our error, and never reads or writes out of bounds."""
    codec = CODECS[name]()
    rows = data.draw(arrays(DIM))
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[1] == DIM and rows.dtype.kind == "f":
        attempt(lambda: codec.quantize(rows, n_threads))
    mse = codec.mse if isinstance(codec, ProdCodec) else codec
    layout = codec.spec.row_layout()
    arrays_in = {}
    for key, (dtype, width) in layout.items():
        if width is None:
            length = data.draw(st.sampled_from([n, n, n + 1, 0]))
            norms = np.abs(np.random.default_rng(n).standard_normal(length)).astype(
                data.draw(st.sampled_from([dtype, dtype, np.float64, np.int32])))
            arrays_in[key] = norms
        else:
            arrays_in[key] = data.draw(packed(width, n))
    dtype = data.draw(OUT_DTYPES)
    attempt(lambda: codec.dequantize(arrays_in, dtype, n_threads))
    attempt(lambda: codec.inner_products(arrays_in, data.draw(arrays(DIM)), n_threads))
    if isinstance(mse, MSECodec) and "indices" in arrays_in:
        indices, norms = arrays_in["indices"], arrays_in["norms"]
        queries = data.draw(arrays(DIM))
        attempt(lambda: mse.decode_rotated(indices, norms, dtype, n_threads))
        attempt(lambda: mse.score_rotated(indices, norms, queries, None, False, n_threads))
        out = data.draw(arrays(n, rows=1))
        attempt(lambda: mse.score_rotated(indices, norms, queries, out, True, n_threads))
        attempt(lambda: mse.weighted_sum(indices, norms, data.draw(arrays(n, rows=2)), n_threads))
        attempt(lambda: mse.attention_operands(indices, norms, data.draw(st.sampled_from([None, n, n + 1]))))
        attempt(lambda: mse.rotate(queries, n_threads))
        attempt(lambda: mse.unrotate(queries, n_threads))
        attempt(lambda: mse.small_rotation(data.draw(BAD_INTS)))


def test_codec_refuses_what_kernels_would_read_out_of_bounds():
    """The two defects this layer closes: a block of another dim under a Hadamard
    rotation, and packed rows narrower than the codes' width."""
    codec = MSECodec(8, 2, 0, "hadamard")
    with pytest.raises(tq.ShapeError, match=r"rows has shape \(3, 64\); expected \(n, 8\)"):
        codec.encode(np.ones((3, 64)), 1)
    wide = MSECodec(64, 3, 0, "dense")
    with pytest.raises(tq.IncompatibleCodesError, match="5 bytes; these codes have 24"):
        wide.decode_rotated(np.zeros((2, 5), dtype=np.uint8), np.ones(2), np.float64, 1)
    with pytest.raises(tq.LengthMismatchError, match="norms has 3 entries"):
        wide.attention_operands(np.zeros((2, 24), dtype=np.uint8), np.ones(3, dtype=np.float32))
    with pytest.raises(tq.ShapeError, match="C-contiguous"):
        wide.score_rotated(np.zeros((4, 48), dtype=np.uint8)[:, ::2], np.ones(4), np.ones((1, 64)))
    with pytest.raises(tq.InvalidParameterError, match="read-only"):
        out = np.zeros((1, 2))
        out.setflags(write=False)
        wide.score_rotated(np.zeros((2, 24), dtype=np.uint8), np.ones(2), np.ones((1, 64)), out, True)


# -- caches -------------------------------------------------------------------------------------
CACHE_CONFIGS = [tq.KVCacheConfig(DIM, key_bits=3, value_bits=2),
                 tq.KVCacheConfig(DIM, key_strategy="prod", sink_tokens=1, residual_tokens=2, max_tokens=6),
                 tq.KVCacheConfig(DIM, key_bits=5, outlier_channels=2, center_keys=True, rotation="hadamard")]
QUERY = np.random.default_rng(5).standard_normal((2, DIM))
SCALES = st.sampled_from([None, 0.5, -2.0, 3, np.float32(0.1), np.nan, np.inf, True, "1", [1.0], 1j])


@FUZZ
@given(dim=BAD_INTS, key_bits=BAD_INTS, value_bits=BAD_INTS, tokens=BAD_INTS,
       strategy=st.sampled_from(["mse", "prod", "PROD", "foo", None]),
       outliers=st.sampled_from([0, 2, 3, (0, 1), (1, 1), (0, 99), [2, 3], -1, "2"]),
       center=st.sampled_from([False, True, 1, "yes", np.bool_(True)]), heads=BAD_INTS, query_heads=BAD_INTS)
def test_cache_configs_and_constructors(dim, key_bits, value_bits, tokens, strategy, outliers, center, heads,
                                        query_heads):
    config, error = attempt(lambda: tq.KVCacheConfig(dim, key_bits=key_bits, value_bits=value_bits,
                                                     key_strategy=strategy, max_tokens=tokens,
                                                     outlier_channels=outliers, center_keys=center))
    if error is None:
        cache, error = attempt(lambda: tq.QuantizedKVCache(config))
    if error is None:
        cache.append(np.ones((3, config.dim)), np.ones((3, config.dim)), n_threads=1)
        assert len(cache) == (min(3, config.max_tokens) if config.max_tokens else 3)
        multi, error = attempt(lambda: tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, config, query_heads)))
        if error is None:
            assert multi.num_query_heads % multi.num_heads == 0
    for bad in (None, "config", {"dim": 4}):
        assert attempt(lambda: tq.QuantizedKVCache(bad))[1] is not None
        assert attempt(lambda: tq.MultiHeadKVCache(bad))[1] is not None


def filled_cache(index):
    cache = tq.QuantizedKVCache(CACHE_CONFIGS[index])
    rng = np.random.default_rng(index)
    cache.append(rng.standard_normal((5, DIM)), rng.standard_normal((5, DIM)), n_threads=1)
    return cache


@pytest.mark.parametrize("index", range(len(CACHE_CONFIGS)))
@FUZZ
@given(data=st.data(), n_threads=N_THREADS)
def test_cache_writes(index, data, n_threads):
    cache, twin = filled_cache(index), filled_cache(index)
    keys, values = data.draw(arrays(DIM)), data.draw(arrays(DIM))
    for method in ("append", "push_token"):
        before = snapshot(cache, QUERY)
        _, error = attempt(lambda: getattr(cache, method)(keys, values, n_threads=n_threads))
        if error is None:                      # the clean copies must give the same cache
            getattr(twin, method)(clean(keys), clean(values), n_threads=1)
        else:
            assert_same_snapshot(before, snapshot(cache, QUERY))
    assert_same_snapshot(snapshot(twin, QUERY), snapshot(cache, QUERY))


@pytest.mark.parametrize("index", range(len(CACHE_CONFIGS)))
@FUZZ
@given(data=st.data(), n_threads=N_THREADS, scale=SCALES, dtype=OUT_DTYPES)
def test_cache_reads(index, data, n_threads, scale, dtype):
    cache = filled_cache(index)
    before = snapshot(cache, QUERY)
    query = data.draw(arrays(DIM))
    for method in ("attention_scores", "attention_weights", "attention_output"):
        args = () if method == "attention_scores" else (scale,)
        out, error = attempt(lambda: getattr(cache, method)(query, *args, n_threads=n_threads))
        if error is None:
            assert same(out, getattr(cache, method)(clean(query), *args, n_threads=1))
    for method in ("reconstruct_keys", "reconstruct_values"):
        out, error = attempt(lambda: getattr(cache, method)(dtype=dtype, n_threads=n_threads))
        if error is None:
            assert out.shape == (len(cache), DIM)
    assert_same_snapshot(before, snapshot(cache, QUERY))


@FUZZ
@given(data=st.data(), n_threads=N_THREADS, scale=SCALES)
def test_multi_head_cache(data, n_threads, scale):
    heads, query_heads = 2, 4
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, CACHE_CONFIGS[0], query_heads))
    rng = np.random.default_rng(1)
    cache.append_all(rng.standard_normal((heads, 4, DIM)), rng.standard_normal((heads, 4, DIM)), n_threads=1)
    reference = cache.attention_output_all(rng.standard_normal((query_heads, DIM)).astype(np.float32))

    def state():
        return [snapshot(head, QUERY) for head in cache.heads]

    block = data.draw(st.sampled_from([(heads, 3, DIM), (heads, DIM), (heads + 1, 3, DIM), (heads, 3, DIM + 1),
                                       (query_heads, DIM), (query_heads, 2, DIM), (query_heads, 0, DIM),
                                       (heads, 0, DIM), (query_heads,), ()]))
    rng = np.random.default_rng(data.draw(SEEDS))
    blocks = [rng.standard_normal(block).astype(data.draw(DTYPES)) for _ in range(2)]
    if data.draw(st.booleans()) and blocks[0].size:
        blocks[1] = blocks[1].astype(np.float64)
        blocks[1].flat[0] = np.nan
    if data.draw(st.booleans()) and blocks[0].ndim:
        blocks[0] = list(blocks[0])
    before = state()
    for call in (lambda: cache.append_all(*blocks, n_threads=n_threads),
                 lambda: cache.push_token_all(*blocks, n_threads=n_threads)):
        _, error = attempt(call)
        if error is not None:
            for b, a in zip(before, state()):
                assert_same_snapshot(b, a)
        before = state()
    for call in (lambda: cache.attention_scores_all(blocks[0], n_threads=n_threads),
                 lambda: cache.attention_output_all(blocks[0], scale, n_threads=n_threads),
                 lambda: cache.concat_outputs(blocks[0]),
                 lambda: cache.reconstruct_keys_all(dtype=data.draw(OUT_DTYPES), n_threads=n_threads),
                 lambda: cache.head(data.draw(BAD_INTS))):
        try:
            call()
        except TurboQuantError:
            pass
        except IndexError as error:
            assert isinstance(error, TurboQuantError)
    for b, a in zip(before, state()):
        assert_same_snapshot(b, a)
    assert reference.shape == (query_heads, DIM)
