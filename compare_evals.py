"""Paired comparison of filter evaluations on the same queries: is a difference more than noise?

    python compare_evals.py runs/demo/kmer_vqvae_phase1b_lora_squad_filter_eval.json \
        runs/demo/kmer_vqvae_phase2_aligned_squad_filter_eval.json
    python compare_evals.py runs/demo/kmer_vqvae_phase2_aligned_cisi_filter_eval.json \
        --a kmer_vqvae_ivf_centred --b model2vec_ivf_centred

Two reports of `eval_filter.py` (A, then B): every method both hold, B against A. One report: method
--b against method --a of the same run. For recall at 1% and 5% of the corpus it prints both means,
B - A, a 95% interval for B - A from a paired bootstrap over queries (each query's recall under A and
B resampled together), and how many queries B ranks better and worse; "lists A / B" says how many lists
each row routed through ("-" for exact search), so rows of different list counts are not mistaken for
like for like. An interval that excludes 0
is a difference these queries measure; one that spans it is not. The interval covers which queries
were asked, not another training seed: retrain with --seed to see that spread, and pool the seeds:

    python compare_evals.py --pooled A_seed0.json A_seed1.json B_seed0.json B_seed1.json

takes the first half of the reports as A and the second as B, and compares each query's recall averaged
over A's reports with the same query's averaged over B's (the seeds' noise averages out per query).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from train_common import UserError


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a and the 2.5th / 97.5th percentiles of that mean over query resamples (a[i], b[i] paired)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(len(d), size=(min(1000, resamples - i), len(d)))].mean(1)
                            for i in range(0, resamples, 1000)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): pass a *_filter_eval.json written by eval_filter.py") from None
    if not isinstance(report, dict) or "methods" not in report:
        raise UserError(f"{path} is not an eval_filter.py report: pass a *_filter_eval.json")
    return report


def _queries(report: dict) -> tuple:
    """What says two reports asked the same queries: data set, query count and the query set's hash."""
    return report.get("dataset"), report.get("queries"), report.get("query_set")


def _per_query(report: dict, method: str, path: str) -> dict:
    if method not in report["methods"]:
        raise UserError(f"{path} has no method '{method}'; it has: {', '.join(report['methods'])}")
    rows = report["methods"][method].get("per_query")
    if not rows:
        raise UserError(f"{path} holds no per-query recall for '{method}' (written before it was kept): "
                        f"rerun eval_filter.py on that checkpoint")
    return rows


def compare(a: dict, b: dict, pairs: list[tuple[str, str]], a_path: str = "A", b_path: str = "B",
            resamples: int = 10_000) -> list[dict]:
    """One row per (method pair, fraction): means, difference, 95% interval, queries better / worse."""
    if _queries(a) != _queries(b):
        raise UserError(f"{a_path} and {b_path} were not run on the same queries ({a.get('dataset')}, "
                        f"{a.get('queries')} queries against {b.get('dataset')}, {b.get('queries')}): "
                        f"compare reports of one data set")
    out = []
    for ma, mb in pairs:
        qa, qb = _per_query(a, ma, a_path), _per_query(b, mb, b_path)
        for f in sorted(set(qa) & set(qb), key=float):
            va, vb = np.array(qa[f]), np.array(qb[f])
            diff, lo, hi = paired_bootstrap(va, vb, resamples)
            out.append({"a": ma, "b": mb, "fraction": f, "mean_a": float(va.mean()), "mean_b": float(vb.mean()),
                        "diff": diff, "low": lo, "high": hi, "better": int((vb > va).sum()),
                        "worse": int((vb < va).sum()), "queries": len(va),
                        "lists": (a["methods"][ma].get("codes"), b["methods"][mb].get("codes"))})
    return out


def pool(reports: list[dict], paths: list[str]) -> dict:
    """One report whose per-query recalls are the means over `reports` (e.g. training seeds) of the same
    queries: the methods all of them hold with per-query recall, their list counts from the first."""
    first = reports[0]
    for r, path in zip(reports[1:], paths[1:]):
        if _queries(r) != _queries(first):
            raise UserError(f"{path} was not run on the same queries as {paths[0]}: pool reports of one data set")
    methods = {}
    for m, row in first["methods"].items():
        rows = [r["methods"].get(m, {}).get("per_query") for r in reports]
        if all(rows):
            fractions = set.intersection(*(set(q) for q in rows))
            methods[m] = {**row, "per_query": {f: np.mean([q[f] for q in rows], axis=0).tolist() for f in fractions}}
    return {**first, "methods": methods}


def verdict(row: dict) -> str:
    if row["low"] > 0:
        return "B higher"
    if row["high"] < 0:
        return "A higher"
    return "no measurable difference"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="one or two *_filter_eval.json files (A, then B)")
    ap.add_argument("--a", default="", help="method of A (with one report: required, as is --b)")
    ap.add_argument("--b", default="", help="method of B (default: the same as --a; with two reports and "
                                            "neither given, every method both hold)")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--pooled", action="store_true", help="2k reports: the first k are A, the last k B (e.g. k "
                                                          "training seeds each), each side's per-query recall "
                                                          "averaged over its k reports")
    args = ap.parse_args(argv)
    try:
        if args.pooled:
            k = len(args.reports) // 2
            if len(args.reports) % 2 or not k:
                raise UserError(f"--pooled takes an even number of reports (A's, then as many of B's); got "
                                f"{len(args.reports)}")
            a_paths, b_paths = args.reports[:k], args.reports[k:]
            a = pool([_load(p) for p in a_paths], a_paths)
            b = pool([_load(p) for p in b_paths], b_paths)
            paths = [" + ".join(a_paths), " + ".join(b_paths)]
        else:
            if len(args.reports) > 2:
                raise UserError("pass one report (with --a and --b) or two reports (A, then B)")
            paths = args.reports if len(args.reports) == 2 else args.reports * 2
            a = _load(paths[0])
            b = _load(paths[1]) if len(args.reports) == 2 else a  # one report: read once
            if len(args.reports) == 1 and not (args.a and args.b):
                raise UserError("one report: name the two methods to compare, e.g. --a kmer_vqvae_ivf --b "
                                "model2vec_ivf")
        if args.a or args.b:
            pairs = [(args.a or args.b, args.b or args.a)]
        else:
            pairs = [(m, m) for m in a["methods"] if m in b["methods"] and a["methods"][m].get("per_query")
                     and b["methods"][m].get("per_query")]
            if not pairs:
                raise UserError("the reports share no method with per-query recall: rerun eval_filter.py on both")
        rows = compare(a, b, pairs, paths[0], paths[1], args.resamples)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"A: {paths[0]}\nB: {paths[1]}\n{rows[0]['queries'] if rows else 0} queries ({a['dataset']}); "
          f"95% interval of B - A from a paired bootstrap over queries ({args.resamples:,} resamples)")
    print("| A method | B method | kept | lists A / B | A | B | B - A | 95% interval | queries better / worse "
          "| verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lists = " / ".join("-" if n is None else str(n) for n in r["lists"])  # exact search: no lists
        print(f"| {r['a']} | {r['b']} | {float(r['fraction']):.0%} | {lists} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | "
              f"{r['diff']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | {r['better']} / {r['worse']} | {verdict(r)} |")
    return rows


if __name__ == "__main__":
    main()
