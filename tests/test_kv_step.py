"""``MultiHeadKVCache.step``: one call for a decode step of a whole layer.

``step(keys, values, queries)`` must be exactly ``push_token_all(keys, values)``
followed by ``attention_output_all(queries)``: the same outputs (to float32
rounding; in practice the same bits) and the same cache state afterwards
(token counts, codes, stats, reconstructions), over every kind of
configuration, whether it takes the fast path (one encode kernel call over the
heads, one fused attention call) or the per-head one. A failed step leaves
every head unchanged. The multi-head kernels behind the fast path
(``_core.rotate_heads``, ``_core.quantize_heads``) are checked against the
single-head kernels they replay, bit for bit.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turboquant as tq
from turboquant._kernels import _core
from turboquant.kv._cache import MultiHeadKVCache
from turboquant.kv._head_codecs import HeadCodecs
from turboquant.quant._codec import BlockMSECodec, MSECodec

AVAILABLE = _core._kernel_variants()


# -- helpers ---------------------------------------------------------------------------------------
def layer(config, heads=2, group=2):
    return tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, config, num_query_heads=heads * group))


def pair(config, heads=2, group=2, prompt=0, seed=0, dtype=np.float32):
    """Two equal caches holding ``prompt`` random tokens."""
    a, b = layer(config, heads, group), layer(config, heads, group)
    if prompt:
        rng = np.random.default_rng(seed)
        keys = (rng.standard_normal((heads, prompt, config.dim)) + 0.5).astype(dtype)
        values = rng.standard_normal((heads, prompt, config.dim)).astype(dtype)
        a.append_all(keys, values)
        b.append_all(keys, values)
    return a, b


def token(cache, rng, m=None, dtype=np.float32):
    d = cache.head_dim
    keys = (rng.standard_normal((cache.num_heads, d)) + 0.5).astype(dtype)
    values = rng.standard_normal((cache.num_heads, d)).astype(dtype)
    shape = (cache.num_query_heads, d) if m is None else (cache.num_query_heads, m, d)
    return keys, values, rng.standard_normal(shape).astype(dtype)


def state(cache):
    """Everything observable about a cache's content."""
    heads = []
    for head in cache.heads:
        codes = [None if c is None else {k: v.copy() for k, v in c.to_arrays().items()}
                 for c in head.quantized_codes()]
        heads.append(dict(
            tokens=head.num_tokens, codes=codes, stats=head.stats(),
            sinks={k: v.copy() for k, v in head._sinks.views().items()},
            recent={k: v.copy() for k, v in head._recent.views().items()},
            center=None if head.key_center is None else head.key_center.copy(),
            channels=None if head.outlier_channels is None else head.outlier_channels.copy(),
            keys=head.reconstruct_keys(), values=head.reconstruct_values()))
    return dict(tokens=cache.num_tokens, stats=cache.stats(), heads=heads)


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert sa["tokens"] == sb["tokens"]
    assert sa["stats"] == sb["stats"]
    for ha, hb in zip(sa["heads"], sb["heads"]):
        assert ha["tokens"] == hb["tokens"] and ha["stats"] == hb["stats"]
        for ca, cb in zip(ha["codes"], hb["codes"]):
            assert (ca is None) == (cb is None)
            if ca is not None:
                assert ca.keys() == cb.keys()
                for name in ca:
                    np.testing.assert_array_equal(ca[name], cb[name], err_msg=name)
        for region in ("sinks", "recent"):
            for name in ("k", "v"):
                np.testing.assert_array_equal(ha[region][name], hb[region][name])
                assert ha[region][name].dtype == hb[region][name].dtype
        for name in ("center", "channels", "keys", "values"):
            if ha[name] is None or hb[name] is None:
                assert ha[name] is None and hb[name] is None, name
            else:
                np.testing.assert_array_equal(ha[name], hb[name], err_msg=name)


def assert_outputs_close(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    atol = 1e-6 * max(1.0, float(np.abs(expected).max())) if expected.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=1e-6 if expected.dtype == np.float32 else 1e-12, atol=atol)


def run_both(a, b, steps, rng, m=None, dtype=np.float32, scale=None, n_threads=None):
    for _ in range(steps):
        keys, values, queries = token(a, rng, m, dtype)
        got = a.step(keys, values, queries, scale, n_threads=n_threads)
        b.push_token_all(keys, values, n_threads=n_threads)
        expected = b.attention_output_all(queries, scale, n_threads=n_threads)
        assert_outputs_close(got, expected)
    assert_same_state(a, b)


@pytest.fixture
def fast_steps(monkeypatch):
    """The number of steps that took the fast path."""
    taken = []
    original = MultiHeadKVCache._fast_step

    def spy(self, *args):
        out = original(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(MultiHeadKVCache, "_fast_step", spy)
    return taken


# -- step equals push + attention -------------------------------------------------------------------
CONFIGS = {
    "default": dict(),
    "1-bit": dict(key_bits=1, value_bits=1),
    "2/3 bits": dict(key_bits=2, value_bits=3),
    "hadamard": dict(rotation="hadamard"),
    "block": dict(block_scales=True),
    "block 1-bit hadamard": dict(block_scales=True, key_bits=1, value_bits=2, rotation="hadamard"),
    "center": dict(center_keys=True),
    "window": dict(residual_tokens=4),
    "window f16 center": dict(residual_tokens=5, residual_dtype="float16", center_keys=True),
    "sinks window": dict(sink_tokens=2, residual_tokens=3),
    "sinks evict": dict(sink_tokens=3, max_tokens=12),
    "evict": dict(max_tokens=9),
    "window evict": dict(residual_tokens=4, max_tokens=11, block_scales=True, center_keys=True),
    "window evict hadamard": dict(residual_tokens=3, max_tokens=7, rotation="hadamard",
                                  residual_dtype="float16"),
    "5/6 bits": dict(key_bits=5, value_bits=6),
    "8 bits": dict(key_bits=8, value_bits=8, residual_tokens=2),
    "outliers": dict(outlier_channels=4, residual_tokens=2),
    "explicit outliers": dict(outlier_channels=(0, 5, 7), center_keys=True),
    "prod": dict(key_strategy="prod", key_bits=3),
    "balanced": "balanced",
    "compact": "compact",
    "lossless": "lossless",
}


def make_config(options, dim):
    if isinstance(options, str):
        return tq.KVCacheConfig.preset(options, dim)
    return tq.KVCacheConfig(dim, **options)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt", [0, 1, 6, 40])
def test_step_equals_push_then_attention(name, prompt):
    config = make_config(CONFIGS[name], 24)
    a, b = pair(config, heads=3, group=2, prompt=prompt, seed=prompt)
    run_both(a, b, 14, np.random.default_rng(7))


@pytest.mark.parametrize("name", ["default", "window evict", "balanced", "hadamard", "sinks window"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("m", [None, 1, 5])
def test_grouped_queries_and_query_blocks(name, group, m):
    config = make_config(CONFIGS[name], 32)
    a, b = pair(config, heads=2, group=group, prompt=20)
    run_both(a, b, 6, np.random.default_rng(group), m=m)


@pytest.mark.parametrize("dim", [2, 16, 97, 101, 128])
@pytest.mark.parametrize("name", ["default", "hadamard", "block", "block 1-bit hadamard", "window f16 center"])
def test_odd_dims(dim, name):
    options = CONFIGS[name]
    if dim < 16 and options.get("block_scales"):
        options = dict(options, block_scales=False)
    a, b = pair(make_config(options, dim), heads=2, group=2, prompt=10)
    run_both(a, b, 5, np.random.default_rng(dim))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
@pytest.mark.parametrize("name", ["default", "balanced"])
def test_other_dtypes_follow_the_per_head_path(dtype, name):
    a, b = pair(make_config(CONFIGS[name], 16), prompt=8, dtype=np.float32)
    rng = np.random.default_rng(3)
    for _ in range(4):
        keys, values, queries = (x * 4 for x in token(a, rng))
        keys, values, queries = keys.astype(dtype), values.astype(dtype), queries.astype(dtype)
        got = a.step(keys, values, queries)
        b.push_token_all(keys, values)
        assert_outputs_close(got, b.attention_output_all(queries))
    assert_same_state(a, b)


def test_mixed_dtypes():
    a, b = pair(tq.KVCacheConfig(16, residual_tokens=2), prompt=5)
    rng = np.random.default_rng(4)
    for dtypes in [(np.float32, np.float64, np.float32), (np.float64, np.float32, np.float32),
                   (np.float32, np.float32, np.float64)]:
        keys, values, queries = (x.astype(t) for x, t in zip(token(a, rng), dtypes))
        got = a.step(keys, values, queries)
        b.push_token_all(keys, values)
        assert_outputs_close(got, b.attention_output_all(queries))
    assert_same_state(a, b)


@pytest.mark.parametrize("scale", [0.05, 1, np.float32(0.3), 2.5])
def test_scale(scale):
    a, b = pair(tq.KVCacheConfig.preset("balanced", 16), prompt=40)
    run_both(a, b, 3, np.random.default_rng(5), scale=scale)


@pytest.mark.parametrize("variant", AVAILABLE)
@pytest.mark.parametrize("name", ["default", "hadamard", "balanced", "block 1-bit hadamard"])
def test_kernel_variants(variant, name):
    with _core._use_kernel_variant(variant):
        a, b = pair(make_config(CONFIGS[name], 40), heads=3, prompt=37)
        run_both(a, b, 4, np.random.default_rng(6))


@pytest.mark.parametrize("name", ["default", "hadamard", "balanced", "compact"])
def test_results_do_not_depend_on_the_thread_count(name):
    config = make_config(CONFIGS[name], 64)
    caches = [pair(config, heads=4, prompt=300)[0] for _ in range(2)]
    rng = np.random.default_rng(8)
    for _ in range(3):
        keys, values, queries = token(caches[0], rng)
        one = caches[0].step(keys, values, queries, n_threads=1)
        every = caches[1].step(keys, values, queries, n_threads=-1)
        np.testing.assert_array_equal(one, every)
    assert_same_state(*caches)


def test_presets_and_default_take_the_fast_path(fast_steps):
    for name in ["default", "balanced", "compact", "lossless", "5/6 bits", "hadamard", "window evict",
                 "sinks evict"]:
        a, b = pair(make_config(CONFIGS[name], 32), heads=2, group=4, prompt=50)
        fast_steps.clear()
        run_both(a, b, 4, np.random.default_rng(9))
        assert all(fast_steps) and len(fast_steps) == 4, name


def test_keys_of_several_coded_parts_take_the_per_head_path(fast_steps):
    for name in ["outliers", "explicit outliers", "prod"]:
        a, b = pair(make_config(CONFIGS[name], 32), prompt=10)
        fast_steps.clear()
        run_both(a, b, 2, np.random.default_rng(10))
        assert not any(fast_steps), name


def test_first_steps_take_the_per_head_path_then_the_fast_one(fast_steps):
    # Sinks fill first and the window holds every token: nothing is coded yet.
    a, b = pair(tq.KVCacheConfig(16, sink_tokens=2, residual_tokens=3, center_keys=True))
    run_both(a, b, 8, np.random.default_rng(11))
    assert fast_steps == [False] * 5 + [True] * 3


def test_step_after_truncate_clear_and_copy():
    config = tq.KVCacheConfig(16, residual_tokens=4, max_tokens=20, center_keys=True, block_scales=True)
    a, b = pair(config, prompt=30)
    rng = np.random.default_rng(12)
    run_both(a, b, 3, rng)
    for cache in (a, b):
        cache.truncate(12)
    run_both(a, b, 6, rng)
    c, d = a.copy(), b.copy()
    run_both(c, d, 4, rng)
    for cache in (a, b):
        cache.clear()
    run_both(a, b, 7, rng)


def test_outputs_of_a_2d_and_a_3d_query_block_agree():
    a, b = pair(tq.KVCacheConfig.preset("balanced", 16), prompt=40)
    rng = np.random.default_rng(14)
    keys, values, queries = token(a, rng)
    np.testing.assert_array_equal(a.step(keys, values, queries), b.step(keys, values, queries[:, None, :])[:, 0])


# -- Hypothesis: random configurations and histories ---------------------------------------------------
@st.composite
def configs(draw):
    dim = draw(st.sampled_from([8, 16, 20, 33]))
    block = draw(st.booleans()) and dim >= 16
    options = dict(
        key_bits=draw(st.integers(1, 4 if block else 6)), value_bits=draw(st.integers(1, 4 if block else 5)),
        block_scales=block, center_keys=draw(st.booleans()),
        residual_tokens=draw(st.sampled_from([0, 0, 1, 3, 8])),
        sink_tokens=draw(st.sampled_from([0, 0, 1, 4])),
        rotation=draw(st.sampled_from(["dense", "hadamard"])),
        residual_dtype=draw(st.sampled_from(["float32", "float16"])))
    max_tokens = draw(st.sampled_from([0, 0, 6, 17]))
    if max_tokens > options["sink_tokens"]:
        options["max_tokens"] = max_tokens
    if not block and draw(st.integers(0, 5)) == 0:
        options["outlier_channels"] = 2
    return tq.KVCacheConfig(dim, **options)


ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("append"), st.integers(0, 9)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("clear"), st.just(0))), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), heads=st.integers(1, 3), group=st.integers(1, 3), m=st.sampled_from([None, 2]),
       actions=ACTIONS, seed=st.integers(0, 2**16))
def test_random_histories(config, heads, group, m, actions, seed):
    a, b = pair(config, heads=heads, group=group)
    rng = np.random.default_rng(seed)
    for action, amount in actions:
        if action == "step":
            run_both(a, b, amount, rng, m=m)
        elif action == "append":
            keys = rng.standard_normal((heads, amount, config.dim)) + 0.5
            values = rng.standard_normal((heads, amount, config.dim))
            a.append_all(keys, values)
            b.append_all(keys, values)
        elif action == "truncate":
            keep = int(amount * a.num_tokens)
            a.truncate(keep)
            b.truncate(keep)
        else:
            a.clear()
            b.clear()
    assert_same_state(a, b)


# -- bad input leaves every head unchanged -----------------------------------------------------------
def bad_inputs(cache):
    h, q, d = cache.num_heads, cache.num_query_heads, cache.head_dim
    rng = np.random.default_rng(0)
    good = token(cache, rng)
    nan = good[0].copy()
    nan[1, 3] = np.nan
    inf = good[1].copy()
    inf[0, 0] = np.inf
    bad_q = good[2].copy()
    bad_q[-1, -1] = np.nan
    big = good[0].astype(np.float64)
    big[1, 0] = 1e39
    f16 = good[1].copy()
    f16[1, 2] = 7e4
    return [
        ((good[0][:, :-1], good[1], good[2]), {}, tq.ShapeError),
        ((good[0][:1], good[1], good[2]), {}, tq.LengthMismatchError),
        ((good[0][None], good[1], good[2]), {}, tq.ShapeError),
        ((good[0], good[1][:, None], good[2]), {}, tq.ShapeError),
        ((good[0], good[1], good[2][:-1]), {}, tq.ShapeError),
        ((good[0], good[1], good[2][:, :-1]), {}, tq.ShapeError),
        ((good[0], good[1], good[2][0]), {}, tq.ShapeError),
        ((good[0], good[1], good[2][:, None, None]), {}, tq.ShapeError),
        ((good[0].astype(complex), good[1], good[2]), {}, tq.DTypeError),
        ((good[0], np.full((h, d), "x"), good[2]), {}, tq.DTypeError),
        ((good[0], good[1], good[2].astype(object)), {}, tq.DTypeError),
        ((nan, good[1], good[2]), {}, tq.NonFiniteError),
        ((good[0], inf, good[2]), {}, tq.NonFiniteError),
        ((good[0], good[1], bad_q), {}, tq.NonFiniteError),
        ((big, good[1], good[2]), {}, tq.NonFiniteError),
        ((good[0], good[1], good[2], float("nan")), {}, tq.NonFiniteError),
        ((good[0], good[1], good[2], "big"), {}, tq.InvalidParameterError),
        ((good[0], good[1], good[2], True), {}, tq.InvalidParameterError),
        ((good[0], good[1], good[2]), dict(n_threads=0), tq.InvalidParameterError),
        ((good[0], good[1], good[2]), dict(n_threads=1.5), tq.InvalidParameterError),
        (([[1.0] * d] * (h - 1) + [[1.0] * (d - 1)], good[1], good[2]), {}, tq.ShapeError),
    ], (f16, (good[0], f16, good[2]))


@pytest.mark.parametrize("name", ["default", "balanced", "window evict", "outliers", "prod", "sinks window"])
def test_bad_inputs_leave_every_head_unchanged(name):
    config = make_config(CONFIGS[name], 16)
    cache, reference = pair(config, heads=2, group=2, prompt=20)
    cases, (_, f16_args) = bad_inputs(cache)
    if config.residual_dtype == "float16":
        cases.append((f16_args, {}, tq.NonFiniteError))
    for args, kwargs, error in cases:
        with pytest.raises(error):
            cache.step(*args, **kwargs)
        assert_same_state(cache, reference)
    # And it still steps like the reference.
    run_both(cache, reference, 2, np.random.default_rng(15))


def test_errors_are_value_and_type_errors():
    cache = layer(tq.KVCacheConfig(8))
    with pytest.raises(ValueError):
        cache.step(np.zeros((2, 7)), np.zeros((2, 8)), np.zeros((4, 8)))
    with pytest.raises(TypeError):
        cache.step(np.zeros((2, 8), dtype=complex), np.zeros((2, 8)), np.zeros((4, 8)))
    assert cache.num_tokens == 0


def test_a_coded_row_beyond_float16_rms_fails_before_anything_changes():
    # Block-scaled codes store the rms as float16: the row leaving the window
    # cannot be coded, so the step fails and no head changes.
    config = tq.KVCacheConfig(16, block_scales=True, residual_tokens=1)
    cache, reference = pair(config, heads=2, prompt=3)
    rng = np.random.default_rng(16)
    keys, values, queries = token(cache, rng)
    keys[1] *= 1e5
    for c in (cache, reference):
        c.push_token_all(keys, values)
    keys, values, queries = token(cache, rng)
    with pytest.raises(tq.NonFiniteError):
        cache.step(keys, values, queries)
    with pytest.raises(tq.NonFiniteError):
        reference.push_token_all(keys, values)
    assert_same_state(cache, reference)


def test_empty_layer_steps():
    a, b = pair(tq.KVCacheConfig(8), heads=1, group=1)
    run_both(a, b, 3, np.random.default_rng(17))


# -- the multi-head kernels against the single-head ones ------------------------------------------------
def codecs(kind, dim, bits, rotation, heads):
    cls = BlockMSECodec if kind == "block" else MSECodec
    return [cls(dim, bits, 100 + 7 * h, rotation) for h in range(heads)]


@pytest.mark.parametrize("variant", AVAILABLE)
@pytest.mark.parametrize("dim", [2, 3, 16, 97, 101, 128])
@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_rotate_heads_matches_the_single_head_rotation(variant, dim, rotation, m):
    heads = 3
    side = HeadCodecs.of(codecs("mse", dim, 2, rotation, heads), "")
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((heads, m, dim)).astype(np.float32)
    with _core._use_kernel_variant(variant):
        assert rotation == "hadamard" or side.rotates_in_kernel(m)
        forward = side.rotate(x, 2)
        backward = side.rotate(x, 2, inverse=True)
        for h, codec in enumerate(codecs("mse", dim, 2, rotation, heads)):
            np.testing.assert_array_equal(forward[h], codec.rotate(x[h], 1))
            np.testing.assert_array_equal(backward[h], codec.unrotate(x[h], 1))


# Block-scaled codes need 16 or more coordinates and have 1..4 bits.
ENCODE_CASES = ([("mse", dim, bits) for dim in (2, 16, 97, 128) for bits in (1, 2, 3, 4, 5, 8)]
                + [("block", dim, bits) for dim in (16, 97, 128) for bits in (1, 2, 3, 4)])


@pytest.mark.parametrize("variant", AVAILABLE)
@pytest.mark.parametrize(("kind", "dim", "bits"), ENCODE_CASES)
@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
def test_encode_matches_each_heads_codec(variant, kind, dim, rotation, bits):
    heads = 4
    # The constructor, not HeadCodecs.of: the encode kernels take codes of any width.
    side = HeadCodecs(codecs(kind, dim, bits, rotation, heads), "p.")
    rng = np.random.default_rng(bits)
    rows = (rng.standard_normal((heads, dim)) * rng.uniform(0.1, 10, (heads, 1))).astype(np.float32)
    rows[-1] = 0.0
    with _core._use_kernel_variant(variant):
        arrays = side.encode(rows, 2, "rows")
        for h, codec in enumerate(codecs(kind, dim, bits, rotation, heads)):
            expected = codec.quantize(rows[h:h + 1], 1)
            assert sorted(arrays) == sorted("p." + name for name in expected)
            for name, array in expected.items():
                assert arrays["p." + name].dtype == array.dtype
                np.testing.assert_array_equal(arrays["p." + name][h], array[0], err_msg=name)


def test_multi_head_kernels_check_their_operands():
    x = np.zeros((2, 1, 8), dtype=np.float32)
    operand = np.eye(8, dtype=np.float32)
    addresses = np.array([operand.ctypes.data] * 2, dtype=np.uintp)
    with pytest.raises(ValueError):
        _core.rotate_heads(x, addresses[:1], 0, 0, False, np.empty_like(x), 1)
    with pytest.raises(ValueError):
        _core.rotate_heads(x, addresses, 0, 0, False, np.empty((2, 2, 8), dtype=np.float32), 1)
    with pytest.raises(ValueError):
        _core.rotate_heads(x, addresses, 2, 6, False, np.empty_like(x), 1)
    boundaries = np.array([-0.5, 0.0, 0.5])
    centroids = np.array([-0.75, -0.25, 0.25, 0.75])
    with pytest.raises(ValueError):
        _core.quantize_heads(x, addresses, 0, 0, boundaries, centroids, 2, np.empty((2, 1)),
                             np.empty((2, 1, 3), dtype=np.uint8), 1)
    with pytest.raises(ValueError):
        _core.quantize_heads(x, addresses, 0, 0, boundaries, centroids, 3, np.empty((2, 1)),
                             np.empty((2, 1, 3), dtype=np.uint8), 1)
