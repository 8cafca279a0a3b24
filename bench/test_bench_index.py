"""Smoke test of ``bench/index_search.py``: its ``--quick`` path on tiny data.

    python -m pytest bench/test_bench_index.py

Checks that every method builds, searches and is timed, that the recalls are
fractions with recall@1@k growing with k, and that the FAISS rows are there
exactly when FAISS is installed. No timing is asserted.
"""

import importlib.util
import json

import pytest

index_search = pytest.importorskip("index_search")

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def check_rows(rows):
    for row in rows:
        assert 0.0 <= row["recall_at_10"] <= 1.0, row["method"]
        recalls = [row["recall_1_at"][k] for k in index_search.RECALL_KS]
        assert all(0.0 <= r <= 1.0 for r in recalls), row["method"]
        assert recalls == sorted(recalls), f"{row['method']}: recall@1@k falls as k grows: {recalls}"
        assert row["qps_1"] > 0 and row["qps_64"] > 0 and row["code_bytes"] > 0


def test_quick_run_on_tiny_data(tmp_path, capsys):
    path = tmp_path / "index.json"
    results = index_search.main(["--quick", "--dims", "32", "--n", "1024", "--queries", "50", "--rounds", "1",
                                 "--singles", "4", "--minilm", "", "--json", str(path)])
    out = capsys.readouterr().out
    assert out.startswith("Command: `python bench/index_search.py --quick")
    (result,) = results
    rows = {row["method"]: row for row in result["methods"]}
    assert {"ours 2-bit", "ours 4-bit", "ours 8-bit", "ours 4-bit + rerank 40"} <= set(rows)
    assert rows["ours 4-bit"]["code_bytes"] == 32 * 4 // 8 + 4
    # Exact re-ranking of 40 candidates: a broken index would find almost none of the true top 10.
    assert rows["ours 4-bit + rerank 40"]["recall_at_10"] > 0.5
    check_rows(result["methods"])
    assert any(row["family"] == "faiss" for row in result["methods"]) == HAS_FAISS
    if HAS_FAISS:
        assert "FAISS PQFastScan M=32x4" in rows and "| ours 4-bit | FAISS PQFastScan M=32x4 |" in out
    assert json.loads(path.read_text())["results"][0]["n"] == 1024


@pytest.mark.skipif(not index_search.MINILM.is_file(), reason=f"{index_search.MINILM} is absent")
def test_quick_run_on_minilm():
    (result,) = index_search.main(["--quick", "--dims", "", "--no-faiss", "--bits", "4", "--rerank", "0",
                                   "--queries", "20", "--rounds", "1", "--singles", "2"])
    assert result["d"] == 384 and result["queries"] == 20
    check_rows(result["methods"])
