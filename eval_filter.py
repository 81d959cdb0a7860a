"""Filter evaluation: recall of relevant passages against the fraction of the corpus kept.

    python eval_filter.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --dataset cisi
    python eval_filter.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --dataset squad
    python eval_filter.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --dataset scitldr
    python eval_filter.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --dataset medquad
    python eval_filter.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --dataset pubmedqa   # or arxiv_titles
    python eval_filter.py --checkpoint kmer_vqvae_phase2_aligned.pt --dataset beir --beir_dir path/to/scifact

Every passage goes into one code; a query probes its n nearest codes (n = 1, 2, 4, ...), and the
passages in them are the candidates. In the same run, on the same queries, three anchors:
FAISS IVF with as many lists on the teacher's embeddings (what a user would pick instead),
random codes (the floor) and the teacher's exact top-k at the same budget (the ceiling).
Writes <output_dir>/<dataset>_filter_eval.json and .png.

SQuAD dev: only the articles reserved for evaluation (`squad_eval_article`, half of them by title
hash); Phase 2 never trains or validates on those.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import lexical
from kmer_index import DEFAULT_WHITEN, inverted_lists, probe_lists, routed, routing_transform
from teacher import PRECISIONS
from train_common import REPO, UserError

FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
PAIRED = ("0.01", "0.05")  # fractions whose per-query recall each report keeps


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _find(folder: str, name: str) -> str:
    for cand in (name, name + ".gz"):
        if os.path.isfile(os.path.join(folder, cand)):
            return os.path.join(folder, cand)
    raise UserError(f"{folder} has no {name}: a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv")


def load_beir(folder: str, split: str = "test"):
    """-> (doc ids, doc texts, query ids, query texts, {qid: set(doc ids)}) with graded qrels > 0."""
    docs = [json.loads(l) for l in _open(_find(folder, "corpus.jsonl"))]
    doc_ids = [str(d["_id"]) for d in docs]
    doc_texts = [(f"{d['title']}. " if d.get("title") else "") + d.get("text", "") for d in docs]
    queries = {str(q["_id"]): q["text"] for q in map(json.loads, _open(_find(folder, "queries.jsonl")))}
    qrels: dict[str, set] = {}
    known = set(doc_ids)
    with _open(_find(os.path.join(folder, "qrels"), f"{split}.tsv")) as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            qid, did, score = parts[0], parts[1], float(parts[-1])
            if score > 0 and did in known and qid in queries:
                qrels.setdefault(qid, set()).add(did)
    qids = sorted(qrels)
    return doc_ids, doc_texts, qids, [queries[q] for q in qids], qrels


def load_squad(path: str):
    """SQuAD dev as retrieval over the evaluation half of its articles."""
    from vqvae_phase2_data import read_squad_local, squad_eval_article
    rows = read_squad_local(path) or [json.loads(l) for l in _open(path)]
    rows = [r for r in rows if squad_eval_article(r["title"])]
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    cid = {c: str(i) for i, c in enumerate(contexts)}
    qids = [str(i) for i in range(len(rows))]
    titles = sorted({r["title"] for r in rows})
    return ([cid[c] for c in contexts], contexts, qids, [r["question"] for r in rows],
            {q: {cid[r["context"]]} for q, r in zip(qids, rows)}, titles)


DISTRACTOR_FILES = ("webtext/wikipedia_validation.jsonl.gz", "webtext/c4_validation.jsonl.gz",
                    "webtext/wikipedia_train.jsonl.gz", "webtext/c4_train.jsonl.gz")


def web_distractors(n: int, exclude_titles=(), root: str = os.path.join(REPO, "data")) -> list[str]:
    """n passages of the bundled web text (Wikipedia and C4 pages, paragraphs packed or cut to ~300-800
    characters), in a fixed shuffle, for a larger corpus: `--distractors N` adds them to the set's passages, no
    query judged against them. Wikipedia pages titled as in `exclude_titles` are left out (SQuAD's articles)."""
    skip = {t.replace("_", " ").lower() for t in exclude_titles}
    passages = []
    for name in DISTRACTOR_FILES:
        for row in map(json.loads, _open(os.path.join(root, name))):
            if row.get("title", "").replace("_", " ").lower() in skip:
                continue
            buf = ""
            for para in (p.strip() for p in row["text"].split("\n")):
                buf = f"{buf} {para}".strip() if para else buf
                while len(buf) > 800:  # cut at a sentence end, else a space
                    cut = buf.rfind(". ", 300, 800)
                    cut = cut + 1 if cut > 0 else max(buf.rfind(" ", 300, 800), 800)
                    passages.append(buf[:cut].strip())
                    buf = buf[cut:].strip()
                if len(buf) >= 300:
                    passages.append(buf)
                    buf = ""
            if len(buf) >= 150:
                passages.append(buf)
    if n > len(passages):
        raise UserError(f"--distractors {n}: the bundled web text holds {len(passages):,} passages; give at most that")
    order = np.random.default_rng(0).permutation(len(passages))[:n]
    return [passages[i] for i in sorted(order)]


def file_distractors(paths: list[str], n: int, known=()) -> list[str]:
    """n passages (0 = all) of corpus files read as `kmer_index.py build --corpus` reads them (JSONL with _id and
    text, a title before the text; else one passage per line), in a fixed shuffle, for `--distractor_files`:
    the set's own passages (`known`) and repeats left out."""
    from kmer_index import read_corpus
    seen = set(known)
    passages = []
    for i, path in enumerate(paths):
        for chunk in read_corpus(path, i):
            for _, text, _ in chunk:
                if text.strip() and text not in seen:
                    seen.add(text)
                    passages.append(text)
    if n > len(passages):
        raise UserError(f"--distractors {n}: {', '.join(paths)} hold{'s' if len(paths) == 1 else ''} "
                        f"{len(passages):,} passages not in the set; give at most that (0 = all)")
    order = np.random.default_rng(0).permutation(len(passages))[:n or len(passages)]
    return [passages[i] for i in sorted(order)]


def recall_curves(code_of_doc: np.ndarray, probe_order: np.ndarray, rel_docs: list[np.ndarray],
                  fractions=FRACTIONS) -> tuple[dict, list[dict], dict]:
    """Recall at corpus fractions (partial last code counted by its expected share) + n-probe table
    + each query's recall at the PAIRED fractions.

    code_of_doc (N,), probe_order (Q, K) codes nearest-first, rel_docs[q] indices of relevant docs.
    """
    N, K = len(code_of_doc), probe_order.shape[1]
    sizes = np.bincount(code_of_doc, minlength=K).astype(np.float64)
    at_fraction = {f: [] for f in fractions}
    probes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= K]
    table = {n: ([], []) for n in probes}
    for order, rel in zip(probe_order, rel_docs):
        s = sizes[order]
        r = np.bincount(code_of_doc[rel], minlength=K).astype(np.float64)[order]
        cum_s, cum_r = np.cumsum(s), np.cumsum(r)
        for f in fractions:
            budget = f * N
            j = int(np.searchsorted(cum_s, budget, side="right"))  # codes 0..j-1 fit entirely
            got = cum_r[j - 1] if j > 0 else 0.0
            if j < K and s[j] > 0:
                got += r[j] * (budget - (cum_s[j - 1] if j > 0 else 0.0)) / s[j]
            at_fraction[f].append(got / len(rel))
        for n in probes:
            table[n][0].append(cum_s[n - 1] / N)
            table[n][1].append(cum_r[n - 1] / len(rel))
    curve = {str(f): float(np.mean(v)) for f, v in at_fraction.items()}
    rows = [{"n_probe": n, "fraction_kept": float(np.mean(table[n][0])), "recall": float(np.mean(table[n][1]))}
            for n in probes]
    return curve, rows, per_query(at_fraction)


def per_query(at_fraction: dict) -> dict:
    """Each query's recall at the PAIRED fractions (4 decimals): what compare_evals.py pairs up."""
    return {str(f): [round(float(x), 4) for x in v] for f, v in at_fraction.items() if str(f) in PAIRED}


def lists_row(code_of_doc: np.ndarray, probe_order: np.ndarray, K: int, rel_docs) -> dict:
    """One report row for any list assignment: recall curve, n-probe table, corpus perplexity, K,
    per-query recall at 1% and 5%."""
    curve, rows, queries = recall_curves(code_of_doc, probe_order, rel_docs)
    return {"recall_at_fraction": curve, "n_probe": rows, "perplexity": perplexity(code_of_doc, K), "codes": K,
            "per_query": queries}


def seeded_lists_row(fit, seeds, rel_docs) -> tuple[dict, tuple]:
    """lists_row over several k-means draws: `fit(seed)` -> (doc list, probe order, lists). With more than one
    seed the recall curve, n-probe table, perplexity and each query's recall are means over the draws, and
    `per_seed` keeps each draw's curve (README "Filter evaluation": the draw moves recall at 1% by ~0.02).
    -> (row, the first seed's fit)."""
    fits = [fit(s) for s in seeds]
    rows = [lists_row(c, o, k, rel_docs) for c, o, k in fits]
    if len(rows) == 1:
        return rows[0], fits[0]
    mean = lambda xs: float(np.mean(xs))
    row = {"recall_at_fraction": {f: mean([r["recall_at_fraction"][f] for r in rows]) for f in rows[0]["recall_at_fraction"]},
           "n_probe": [{"n_probe": first["n_probe"],
                        "fraction_kept": mean([r["n_probe"][i]["fraction_kept"] for r in rows]),
                        "recall": mean([r["n_probe"][i]["recall"] for r in rows])}
                       for i, first in enumerate(rows[0]["n_probe"])],
           "perplexity": mean([r["perplexity"] for r in rows]), "codes": rows[0]["codes"],
           "per_query": {f: [round(mean(v), 4) for v in zip(*(r["per_query"][f] for r in rows))]
                         for f in rows[0]["per_query"]},
           "seeds": list(seeds), "per_seed": [r["recall_at_fraction"] for r in rows]}
    return row, fits[0]


QUERY_CHUNK = 512  # queries ranked against the whole corpus at once (exact rows, the re-ranker alone)


def query_chunks(q_emb: np.ndarray, d_emb: np.ndarray):
    """(start, similarities of up to QUERY_CHUNK queries from `start` to every passage), chunk after chunk: memory
    ~ chunk x N, not Q x N; each query's row is what the whole Q x N product gives."""
    for start in range(0, len(q_emb), QUERY_CHUNK):
        yield start, q_emb[start:start + QUERY_CHUNK] @ d_emb.T


def exact_row(q_emb: np.ndarray, d_emb: np.ndarray, rel_docs, fractions=FRACTIONS) -> dict:
    """Exact top-k at the same budgets (fractional k counted by expected share): the mean recall curve
    and per-query recall at the PAIRED fractions."""
    N = d_emb.shape[0]
    at_fraction = {f: [] for f in fractions}
    for start, sims in query_chunks(q_emb, d_emb):
        ranks = (-sims).argsort(1).argsort(1)  # each doc's rank per query
        for i, rel in enumerate(rel_docs[start:start + QUERY_CHUNK]):
            for f in fractions:
                at_fraction[f].append(np.clip(f * N - ranks[i, rel], 0, 1).sum() / len(rel))
    return {"recall_at_fraction": {str(f): float(np.mean(v)) for f, v in at_fraction.items()},
            "per_query": per_query(at_fraction)}


def perplexity(codes: np.ndarray, K: int) -> float:
    p = np.bincount(codes, minlength=K) / len(codes)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def ivf_on_teacher(d_emb: np.ndarray, q_emb: np.ndarray, K: int, seed: int):
    import faiss
    k = min(K, d_emb.shape[0])
    km = faiss.Kmeans(d_emb.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(d_emb.astype(np.float32))
    _, doc_code = km.index.search(d_emb.astype(np.float32), 1)
    _, order = km.index.search(q_emb.astype(np.float32), k)
    return doc_code[:, 0].astype(np.int64), order.astype(np.int64), k


def two_stage(code_of_doc, probe_order, q_emb, d_emb, rel_docs, fractions=(0.01, 0.05, 0.1), k=10) -> dict:
    """Filter, then re-rank the kept passages with the teacher: recall@k and how many passages the
    re-ranker embeds per query, against the re-ranker alone over the whole corpus. The passages kept
    are those `kmer_index.py query --budget` keeps (the same probing)."""
    N = len(code_of_doc)
    offsets, members = inverted_lists(code_of_doc, probe_order.shape[1])
    out = {}
    for f in fractions:
        rec, kept = [], []
        for qi, (order, rel) in enumerate(zip(probe_order, rel_docs)):
            cand = probe_lists(order, offsets, members, limit=f * N)[1]
            top = cand[np.argsort(-(d_emb[cand] @ q_emb[qi]), kind="stable")[:k]]
            rec.append(np.isin(rel, top).mean())
            kept.append(len(cand))
        out[str(f)] = {"recall_at_k": float(np.mean(rec)), "embedded_per_query": float(np.mean(kept))}
    alone = [np.isin(rel_docs[start + i], top).mean()
             for start, sims in query_chunks(q_emb, d_emb) for i, top in enumerate(np.argsort(-sims, axis=1)[:, :k])]
    out["1.0"] = {"recall_at_k": float(np.mean(alone)), "embedded_per_query": float(N)}
    return out


# corpus IVF variants, each for the model's vectors and the peer's: (row suffix, centre, whitening power,
# lexical part); _ivf_lexical (centred, half-whitened, beside the hashed-word TF-IDF part at --lexical's weight)
# is what `kmer_index.py build` does by default
ROUTINGS = (("_ivf", False, 0.0, False), ("_ivf_centred", True, 0.0, False),
            ("_ivf_whitened", True, DEFAULT_WHITEN, False), ("_ivf_lexical", True, DEFAULT_WHITEN, True))


def kmeans_lists(d_emb: np.ndarray, q_emb: np.ndarray, K: int, seed: int, center: bool = False,
                 whiten: float = 0.0, lex: tuple | None = None, weight: float = 0.0, query_weight: float | None = None,
                 list_words: str = lexical.LIST_WORDS, list_word_power: float = lexical.LIST_WORD_POWER,
                 list_count_power: float = lexical.LIST_COUNT_POWER):
    """Spherical k-means IVF (FAISS) on any vectors: (doc list, query probe order, lists). center: first
    subtract the corpus's mean vector from passages and queries; whiten: then `kmer_index.py build --whiten`'s
    corpus-fitted scaling of the principal axes; lex = (passages', queries' lexical vectors): then beside them
    at `weight`, the queries' at `query_weight` (default: `weight`; `kmer_index.py build --lexical`, `--query_scale`;
    all three is what a build does by default). lex = (projected passages, projected queries, exact passages,
    exact queries) (`LexicalSpace.vectors`, `.sparse`): the lists are fitted on the projected part, then queries
    pick them against each list's exact centroid (its words pooled by `list_words`: each term's highest weight x
    its count ** `list_count_power`, or its sum ** `list_word_power`), as a build's `--word_routing exact` does."""
    mean, transform = routing_transform(d_emb, center, whiten)
    d_emb, q_emb = routed(d_emb, mean, transform), routed(q_emb, mean, transform)
    r_docs, r_queries = d_emb, q_emb
    q_weight = weight if query_weight is None else query_weight
    if lex is not None:
        d_emb, q_emb = lexical.joined(d_emb, lex[0], weight), lexical.joined(q_emb, lex[1], q_weight)
    code, order, k = ivf_on_teacher(lexical.unit_rows(d_emb), lexical.unit_rows(q_emb), K, seed)
    if lex is not None and len(lex) == 4:
        lists = lexical.word_lists(code, k, r_docs, lex[2], weight, list_words, list_word_power, list_count_power)
        order = np.argsort(-lexical.list_scores(r_queries, lex[3], q_weight, *lists), axis=1, kind="stable")
    return code, order, k


def model2vec_peer(teacher_path: str, fingerprint: str, cache_root: str, pca_dims: int = 256):
    """Model2Vec distilled from the same teacher (no training data), distilled once and kept on disk."""
    try:
        from model2vec import StaticModel
        from model2vec.distill import distill
    except ImportError:
        raise UserError("the Model2Vec peer needs `pip install \"model2vec[distill]\"` (in requirements.txt), "
                        "or pass --no_model2vec") from None
    folder = os.path.join(cache_root, f"model2vec_{fingerprint}_pca{pca_dims}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        t0 = time.time()
        print(f"distilling Model2Vec from the teacher (once; cached in {folder}) ...", flush=True)
        m = distill(model_name=teacher_path, pca_dims=pca_dims, device="cpu")
        tmp = folder + ".tmp"
        m.save_pretrained(tmp)
        if not os.path.exists(folder):  # another process may have finished first
            os.replace(tmp, folder)
        print(f"  Model2Vec distilled in {time.time() - t0:.0f} s", flush=True)
    return StaticModel.from_pretrained(folder)


def general_codebook_row(teacher, filt, d_emb, q_emb, rel_docs, K: int, n_windows: int, seed: int) -> dict:
    """Teacher vectors through a K-code codebook fitted on general web text rather than on the corpus:
    what a fixed codebook could reach with a perfect student."""
    from vqvae_phase1_model import spherical_kmeans
    from data_common import parse_weights
    from vqvae_phase1_train import PRESETS
    from vqvae_phase1a_data_webtext import WEBTEXT_SOURCES, eval_windows, webtext_documents
    weights = parse_weights(PRESETS["demo"]["sources"], WEBTEXT_SOURCES)  # the demo's Phase 1a mix
    docs = webtext_documents("sample", "validation", weights, cycle=False)
    windows = eval_windows(docs, filt.model.tokenizer(), n_windows)[:n_windows]
    g = teacher.embed(windows).float()
    teacher.flush()
    codebook = F.normalize(spherical_kmeans(g, min(K, len(windows)), iters=20, seed=seed)[0], dim=-1).numpy()
    row = lists_row((d_emb @ codebook.T).argmax(1), np.argsort(-(q_emb @ codebook.T), axis=1), len(codebook),
                    rel_docs)
    return {**row, "windows": len(windows)}


def plot(results: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, res in results.items():
        if name.startswith("diag_"):
            continue
        xs = [float(f) for f in res["recall_at_fraction"]]
        ax.plot(xs, list(res["recall_at_fraction"].values()), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of corpus kept")
    ax.set_ylabel("recall of relevant passages")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a Phase 2 (or 1a/1b) checkpoint")
    ap.add_argument("--dataset", default="cisi", choices=("cisi", "squad", "scitldr", "medquad", "pubmedqa",
                                                          "arxiv_titles", "beir"),
                    help="cisi, scitldr, medquad, pubmedqa, arxiv_titles: the bundled BEIR sets (data/retrieval); "
                         "beir: any, with --beir_dir")
    ap.add_argument("--beir_dir", default="", help="BEIR folder for --dataset beir")
    ap.add_argument("--squad_file", default=os.path.join(REPO, "data", "pairs", "squad_dev.jsonl.gz"),
                    help="SQuAD dev: the bundled rows, or the original dev-v1.1.json(.zip)")
    ap.add_argument("--split", default="test", help="qrels split")
    ap.add_argument("--distractors", type=int, default=0,
                    help="add this many passages of the bundled web text (Wikipedia, C4) to the corpus, judged "
                         "relevant to no query: the same queries against a larger corpus (README \"Adopted: list "
                         "centroids normalised part by part\")")
    ap.add_argument("--distractor_files", nargs="+", default=[],
                    help="take the distractors from these corpus files instead (JSONL with _id and text, or one "
                         "passage per line, as kmer_index.py build --corpus): --distractors N of their passages in a "
                         "fixed shuffle, or all of them with --distractors 0; the set's own passages are left out")
    ap.add_argument("--output_dir", default="", help="default: the checkpoint's folder")
    ap.add_argument("--teacher", default="")
    ap.add_argument("--teacher_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae", "teacher"))
    ap.add_argument("--teacher_precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 where the hardware has it, else fp32 (README 'Adopted: a bf16 teacher')")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_model2vec", action="store_true", help="skip the Model2Vec + IVF peer")
    ap.add_argument("--model2vec_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae"),
                    help="where the distilled Model2Vec peer is kept")
    ap.add_argument("--general_windows", type=int, default=0,
                    help="also report diag_teacher_general_codes: the teacher's own vectors routed through a "
                         "fixed codebook (k-means, same K) fitted on the teacher's embeddings of this many "
                         "bundled web-text windows, not on the corpus: the ceiling of any general codebook "
                         "(README 'Filter quality'); 0 = off")
    ap.add_argument("--num_lists", type=int, default=0,
                    help="lists of every IVF fitted to the corpus (teacher, Model2Vec, the model's vectors) and of "
                         "the random codes, as `kmer_index.py build --num_lists`; default: the checkpoint's codes. "
                         "The own-codes row keeps the model's codebook; the report's name gets _lists<N>")
    ap.add_argument("--list_seeds", type=int, default=1,
                    help="fit every corpus IVF row (teacher, Model2Vec, the model's vectors) with this many k-means "
                         "seeds (--seed, --seed+1, ...) and report the mean, each query's recall averaged, so "
                         "compare_evals.py pairs averages (README 'Filter evaluation': one draw moves recall at 1%% "
                         "by ~0.02); the report's name gets _seeds<N>")
    ap.add_argument("--lexical", type=float, default=lexical.DEFAULT_LEXICAL,
                    help="weight of the hashed-word TF-IDF part in the _ivf_lexical rows (the model's, the peer's; "
                         "kmer_index.py build's default) and the lexical_ivf row (the part alone); 0 = no such rows")
    ap.add_argument("--query_scale", type=float, default=lexical.QUERY_SCALE,
                    help=f"the queries' lexical part at this x --lexical in the _ivf_lexical rows, as kmer_index.py "
                         f"build (default {lexical.QUERY_SCALE:g}; 1 = as passages)")
    ap.add_argument("--idf_power", type=float, default=lexical.IDF_POWER,
                    help=f"the lexical part's word weights: idf ** this, as kmer_index.py build (default "
                         f"{lexical.IDF_POWER:g}; 1 = plain idf)")
    ap.add_argument("--word_pairs", type=float, default=lexical.PAIR_WEIGHT,
                    help=f"the lexical part's pairs of adjacent words at this x their idf ** --idf_power, as "
                         f"kmer_index.py build (default {lexical.PAIR_WEIGHT:g}; 0 = words alone)")
    ap.add_argument("--list_words", default=lexical.LIST_WORDS, choices=lexical.LIST_POOLS,
                    help="the lexical rows: each term of a list's word part at its highest weight among the list's "
                         "passages x their count ** --list_count_power (max, the default), or at its summed weight ** "
                         "--list_word_power (sum), as kmer_index.py build")
    ap.add_argument("--list_count_power", type=float, default=lexical.LIST_COUNT_POWER,
                    help=f"--list_words max: the power on the count (default {lexical.LIST_COUNT_POWER:g}; 0 = the "
                         "highest weight alone)")
    ap.add_argument("--list_word_power", type=float, default=lexical.LIST_WORD_POWER,
                    help=f"--list_words sum: the power on the sums (default {lexical.LIST_WORD_POWER:g}; 1 = the mean "
                         "TF-IDF row)")
    ap.add_argument("--word_routing", default="exact", choices=("exact", "projected"),
                    help="the lexical rows: queries pick lists against each list's exact centroid (exact, as "
                         "kmer_index.py build does by default) or against the k-means centroids on the projected words")
    ap.add_argument("--int8", action="store_true", help="encode with int8 dynamic quantisation of every Linear "
                                                       "layer (CPU; the report's name gets _int8)")
    ap.add_argument("--bag_only", action="store_true", help="encode with the weighted bag alone, skipping the "
                                                           "transformer blocks (bag_path checkpoints; name gets _bag)")
    ap.add_argument("--bf16", action="store_true", help="encode the k-mer model under bf16 autocast (fast where the "
                                                       "hardware multiplies bf16; the report's name gets _bf16)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args) -> dict:
    from teacher import Teacher, TeacherError
    from vqvae_phase1_model import CheckpointError, load_pretrained
    # 1. data
    extra = {}
    if args.dataset == "squad":
        doc_ids, docs, qids, queries, qrels, titles = load_squad(args.squad_file)
        extra["squad_eval_articles"] = titles
    else:
        if args.dataset == "beir" and not args.beir_dir:
            raise UserError("--dataset beir needs --beir_dir FOLDER (corpus.jsonl, queries.jsonl, qrels/); "
                            "--dataset cisi, scitldr, medquad, pubmedqa or arxiv_titles for the bundled ones")
        folder = args.beir_dir if args.dataset == "beir" else os.path.join(REPO, "data", "retrieval", args.dataset)
        doc_ids, docs, qids, queries, qrels = load_beir(folder, args.split)
    if args.distractors < 0:
        raise UserError(f"--distractors {args.distractors}: give a number of passages >= 0")
    more = []  # a larger corpus: the user's passages (--distractor_files) or the bundled web text beside the set's
    if args.distractor_files:
        more = file_distractors(args.distractor_files, args.distractors, docs)
        extra["distractor_files"] = [os.path.abspath(p) for p in args.distractor_files]
    elif args.distractors:
        titles = ({json.loads(l)["title"] for l in _open(args.squad_file)} if args.dataset == "squad" else ())
        more = web_distractors(args.distractors, titles)
    if args.distractor_files or args.distractors:
        doc_ids, docs = doc_ids + [f"distractor:{i}" for i in range(len(more))], docs + more
        extra["distractors"] = len(more)
    index = {d: i for i, d in enumerate(doc_ids)}
    rel_docs = [np.array(sorted(index[d] for d in qrels[q])) for q in qids]
    source = "of your distractor files" if args.distractor_files else "bundled web text"
    print(f"{args.dataset}: {len(docs)} passages{f' ({len(more):,} of them {source})' if more else ''}, "
          f"{len(queries)} queries with relevant passages")

    # 2. student codes
    try:
        filt = load_pretrained(args.checkpoint)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if args.int8 or args.bag_only or args.bf16:
        try:
            filt = filt.inference_variant(int8=args.int8, bag_only=args.bag_only, bf16=args.bf16)
        except ValueError as e:
            raise UserError(str(e)) from None
    K = filt.model.config.num_codes
    if args.num_lists < 0:
        raise UserError(f"--num_lists {args.num_lists}: give a number of lists >= 1, or 0 for the checkpoint's "
                        f"{K} codes")
    L = args.num_lists or K  # lists of the corpus-fitted IVFs and the random codes
    if args.lexical < 0:
        raise UserError(f"--lexical {args.lexical:g}: give a weight >= 0 (0 = no lexical rows)")
    try:
        lexical.check_settings(args.idf_power, args.query_scale, args.word_pairs, args.list_word_power,
                               args.list_count_power)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.list_seeds < 1:
        raise UserError(f"--list_seeds {args.list_seeds}: give 1 or more k-means draws")
    t0 = time.time()
    p_out = filt.encode(docs, role="passage")
    student_pps = len(docs) / (time.time() - t0)
    q_out = filt.encode(queries, role="query", top_n=K)
    doc_code = p_out["indices"].numpy()
    results = {}
    results["kmer_vqvae"] = lists_row(doc_code, q_out["top_indices"].numpy(), K, rel_docs)

    # 3. anchors: IVF on teacher, random, exact teacher
    try:
        teacher = Teacher.load(args.teacher, args.device, args.teacher_cache or None, precision=args.teacher_precision)
    except TeacherError as e:
        raise UserError(str(e)) from None
    sample = docs[:128]
    t0 = time.time()
    teacher.encode_uncached(sample)
    teacher_pps = len(sample) / (time.time() - t0)
    d_emb = teacher.embed(docs).float().numpy()
    q_emb = teacher.embed(queries).float().numpy()
    teacher.flush()
    seeds = range(args.seed, args.seed + args.list_seeds)  # k-means draws of every corpus-fitted IVF row
    # the lexical part of the lists (word statistics fitted to this corpus, as kmer_index.py build does)
    routings = [r for r in ROUTINGS if not r[3] or args.lexical]
    q_weight = args.lexical * args.query_scale  # a query's lexical part picks lists at this, as in kmer_index.py
    # and each list's words pooled as a build pools them
    pooled = dict(list_words=args.list_words, list_word_power=args.list_word_power,
                  list_count_power=args.list_count_power)
    lex = None
    if args.lexical:
        words = lexical.LexicalSpace.fit(docs, idf_power=args.idf_power, pair_weight=args.word_pairs)
        lex = (words.encode(docs), words.encode(queries))
        if args.word_routing == "exact":  # queries meet the lists' words unprojected, as a build does
            lex += (words.encode_sparse(docs), words.encode_sparse(queries))
        none = np.zeros((len(docs), 0), np.float32), np.zeros((len(queries), 0), np.float32)
        results["lexical_ivf"] = seeded_lists_row(lambda s: kmeans_lists(*none, L, s, lex=lex, weight=1.0,
                                                                       **pooled), seeds,
                                                  rel_docs)[0]
    results["ivf_teacher"] = seeded_lists_row(lambda s: ivf_on_teacher(d_emb, q_emb, L, s), seeds, rel_docs)[0]
    speed = {"kmer_vqvae": student_pps, "teacher": teacher_pps, "ratio": student_pps / teacher_pps,
             "teacher_precision": teacher.precision}
    # the cheap-encoder peer: Model2Vec from the same teacher + IVF with the same number of lists
    if not args.no_model2vec:
        from teacher import resolve_teacher
        path, fingerprint, _ = resolve_teacher(args.teacher)
        m2v = model2vec_peer(path, fingerprint, args.model2vec_cache)
        t0 = time.time()
        m_docs = m2v.encode(docs)
        speed["model2vec"] = len(docs) / (time.time() - t0)
        speed["ratio_vs_model2vec"] = student_pps / speed["model2vec"]
        m_queries = m2v.encode(queries)
        for key, center, whiten, lexed in routings:
            results["model2vec" + key] = seeded_lists_row(
                lambda s: kmeans_lists(m_docs, m_queries, L, s, center, whiten, lex if lexed else None, args.lexical,
                                       q_weight, **pooled),
                seeds, rel_docs)[0]
    # the model's vectors with lists fitted to this corpus, exactly as the peers' IVF is built (what
    # `kmer_index.py --lists corpus` does); then where recall is lost: exact search on the model's own
    # code-space vectors, and teacher queries against its decoded passages (teacher space)
    p_raw, q_raw = p_out["z_code_raw"].numpy(), q_out["z_code_raw"].numpy()  # what kmer_index routes on
    own_lists = {}
    for key, center, whiten, lexed in routings:
        results["kmer_vqvae" + key], own_lists[key] = seeded_lists_row(
            lambda s: kmeans_lists(p_raw, q_raw, L, s, center, whiten, lex if lexed else None, args.lexical,
                                   q_weight, **pooled),
            seeds, rel_docs)
    # the first draw's lists as kmer_index builds them by default (with the lexical part unless --lexical 0)
    report_two_stage = two_stage(*own_lists["_ivf_lexical" if args.lexical else "_ivf_whitened"][:2], q_emb, d_emb,
                                 rel_docs)
    results["diag_exact_own_vectors"] = exact_row(q_out["z_code"].numpy(), p_out["z_code"].numpy(), rel_docs)
    with torch.no_grad():
        p_dec = F.normalize(filt.model.decode(p_out["z_code"]), dim=-1).numpy()
    results["diag_teacher_q_x_own_p"] = exact_row(q_emb, p_dec, rel_docs)
    results["diag_decoded_cos"] = {"passages": float((p_dec * d_emb).sum(1).mean())}
    if args.general_windows:
        results["diag_teacher_general_codes"] = general_codebook_row(teacher, filt, d_emb, q_emb, rel_docs, K,
                                                                     args.general_windows, args.seed)
    rng = np.random.default_rng(args.seed)
    rand_code = rng.integers(L, size=len(docs))
    rand_order = np.stack([rng.permutation(L) for _ in queries])
    results["random"] = lists_row(rand_code, rand_order, L, rel_docs)
    results["exact_teacher"] = exact_row(q_emb, d_emb, rel_docs)

    # 4. report
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out_dir, exist_ok=True)
    report = {"dataset": args.dataset, "checkpoint": os.path.abspath(args.checkpoint), "int8": args.int8,
              "bag_only": args.bag_only, "bf16": args.bf16, "lists": L, "list_seeds": args.list_seeds,
              "lexical": args.lexical, "lexical_dims": lexical.DIMS, "lexical_idf_power": args.idf_power,
              "lexical_pair_weight": args.word_pairs,
              "lexical_query_scale": args.query_scale, "word_routing": args.word_routing,
              "lexical_list_words": args.list_words, "lexical_list_word_power": args.list_word_power,
              "lexical_list_count_power": args.list_count_power,
              "passages": len(docs),
              "query_set": hashlib.sha1("\n".join(map(str, qids)).encode()).hexdigest(),
              "queries": len(queries), "methods": results,
              "passages_per_s": speed, "two_stage_recall_at_10": report_two_stage, **extra}
    # named by checkpoint and dataset: evaluations of different checkpoints or sets never overwrite each other
    name = args.dataset if args.dataset != "beir" else os.path.basename(os.path.normpath(args.beir_dir))
    stem = (os.path.splitext(os.path.basename(args.checkpoint))[0] + "_int8" * args.int8 + "_bag" * args.bag_only
            + "_bf16" * args.bf16 + (f"_lists{L}" if L != K else "")
            + (f"_seeds{args.list_seeds}" if args.list_seeds > 1 else ""))
    name += (f"+{'files' if args.distractor_files else 'web'}{len(more)}" if more else "")
    json_path = os.path.join(out_dir, f"{stem}_{name}_filter_eval.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = json_path.replace(".json", ".png")
    plot(results, png_path, f"{args.dataset}: {len(docs)} passages, {len(queries)} queries")
    print(format_table(report))
    print(f"wrote {json_path} and {png_path}")
    report["json"], report["png"] = json_path, png_path
    return report


def format_table(report: dict) -> str:
    fr = list(report["methods"]["kmer_vqvae"]["recall_at_fraction"])
    head = "| method | " + " | ".join(f"R@{float(f) * 100:g}%" for f in fr) + " | corpus ppl | lists |"
    lines = [head, "|" + "---|" * (len(fr) + 3)]
    for name, res in report["methods"].items():
        if "recall_at_fraction" not in res:
            continue
        ppl = f"{res['perplexity']:.0f}" if "perplexity" in res else "-"
        lines.append(f"| {name} | " + " | ".join(f"{res['recall_at_fraction'][f]:.3f}" for f in fr)
                     + f" | {ppl} | {res.get('codes', '-')} |")
    ts = report.get("two_stage_recall_at_10", {})
    if ts:
        lines.append("filter (k-mer + IVF) then teacher re-rank, recall@10 / passages embedded per query: " + ", ".join(
            f"{float(f):.0%} kept {v['recall_at_k']:.3f} / {v['embedded_per_query']:.0f}" for f, v in ts.items()))
    sp = report["passages_per_s"]
    lines.append(f"passages/s: k-mer {sp['kmer_vqvae']:.0f}, teacher {sp['teacher']:.1f}"
                 f"{' (' + sp['teacher_precision'] + ')' if 'teacher_precision' in sp else ''} "
                 f"(ratio {sp['ratio']:.1f}x)" + (f", Model2Vec {sp['model2vec']:.0f} (k-mer / Model2Vec "
                                                    f"{sp['ratio_vs_model2vec']:.2f}x)" if "model2vec" in sp else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
