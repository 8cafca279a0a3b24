"""``BatchedMultiHeadKVCache``: one layer's caches for every row of a batch, rows of any lengths.

Every row must behave exactly like a :class:`MultiHeadKVCache` of its own fed
the same tokens: ``append_all`` with per-row lengths, ``append_row``, and
``step`` (one call for every row; one fused kernel call when the rows differ
only in their coded lengths). Bad input changes no row.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turboquant as tq
from test_kv_step import CONFIGS, assert_outputs_close, assert_same_state, make_config
from turboquant._kernels import _core

AVAILABLE = _core._kernel_variants()


def batch_and_rows(config, batch, heads=2, group=2):
    mc = tq.MultiHeadConfig(heads, config, num_query_heads=heads * group)
    return tq.BatchedMultiHeadKVCache(mc, batch), [tq.MultiHeadKVCache(mc) for _ in range(batch)]


def fill(batched, rows, lengths, rng, dtype=np.float32):
    n = max(lengths) if lengths else 0
    shape = (batched.batch_size, batched.num_heads, n, batched.head_dim)
    keys = (rng.standard_normal(shape) + 0.5).astype(dtype)
    values = rng.standard_normal(shape).astype(dtype)
    keys[:, :, :, 0] += np.arange(n)       # padding differs from real tokens
    batched.append_all(keys, values, lengths=lengths)
    for row, k, v, count in zip(rows, keys, values, lengths):
        row.append_all(k[:, :count], v[:, :count])


def step_both(batched, rows, steps, rng, m=None, dtype=np.float32, n_threads=None):
    b, h, q, d = batched.batch_size, batched.num_heads, batched.num_query_heads, batched.head_dim
    for _ in range(steps):
        keys = (rng.standard_normal((b, h, d)) + 0.5).astype(dtype)
        values = rng.standard_normal((b, h, d)).astype(dtype)
        queries = rng.standard_normal((b, q, d) if m is None else (b, q, m, d)).astype(dtype)
        got = batched.step(keys, values, queries, n_threads=n_threads)
        expected = np.stack([row.step(k, v, x, n_threads=n_threads)
                             for row, k, v, x in zip(rows, keys, values, queries)])
        assert_outputs_close(got, expected)
    assert_rows_equal(batched, rows)


def assert_rows_equal(batched, rows):
    assert batched.lengths == tuple(row.num_tokens for row in rows)
    for mine, theirs in zip(batched.rows, rows):
        assert_same_state(mine, theirs)


@pytest.fixture
def ragged_calls(monkeypatch):
    """Kernel calls made by steps: ("heads" | "ragged", number of heads)."""
    calls = []
    for name in ("small_code_attention_heads", "small_code_attention_ragged"):
        original = getattr(_core, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name.rsplit("_", 1)[1], args[0].shape[0]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(_core, name, spy)
    return calls


@pytest.mark.parametrize("name", ["default", "1-bit", "hadamard", "block", "window f16 center", "sinks window",
                                  "window evict", "window evict hadamard", "sinks evict", "balanced", "compact",
                                  "5/6 bits", "outliers", "prod"])
@pytest.mark.parametrize("lengths", [[0, 0, 0], [3, 3, 3], [40, 7, 19], [1, 60, 0]])
def test_ragged_batch_equals_rows(name, lengths):
    batched, rows = batch_and_rows(make_config(CONFIGS[name], 24), 3)
    rng = np.random.default_rng(sum(lengths))
    fill(batched, rows, lengths, rng)
    assert batched.lengths == tuple(row.num_tokens for row in rows)
    step_both(batched, rows, 9, rng)


@pytest.mark.parametrize("name", ["default", "balanced", "hadamard"])
@pytest.mark.parametrize("m", [None, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_query_blocks_and_groups(name, m, group):
    batched, rows = batch_and_rows(make_config(CONFIGS[name], 32), 2, heads=2, group=group)
    rng = np.random.default_rng(group)
    fill(batched, rows, [50, 37], rng)
    step_both(batched, rows, 4, rng, m=m)


def test_one_ragged_kernel_call_for_every_row(ragged_calls):
    batched, rows = batch_and_rows(tq.KVCacheConfig.preset("balanced", 16), 4, heads=3)
    rng = np.random.default_rng(1)
    fill(batched, rows, [40, 90, 33, 64], rng)
    ragged_calls.clear()
    b, h, q, d = 4, 3, 6, 16
    batched.step(rng.standard_normal((b, h, d), dtype=np.float32), rng.standard_normal((b, h, d), dtype=np.float32),
                 rng.standard_normal((b, q, d), dtype=np.float32))
    assert ragged_calls == [("ragged", b * h)]


def test_equal_lengths_use_the_multi_head_kernel(ragged_calls):
    batched, rows = batch_and_rows(tq.KVCacheConfig(16), 3)
    rng = np.random.default_rng(2)
    fill(batched, rows, [20, 20, 20], rng)
    ragged_calls.clear()
    step_both(batched, rows, 1, rng)
    assert ragged_calls[0] == ("heads", 6)


def test_rows_with_unequal_windows_step_row_by_row():
    # Row 1 has fewer tokens than the window holds: rows step one at a time, alike.
    batched, rows = batch_and_rows(tq.KVCacheConfig(16, residual_tokens=8, block_scales=True), 2)
    rng = np.random.default_rng(3)
    fill(batched, rows, [30, 2], rng)
    step_both(batched, rows, 10, rng)


@pytest.mark.parametrize("variant", AVAILABLE)
def test_kernel_variants(variant):
    with _core._use_kernel_variant(variant):
        batched, rows = batch_and_rows(tq.KVCacheConfig.preset("compact", 40), 3)
        rng = np.random.default_rng(4)
        fill(batched, rows, [45, 80, 33], rng)
        step_both(batched, rows, 3, rng)


def test_results_do_not_depend_on_the_thread_count():
    config = tq.KVCacheConfig.preset("balanced", 64)
    caches = [batch_and_rows(config, 3, heads=4)[0] for _ in range(2)]
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((3, 4, 300, 64)) + 0.5
    values = rng.standard_normal((3, 4, 300, 64))
    for cache in caches:
        cache.append_all(keys, values, lengths=[300, 120, 257])
    for _ in range(3):
        k, v = rng.standard_normal((3, 4, 64), dtype=np.float32), rng.standard_normal((3, 4, 64), dtype=np.float32)
        q = rng.standard_normal((3, 8, 64), dtype=np.float32)
        np.testing.assert_array_equal(caches[0].step(k, v, q, n_threads=1), caches[1].step(k, v, q, n_threads=-1))


def test_append_row_changes_one_row():
    batched, rows = batch_and_rows(tq.KVCacheConfig(16, residual_tokens=2), 3)
    rng = np.random.default_rng(6)
    fill(batched, rows, [5, 5, 5], rng)
    keys, values = rng.standard_normal((2, 7, 16)), rng.standard_normal((2, 7, 16))
    batched.append_row(1, keys, values)
    rows[1].append_all(keys, values)
    assert batched.lengths == (5, 12, 5)
    assert_rows_equal(batched, rows)
    step_both(batched, rows, 4, rng)
    with pytest.raises(tq.IndexOutOfRangeError):
        batched.append_row(3, keys, values)
    with pytest.raises(tq.NonFiniteError):
        batched.append_row(0, np.full((2, 1, 16), np.nan), values[:, :1])
    assert_rows_equal(batched, rows)


def test_copy_and_clear():
    batched, rows = batch_and_rows(tq.KVCacheConfig.preset("balanced", 16), 2)
    rng = np.random.default_rng(7)
    fill(batched, rows, [40, 36], rng)
    copied = batched.copy()
    step_both(batched, rows, 2, rng)
    assert copied.lengths == (40, 36)
    copied_rows = [row.copy() for row in copied.rows]
    step_both(copied, copied_rows, 2, rng)
    batched.clear()
    assert batched.lengths == (0, 0)
    for row in rows:
        row.clear()
    step_both(batched, rows, 3, rng)


def test_properties_and_repr():
    batched, _ = batch_and_rows(tq.KVCacheConfig(8), 3, heads=2, group=3)
    assert (batched.batch_size, len(batched), batched.num_heads, batched.num_query_heads, batched.head_dim) == (
        3, 3, 2, 6, 8)
    assert batched.row(2) is batched.rows[2]
    assert "batch_size=3" in repr(batched) and "lengths=[0, 0, 0]" in repr(batched)
    assert len(batched.stats()) == 3
    with pytest.raises(tq.IndexOutOfRangeError):
        batched.row(-1)
    with pytest.raises(tq.InvalidParameterError):
        tq.BatchedMultiHeadKVCache(tq.MultiHeadConfig(1, tq.KVCacheConfig(8)), 0)
    with pytest.raises(tq.InvalidParameterError):
        tq.BatchedMultiHeadKVCache(tq.KVCacheConfig(8), 2)


@pytest.mark.parametrize("name", ["default", "balanced", "outliers"])
def test_bad_input_changes_no_row(name):
    config = make_config(CONFIGS[name], 16)
    batched, rows = batch_and_rows(config, 3)
    rng = np.random.default_rng(8)
    fill(batched, rows, [30, 20, 25], rng)
    b, h, q, d = 3, 2, 4, 16
    keys, values = rng.standard_normal((b, h, d)), rng.standard_normal((b, h, d))
    queries = rng.standard_normal((b, q, d))
    nan_keys = keys.copy()
    nan_keys[2, 1, 3] = np.nan
    nan_queries = queries.copy()
    nan_queries[1, 0, 0] = np.inf
    block = rng.standard_normal((b, h, 4, d))
    bad_block = block.copy()
    bad_block[2, 0, 1] = np.nan
    cases = [
        (lambda: batched.step(keys[:2], values[:2], queries[:2]), tq.LengthMismatchError),
        (lambda: batched.step(keys[:, :1], values, queries), tq.ShapeError),
        (lambda: batched.step(keys, values[..., :-1], queries), tq.ShapeError),
        (lambda: batched.step(keys, values, queries[:, :-1]), tq.ShapeError),
        (lambda: batched.step(keys, values, queries[:1]), tq.LengthMismatchError),
        (lambda: batched.step(keys, values, queries[0]), tq.ShapeError),
        (lambda: batched.step(nan_keys, values, queries), tq.NonFiniteError),
        (lambda: batched.step(keys, values, nan_queries), tq.NonFiniteError),
        (lambda: batched.step(keys.astype(complex), values, queries), tq.DTypeError),
        (lambda: batched.step(keys, values, queries, float("inf")), tq.NonFiniteError),
        (lambda: batched.step(keys, values, queries, n_threads=0), tq.InvalidParameterError),
        (lambda: batched.append_all(bad_block, block), tq.NonFiniteError),
        (lambda: batched.append_all(block, block, lengths=[4, 4]), tq.LengthMismatchError),
        (lambda: batched.append_all(block, block, lengths=[4, 5, 1]), tq.InvalidParameterError),
        (lambda: batched.append_all(block, block, lengths=[4, -1, 1]), tq.InvalidParameterError),
        (lambda: batched.append_all(block, block, lengths=[4, 1.5, 1]), tq.InvalidParameterError),
        (lambda: batched.append_all(block[:2], block[:2]), tq.LengthMismatchError),
        (lambda: batched.append_all(block, block[:, :, :3]), tq.LengthMismatchError),
        (lambda: batched.append_all(block[0], block[0]), tq.ShapeError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
        assert_rows_equal(batched, rows)
    # Padding past a row's length is never read: NaN there is fine.
    batched.append_all(bad_block, block, lengths=[4, 4, 1])
    for row, k, v, count in zip(rows, bad_block, block, [4, 4, 1]):
        row.append_all(k[:, :count], v[:, :count])
    assert_rows_equal(batched, rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["default", "1-bit", "block", "window f16 center", "window evict",
                             "window evict hadamard", "sinks window", "balanced", "5/6 bits"]),
       lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       actions=st.lists(st.one_of(st.tuples(st.just("step"), st.integers(1, 3)),
                                  st.tuples(st.just("row"), st.integers(0, 12))), max_size=5),
       seed=st.integers(0, 2**16))
def test_random_ragged_histories(name, lengths, actions, seed):
    batched, rows = batch_and_rows(make_config(CONFIGS[name], 16), len(lengths))
    rng = np.random.default_rng(seed)
    fill(batched, rows, lengths, rng)
    for action, amount in actions:
        if action == "step":
            step_both(batched, rows, amount, rng)
        else:
            index = amount % len(lengths)
            keys, values = rng.standard_normal((2, amount, 16)), rng.standard_normal((2, amount, 16))
            batched.append_row(index, keys, values)
            rows[index].append_all(keys, values)
    assert_rows_equal(batched, rows)


@pytest.mark.parametrize("block_scales", [False, True])
def test_ragged_kernel_matches_the_multi_head_kernel_head_by_head(block_scales):
    # Heads of 0, 1, 37 and 200 rows: each gets what the multi-head kernel gives it alone.
    from turboquant.kv._head_codecs import addresses
    from turboquant.quant._codec import BlockMSECodec, MSECodec
    d, lengths, m = 32, [0, 1, 37, 200], 3
    cls = BlockMSECodec if block_scales else MSECodec
    rng = np.random.default_rng(18)
    keys = [cls(d, 3, 5 + h, "dense").quantize(rng.standard_normal((n, d)).astype(np.float32), 1)
            for h, n in enumerate(lengths)]
    values = [cls(d, 2, 50 + h, "dense").quantize(rng.standard_normal((n, d)).astype(np.float32), 1)
              for h, n in enumerate(lengths)]
    key_codec, value_codec = cls(d, 3, 5, "dense"), cls(d, 2, 50, "dense")
    key_sides = [key_codec.fused_side(arrays, n) for arrays, n in zip(keys, lengths)]
    value_sides = [value_codec.fused_side(arrays, n) for arrays, n in zip(values, lengths)]
    queries = rng.standard_normal((len(lengths), m, d)).astype(np.float32)

    def operands(sides, index):
        chosen = [sides[i] for i in index]
        blocks = None if chosen[0].block_scales is None else addresses([s.block_scales for s in chosen])
        return addresses([s.codes for s in chosen]), addresses([s.norms for s in chosen]), blocks

    def run(kernel, count, index, out, lse):
        kc, kn, kb = operands(key_sides, index)
        vc, vn, vb = operands(value_sides, index)
        kernel(kc, kn, key_codec.row_bytes, 3, key_sides[0].centroids, vc, vn, value_codec.row_bytes, 2,
               value_sides[0].centroids, count, np.ascontiguousarray(queries[index]), None, None, 0.3, out, 2,
               key_block_scales=kb, key_block_bytes=key_codec.spec.row_layout().get("block_scales", (0, 0))[1],
               key_factors=key_sides[0].factors, value_block_scales=vb,
               value_block_bytes=value_codec.spec.row_layout().get("block_scales", (0, 0))[1],
               value_factors=value_sides[0].factors, lse=lse)

    out = np.empty(queries.shape, dtype=np.float32)
    lse = np.empty(queries.shape[:2], dtype=np.float32)
    run(_core.small_code_attention_ragged, np.array(lengths, dtype=np.intp), list(range(len(lengths))), out, lse)
    for h, n in enumerate(lengths):
        one, one_lse = np.empty((1, m, d), dtype=np.float32), np.empty((1, m), dtype=np.float32)
        run(_core.small_code_attention_heads, n, [h], one, one_lse)
        np.testing.assert_array_equal(out[h], one[0])
        np.testing.assert_array_equal(lse[h], one_lse[0])
    assert not out[0].any() and np.isneginf(lse[0]).all()
    with pytest.raises(ValueError):
        run(_core.small_code_attention_ragged, np.array([1, -1, 2, 3], dtype=np.intp), [0, 1, 2, 3], out, lse)
    with pytest.raises(ValueError):
        run(_core.small_code_attention_ragged, np.array([1, 2], dtype=np.intp), [0, 1, 2, 3], out, lse)
