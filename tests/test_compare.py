"""Per-query recall in the evaluation reports, and the paired comparison built on it."""
import json

import numpy as np
import pytest

import compare_evals as ce
from eval_filter import exact_row, lists_row
from train_common import UserError


def test_per_query_recall_counts_the_partly_kept_list_by_its_share():
    """100 passages in 4 lists of 25; 1% of the corpus keeps 1 passage, 5% keeps 5: a query whose
    relevant passage is in its first list gets 1/25 and 5/25 of it (the expected share)."""
    code_of_doc = np.arange(100) // 25
    probe = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3]])
    rel = [np.array([0]), np.array([30, 31]), np.array([99])]
    row = lists_row(code_of_doc, probe, 4, rel)
    assert row["per_query"]["0.01"] == pytest.approx([0.04, 0.04, 0.0])
    assert row["per_query"]["0.05"] == pytest.approx([0.2, 0.2, 0.0])
    for f in ("0.01", "0.05"):  # the report's mean is the mean of what it keeps per query
        assert row["recall_at_fraction"][f] == pytest.approx(np.mean(row["per_query"][f]))


def test_exact_per_query_recall_follows_each_querys_rank():
    d = np.eye(100, dtype=np.float32)
    q = np.stack([d[7], 0.9 * d[3] + 0.5 * d[1] + 0.4 * d[2]])  # query 1 ranks passage 2 third
    row = exact_row(q, d, [np.array([7]), np.array([2])])
    assert row["per_query"]["0.01"] == [1.0, 0.0]
    assert row["per_query"]["0.05"] == [1.0, 1.0]



def test_exact_rows_ranked_a_chunk_of_queries_at_a_time_equal_the_whole_matrix_by_hand(monkeypatch):
    """exact_row and the re-ranker-alone row rank QUERY_CHUNK queries at a time (memory ~ chunk x N): with chunks of 3
    over 10 queries (the last one short) each query keeps what ranking all of them at once by hand gives."""
    import eval_filter
    rng = np.random.default_rng(0)
    d = rng.normal(size=(200, 8)).astype(np.float32)
    rel = [rng.choice(200, size=1 + i % 3, replace=False) for i in range(10)]
    q = np.stack([d[r[0]] + 0.3 * rng.normal(size=8) for r in rel]).astype(np.float32)  # near its first passage
    rank = (-(q @ d.T)).argsort(1).argsort(1)
    want = {f: [float(np.clip(f * 200 - rank[i, r], 0, 1).sum() / len(r)) for i, r in enumerate(rel)] for f in (0.01, 0.05)}
    top = np.argsort(-(q @ d.T), axis=1)[:, :10]
    want_top = float(np.mean([np.isin(r, t).mean() for r, t in zip(rel, top)]))
    monkeypatch.setattr(eval_filter, "QUERY_CHUNK", 3)
    row = eval_filter.exact_row(q, d, rel)
    assert row["per_query"]["0.01"] == pytest.approx(want[0.01], abs=1e-4)
    assert row["per_query"]["0.05"] == pytest.approx(want[0.05], abs=1e-4) and 0 < np.mean(want[0.05]) < 1
    codes = np.arange(200) % 4
    alone = eval_filter.two_stage(codes, np.tile(np.arange(4), (10, 1)), q, d, rel)["1.0"]
    assert alone["recall_at_k"] == pytest.approx(want_top) and 0 < want_top < 1

def _report(methods: dict, query_set="abc") -> dict:
    return {"dataset": "squad", "queries": len(next(iter(methods.values()))["0.01"]), "query_set": query_set,
            "methods": {m: {"recall_at_fraction": {f: float(np.mean(v)) for f, v in pq.items()}, "per_query": pq}
                        for m, pq in methods.items()}}


def test_paired_bootstrap_sees_a_small_shift_that_queries_share():
    """B = A + 0.01 on every query: a paired interval is [0.01, 0.01] however spread A is; an unpaired one
    would span 0."""
    a = np.random.default_rng(0).random(500)
    diff, lo, hi = ce.paired_bootstrap(a, a + 0.01, resamples=2000)
    assert diff == pytest.approx(0.01) and lo == pytest.approx(0.01) and hi == pytest.approx(0.01)
    rows = ce.compare(_report({"m": {"0.01": list(a)}}), _report({"m": {"0.01": list(a + 0.01)}}), [("m", "m")],
                      resamples=2000)
    assert ce.verdict(rows[0]) == "B higher" and rows[0]["better"] == 500 and rows[0]["worse"] == 0
    noise = np.random.default_rng(1).normal(0, 0.2, 500)
    rows = ce.compare(_report({"m": {"0.01": list(a)}}), _report({"m": {"0.01": list(a + noise - noise.mean())}}),
                      [("m", "m")], resamples=2000)
    assert ce.verdict(rows[0]) == "no measurable difference"
    rows = ce.compare(_report({"m": {"0.01": list(a + 0.01)}}), _report({"m": {"0.01": list(a)}}), [("m", "m")],
                      resamples=2000)
    assert ce.verdict(rows[0]) == "A higher"


def test_compare_refuses_other_queries_and_old_reports(tmp_path, capsys):
    a = _report({"m": {"0.01": [0.0, 1.0]}, "n": {"0.01": [1.0, 1.0]}})
    with pytest.raises(UserError, match="same queries"):
        ce.compare(a, _report({"m": {"0.01": [0.0, 1.0]}}, query_set="other"), [("m", "m")])
    old = {**a, "methods": {"m": {"recall_at_fraction": {"0.01": 0.5}}}}
    with pytest.raises(UserError, match="rerun eval_filter.py"):
        ce.compare(old, a, [("m", "m")])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(a))
    rows = ce.main([str(path), "--a", "m", "--b", "n", "--resamples", "200"])  # two methods of one run
    assert rows[0]["diff"] == pytest.approx(0.5) and "| m | n | 1% | - / - |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ce.main([str(path)])
    assert e.value.code == 2 and "--a" in capsys.readouterr().err


def test_pooled_compares_each_querys_recall_averaged_over_seeds(tmp_path, capsys):
    """--pooled A0 A1 B0 B1: A's per-query recall is the mean of A0's and A1's, B's likewise, so a query that
    one seed gets and the other misses counts a half on its side."""
    reports = {"a0": {"m": {"0.01": [1.0, 0.0, 0.0, 1.0]}}, "a1": {"m": {"0.01": [0.0, 0.0, 1.0, 1.0]}},
               "b0": {"m": {"0.01": [1.0, 1.0, 0.0, 1.0]}}, "b1": {"m": {"0.01": [1.0, 0.0, 1.0, 1.0]}}}
    paths = []
    for name, methods in reports.items():
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(_report(methods)))
    pooled = ce.pool([_report(reports["a0"]), _report(reports["a1"])], paths[:2])
    assert pooled["methods"]["m"]["per_query"]["0.01"] == [0.5, 0.0, 0.5, 1.0]
    rows = ce.main(["--pooled", *paths, "--resamples", "200"])
    assert rows[0]["mean_a"] == pytest.approx(0.5) and rows[0]["mean_b"] == pytest.approx(0.75)
    assert rows[0]["better"] == 2 and rows[0]["worse"] == 0  # queries 1 and 3 rose by a half, none fell
    assert "a0.json + " in capsys.readouterr().out
    with pytest.raises(UserError, match="same queries"):
        ce.pool([_report(reports["a0"]), _report(reports["a1"], query_set="other")], paths[:2])
    with pytest.raises(SystemExit) as e:
        ce.main(["--pooled", *paths[:3]])
    assert e.value.code == 2 and "even number" in capsys.readouterr().err
