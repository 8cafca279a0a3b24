"""TurboQuantIndex: search against numpy references of the same codes and brute force."""

import numpy as np
import pytest
from conftest import shared_data
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant import (
    DTypeError,
    InvalidParameterError,
    LengthMismatchError,
    NonFiniteError,
    ShapeError,
    TurboQuantIndex,
    TurboQuantMSE,
)
from turboquant._kernels import _core


def clustered(n, dim, seed, clusters=256, spread=1.0, queries=0):
    """Unit vectors around ``clusters`` random centres (float32; within a
    cluster the cosine is about 1 / (1 + spread**2)); with ``queries``, also
    that many more from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n + queries)] + spread * rng.standard_normal((n + queries, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (x[:n], x[n:]) if queries else x


def code_scores(index, base, queries):
    """(m, n) float64 scores of the index's metric from the codes' reconstruction
    (numpy, no index kernel): larger is better for every metric."""
    quantizer = TurboQuantMSE(index.dim, index.bits, seed=index.seed, rotation=index.rotation)
    base = np.asarray(base, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    if index.metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    recon = quantizer.dequantize(quantizer.quantize(base))
    ip = queries @ recon.T
    if index.metric == "l2":
        return 2 * ip - (recon ** 2).sum(axis=1)
    return ip


def recall(found, truth):
    k = truth.shape[1]
    return np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)])


def snapshot(index):
    return len(index), index.ids.copy(), index.search(np.ones(index.dim), 5)


def assert_same(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2][0], b[2][0])
    np.testing.assert_array_equal(a[2][1], b[2][1])


# -- results against references -------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(dim=st.integers(2, 70), bits=st.integers(1, 8), n=st.integers(1, 150), k=st.integers(1, 12),
       metric=st.sampled_from(["ip", "cosine", "l2"]), seed=st.integers(0, 2**16))
def test_search_returns_the_best_codes(dim, bits, n, k, metric, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim))
    queries = rng.standard_normal((3, dim))
    index = TurboQuantIndex(dim, bits, metric=metric, seed=seed % 7)
    index.add(base)
    scores, ids = index.search(queries, k)
    reference = code_scores(index, base, queries)
    kk = min(k, n)
    assert scores.shape == ids.shape == (3, k)
    assert (ids[:, kk:] == -1).all()
    for q in range(3):
        best = np.sort(reference[q])[::-1][:kk]
        got = reference[q, ids[q, :kk]]
        # The k best by the codes, up to float32 rounding of near-ties.
        tolerance = 1e-4 * (1 + np.abs(best).max())
        np.testing.assert_allclose(np.sort(got)[::-1], best, atol=tolerance)
        expected = got if metric != "l2" else (queries[q] ** 2).sum() - got
        np.testing.assert_allclose(scores[q, :kk], expected, atol=tolerance, rtol=1e-4)
    order = -scores[:, :kk] if metric != "l2" else scores[:, :kk]
    assert (np.diff(order, axis=1) >= 0).all()


def test_exact_recall_at_8_bits_on_tiny_data():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((200, 24))
    queries = rng.standard_normal((1000, 24))
    index = TurboQuantIndex(24, bits=8)
    index.add(base)
    _, ids = index.search(queries, 3)
    exact = queries @ base.T
    truth = np.argsort(-exact, axis=1)[:, :4]
    # An estimate <q, x_hat> errs by about |q| |x| sqrt(D_mse / dim) (D_mse the
    # 8-bit distortion); queries whose top 4 are 8 of those apart must come out exact.
    distortion = TurboQuantMSE(24, 8).expected_distortion
    sigma = np.linalg.norm(queries, axis=1) * np.linalg.norm(base, axis=1).max() * np.sqrt(distortion / 24)
    gaps = (-np.diff(np.take_along_axis(exact, truth, 1), axis=1)).min(axis=1)
    clear = gaps > 8 * sigma
    assert clear.sum() >= 50
    np.testing.assert_array_equal(ids[clear], truth[clear, :3])


def test_recall_at_4_bits_on_clustered_vectors():
    base, queries = clustered(4000, 128, seed=2, queries=100)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    index = TurboQuantIndex(128, bits=4)
    index.add(base)
    _, ids = index.search(queries, 10)
    assert recall(ids, truth) >= 0.9
    # Re-ranking the best 50 against the originals finds nearly all of them.
    exact = TurboQuantIndex(128, bits=4, keep_originals=True)
    exact.add(base)
    _, ids = exact.search(queries, 10, rerank=50)
    assert recall(ids, truth) >= 0.99


def test_recall_on_real_embeddings():
    data = np.load(shared_data("stdlib_minilm.npz"))
    index = TurboQuantIndex(data["base"].shape[1], bits=4)
    index.add(data["base"])
    _, ids = index.search(data["queries"], 10)
    assert recall(ids, data["gt"][:, :10]) >= 0.9


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_rerank_agrees_with_brute_force_on_exact_data(metric):
    # Small integers: every product and sum is exact in float32 and float64.
    rng = np.random.default_rng(4)
    base = rng.integers(-4, 5, size=(300, 16)).astype(np.float32)
    base[0] = 0.0
    queries = rng.integers(-4, 5, size=(7, 16)).astype(np.float64)
    index = TurboQuantIndex(16, bits=2, metric=metric, keep_originals=True)
    index.add(base)
    scores, ids = index.search(queries, 10, rerank=300)
    if metric == "l2":
        exact = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        key = exact
    else:
        b, q = base.astype(np.float64), queries
        if metric == "cosine":
            norms = np.linalg.norm(b, axis=1)
            b = np.divide(b, norms[:, None], out=np.zeros_like(b), where=norms[:, None] > 0)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        exact = q @ b.T
        key = -exact
    order = np.lexsort((np.broadcast_to(np.arange(300), key.shape), key), axis=-1)[:, :10]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), rtol=1e-12, atol=1e-12)
    # The same with the originals passed in, by id.
    plain = TurboQuantIndex(16, bits=2, metric=metric)
    plain.add(base)
    scores2, ids2 = plain.search(queries, 10, rerank=300, originals=base)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_allclose(scores2, scores, rtol=1e-12, atol=1e-12)


def test_ties_are_broken_by_the_smaller_id():
    base = np.tile(clustered(1, 32, seed=5, clusters=1), (40, 1))
    index = TurboQuantIndex(32, bits=4)
    index.add(base, ids=np.arange(40)[::-1] * 3)
    scores, ids = index.search(base[:1], 40)
    assert (scores == scores[0, 0]).all()
    np.testing.assert_array_equal(ids[0], np.arange(40) * 3)


# -- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4, 5])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_results_do_not_depend_on_threads_or_variant(bits, metric):
    base = clustered(40000, 48, seed=6)
    queries = clustered(9, 48, seed=7)
    index = TurboQuantIndex(48, bits=bits, metric=metric)
    index.add(base)
    reference = index.search(queries, 20, n_threads=1)
    for threads in (2, 3):
        result = index.search(queries, 20, n_threads=threads)
        np.testing.assert_array_equal(result[0], reference[0])
        np.testing.assert_array_equal(result[1], reference[1])
    if bits in (1, 2, 4):
        # The fast scan's approximate keys are the same float32 arithmetic on every variant.
        for variant in _core._kernel_variants():
            with _core._use_kernel_variant(variant):
                result = index.search(queries, 20, n_threads=2)
            np.testing.assert_array_equal(result[1], reference[1])
            np.testing.assert_array_equal(result[0], reference[0])


def test_float64_queries_give_float64_scores():
    base = clustered(100, 16, seed=8)
    index = TurboQuantIndex(16)
    index.add(base)
    s32, i32 = index.search(base[:4], 3)
    s64, i64 = index.search(base[:4].astype(np.float64), 3)
    assert s32.dtype == np.float32 and s64.dtype == np.float64 and i64.dtype == np.int64
    np.testing.assert_array_equal(i32, i64)


# -- ids, removal, growth, empty ------------------------------------------------------------------

def test_ids_round_trip_and_streaming_adds():
    base = clustered(1000, 32, seed=9)
    ids = np.random.default_rng(0).choice(10**12, size=1000, replace=False).astype(np.int64)
    index = TurboQuantIndex(32, bits=2)
    for start in range(0, 1000, 77):   # many small adds across block boundaries
        index.add(base[start:start + 77], ids=ids[start:start + 77])
    whole = TurboQuantIndex(32, bits=2)
    whole.add(base, ids=ids)
    np.testing.assert_array_equal(index.ids, ids)
    a, b = index.search(base[:20], 7), whole.search(base[:20], 7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[1][:, 0] == ids[:20]).all()


def test_default_ids_continue_after_explicit_ones():
    index = TurboQuantIndex(8)
    index.add(np.eye(8)[:3])
    index.add(np.eye(8)[3:5], ids=[10, 20])
    index.add(np.eye(8)[5:])
    np.testing.assert_array_equal(index.ids, [0, 1, 2, 10, 20, 21, 22, 23])


@pytest.mark.parametrize("bits", [4, 3])
def test_remove(bits):
    base = clustered(500, 32, seed=10)
    index = TurboQuantIndex(32, bits=bits, keep_originals=True)
    index.add(base)
    gone = np.arange(0, 500, 3)
    assert index.remove(np.concatenate([gone, [10**9]])) == len(gone)
    assert index.remove(gone) == 0
    kept = np.setdiff1d(np.arange(500), gone)
    assert len(index) == len(kept)
    np.testing.assert_array_equal(index.ids, kept)
    fresh = TurboQuantIndex(32, bits=bits, keep_originals=True)
    fresh.add(base[kept], ids=kept)
    for rerank in (0, 50):
        a = index.search(base[:30], 10, rerank=rerank)
        b = fresh.search(base[:30], 10, rerank=rerank)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.isin(a[1], gone).any()
    index.add(base[gone], ids=gone)   # removed ids may come back
    assert len(index) == 500


def test_empty_index_and_k_larger_than_len():
    for metric, missing in (("ip", -np.inf), ("l2", np.inf)):
        index = TurboQuantIndex(16, metric=metric)
        scores, ids = index.search(np.ones((2, 16)), 4)
        assert (ids == -1).all() and (scores == missing).all() and scores.shape == (2, 4)
        index.add(np.eye(16)[:3])
        scores, ids = index.search(np.ones((2, 16)), 5, )
        assert (ids[:, 3:] == -1).all() and (scores[:, 3:] == missing).all()
        assert set(ids[0, :3]) == {0, 1, 2}
        index.reset()
        assert len(index) == 0 and index.nbytes == 0


def test_nbytes_and_code_size():
    index = TurboQuantIndex(128, bits=4)
    assert index.code_size == 68
    index.add(clustered(64, 128, seed=11))
    assert index.nbytes == 64 * (64 + 4 + 8)
    assert TurboQuantIndex(128, bits=3, metric="l2").code_size == 52


# -- bad input ------------------------------------------------------------------------------------

def test_bad_inputs_raise_and_leave_the_index_unchanged():
    base = clustered(50, 16, seed=12)
    index = TurboQuantIndex(16, keep_originals=True)
    index.add(base)
    before = snapshot(index)
    bad_nan = base[:2].copy()
    bad_nan[1, 3] = np.nan
    cases = [
        (ShapeError, lambda: index.add(np.ones((3, 15)))),
        (NonFiniteError, lambda: index.add(bad_nan)),
        (InvalidParameterError, lambda: index.add(base[:2], ids=[7, 7])),
        (InvalidParameterError, lambda: index.add(base[:2], ids=[3, 100])),   # 3 is held
        (InvalidParameterError, lambda: index.add(base[:2], ids=[-1, 100])),
        (LengthMismatchError, lambda: index.add(base[:2], ids=[100])),
        (InvalidParameterError, lambda: index.add(base[:2], ids=[1.5, 2.5])),
        (DTypeError, lambda: index.add(np.array([["a"] * 16]))),
        (ShapeError, lambda: index.search(np.ones(15), 3)),
        (NonFiniteError, lambda: index.search(np.full(16, np.inf), 3)),
        (InvalidParameterError, lambda: index.search(base[:1], 0)),
        (InvalidParameterError, lambda: index.search(base[:1], -2)),
        (InvalidParameterError, lambda: index.search(base[:1], 2, rerank=-1)),
        (InvalidParameterError, lambda: index.search(base[:1], 2, rerank=5, originals=base[:10])),
        (InvalidParameterError, lambda: index.remove(np.ones((2, 2), dtype=int))),
        (InvalidParameterError, lambda: TurboQuantIndex(16, metric="hamming")),
        (InvalidParameterError, lambda: TurboQuantIndex(16, bits=9)),
        (InvalidParameterError, lambda: TurboQuantIndex(16, rotation="none")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert_same(snapshot(index), before)
    plain = TurboQuantIndex(16)
    plain.add(base)
    with pytest.raises(InvalidParameterError, match="keep_originals"):
        plain.search(base[:1], 2, rerank=5)


def test_public_names_and_repr():
    import turboquant
    assert turboquant.TurboQuantIndex is TurboQuantIndex
    index = TurboQuantIndex(16, bits=2, metric="cosine")
    assert "cosine" in repr(index) and index.ntotal == 0
