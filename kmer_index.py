"""Index a corpus with a trained filter, then query it: the candidate passages in a query's nearest
lists, optionally re-ranked by the teacher (two-stage retrieval).

    python kmer_index.py build --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt \
        --corpus data/retrieval/cisi/corpus.jsonl.gz --index runs/demo/cisi_index
    python kmer_index.py build --checkpoint ... --corpus more.jsonl --index runs/demo/cisi_index --append
    python kmer_index.py query --index runs/demo/cisi_index --query "how are library books classified?" \
        --budget 0.05 --rerank --top_k 10

Corpus: JSONL with `_id` and `text` (BEIR's corpus.jsonl, `title` prepended when present; .gz too) or
plain text, one passage per line (the id is the line number). Passages stream from disk in batches.

Index folder (no pickle; numpy arrays and JSON): `index.json` (format, the checkpoint's sha256,
lists, corpus files), `centroids.npy` (K, d) float32, `codes.npy` (N,) int32, `ids.json`,
`sources.npy` (N, 2) int64 (corpus file number, line number: for re-ranking),
`list_offsets.npy` (K+1,) and `list_members.npy` (N,): the inverted lists (CSR).
`--lists corpus` (default) fits K lists to the corpus's vectors by spherical k-means, as FAISS IVF
does, after subtracting the corpus's mean vector (`center.npy`, subtracted from queries too; `--no_center`
skips it), then half-whitening it (`transform.npy`: each principal axis of the centred corpus scaled by
variance^(-P/2), P = `--whiten`, 0.5 by default, 0 = off); `--lists model` uses the model's own codebook
(no fitting pass, no transform; README "Filter quality").
`--lexical W` (corpus lists; default 1.25, 0 = off): the routed vector is the model's (centred, half-whitened,
unit) beside W x a unit hashed-word TF-IDF vector (`lexical.py`; words weighted by idf ** `--idf_power`, 2 by
default, and each pair of adjacent words beside them at `--word_pairs` (0.7) x its idf ** power), with document
frequencies counted on the corpus (`lexical_df.npy`); queries route the same way from their text, their lexical
part at `--query_scale` (12) x W (README "Adopted: a lexical part in the lists", "Adopted: idf squared in the
lexical part", "Adopted: word pairs in the lexical part"). k-means fits the lists on the words projected to
2,048 dims; queries then pick lists against each list's exact centroid (`list_vectors.npy` (K, d) and
`list_words_{indptr,cols,vals}.npy`, the list's words unprojected; `--word_routing projected` skips them: README
"Adopted: queries meet the lists' words exactly"): its passages' mean vector direction beside W x the direction
of their words, each term at its highest weight among the list's passages x (the passages holding it) **
`--list_count_power` (0.25; `--list_words sum`: each term's summed weight ** `--list_word_power`, 0.5), each part
normalised on its own (README "Adopted: list centroids normalised part by part", "Adopted: a list's words at their
highest weight").
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np

import lexical
from train_common import UserError

INDEX_FORMAT = "kmer-index/1"
# corpus lists: the whitening power a build uses unless told (README "Filter quality": chosen on SQuAD, CISI
# and SciTLDR, confirmed on held-out MedQuAD pairs and on corpora of 128 to 1,024 passages)
DEFAULT_WHITEN = 0.5


def lexical_weight(requested, lists: str) -> float:
    """The weight of the lexical part: as asked, else DEFAULT_LEXICAL for corpus lists (the model's own codebook
    has no room for one)."""
    if requested is None:
        return lexical.DEFAULT_LEXICAL if lists == "corpus" else 0.0
    if requested < 0 or (requested and lists == "model"):
        raise UserError(f"--lexical {requested:g}: give a weight >= 0 (0 = off), with --lists corpus (the lexical "
                        f"part needs lists fitted to it)")
    return float(requested)


def whitening_power(requested, lists: str, no_center: bool) -> float:
    """The power a build uses: an explicit --whiten as given; by default DEFAULT_WHITEN for lists fitted to a
    centred corpus, 0 with the model's own codes or --no_center."""
    if requested is not None:
        return float(requested)
    return 0.0 if lists == "model" or no_center else DEFAULT_WHITEN


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_corpus(path: str, file_no: int = 0, batch: int = 512, id_field: str = "_id", text_field: str = "text"):
    """Yields lists of (id, text, (file_no, line_no)); JSONL when the name says .jsonl, else lines."""
    if not os.path.isfile(path):
        raise UserError(f"corpus not found: {path}")
    is_jsonl = ".jsonl" in os.path.basename(path)
    out = []
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if is_jsonl:
                try:
                    row = json.loads(line)
                    text = row[text_field]
                    if text_field == "text" and row.get("title"):  # BEIR: the title belongs to the passage
                        text = f"{row['title']}. {text}"
                    pid = str(row[id_field])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}, line {n}: not a corpus record with '{id_field}' and '{text_field}' "
                                    f"({type(e).__name__}); fix that line and build again") from None
            else:
                pid, text = str(n), line
            out.append((pid, text, (file_no, n)))
            if len(out) == batch:
                yield out
                out = []
    if out:
        yield out


def _write_atomic(folder: str, name: str, write):
    """write(file) into .tmp_<name>, fsync, then rename over <name>: a crash leaves the old file."""
    tmp = os.path.join(folder, f".tmp_{name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, name))


def _save_npy(folder: str, name: str, arr: np.ndarray):
    _write_atomic(folder, name, lambda f: np.save(f, arr))


def _save_json(folder: str, name: str, obj):
    _write_atomic(folder, name, lambda f: f.write(json.dumps(obj).encode("utf-8")))


def inverted_lists(codes: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    members = np.argsort(codes, kind="stable").astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(np.bincount(codes, minlength=K)))).astype(np.int64)
    return offsets, members


def probe_lists(order: np.ndarray, offsets: np.ndarray, members: np.ndarray, n_probe: int = 0,
                limit: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Lists nearest-first (`order`): the first n_probe, or else lists until `limit` passages are kept
    (the list that crosses it included). -> (lists probed, their passages)."""
    if not n_probe:
        n_probe = int(np.searchsorted(np.cumsum(np.diff(offsets)[order]), limit)) + 1
    probe = order[:n_probe]
    return probe, np.concatenate([members[offsets[k]:offsets[k + 1]] for k in probe])


def routed(vectors: np.ndarray, center, transform=None) -> np.ndarray:
    """Vectors as routed: minus the index's corpus mean when it has one, then through its whitening
    matrix when it has one."""
    out = vectors if center is None else vectors - center
    return out if transform is None else out @ transform


def routing_transform(sample: np.ndarray, center: bool = True, whiten: float = 0.0):
    """(mean or None, matrix or None) fitted to a corpus sample: vectors route as (v - mean) @ matrix.
    whiten p > 0 scales each principal axis of the centred sample by its variance ** (-p / 2): p = 1
    whitens, p = 0.5 (half-whitening) divides each axis by the fourth root of its variance, so the few
    directions that every passage of a one-domain corpus varies along most stop deciding all its lists
    (README "Filter quality"). Variances are floored at 1e-4 of the largest, so axes the sample hardly
    spans are not blown up."""
    mean = sample.mean(0) if center or whiten else None
    if not whiten:
        return mean, None
    x = (sample - mean).astype(np.float64)
    vals, vecs = np.linalg.eigh(x.T @ x / max(1, len(x) - 1))
    vals = np.clip(vals, vals.max() * 1e-4, None)
    return mean, ((vecs * vals ** (-whiten / 2)) @ vecs.T).astype(np.float32)


def default_lists(n: int, codes: int) -> int:
    """`build --num_lists 0`: the model's number of codes, or for a larger corpus the power of two nearest 4 x
    sqrt(n) passages (an IVF's usual size), whichever is more. A list then holds ~sqrt(n) / 4 passages at most:
    at 51,142 passages 1,024 lists kept 0.861 / 0.961 of the relevant passages at 1% / 5% against 0.685 / 0.897 for
    256, lists' words then at their mean row (README "Adopted: lists that grow with the corpus")."""
    return max(codes, 2 ** int(round(np.log2(4 * np.sqrt(max(n, 1))))))


class Index:
    """An index in memory: centroids, codes, ids, sources; `search` gives candidate passages."""

    def __init__(self, meta: dict, centroids, codes, ids, sources, center=None, transform=None, lexical_df=None,
                 word_lists=None):
        self.meta, self.centroids, self.codes, self.ids, self.sources = meta, centroids, codes, ids, sources
        self.word_lists = word_lists  # (dense (K, d), csr (K, WIDTH)): exact list centroids; None = projected
        self._words_t = None  # word_lists' words transposed, (WIDTH, K) csr: made once, on the first query
        self.center = center  # (d,) subtracted from every vector before routing; None = no centring
        self.transform = transform  # (d, d) applied after centring (--whiten); None = none
        self.lexical_weight = float(meta.get("lexical", 0.0))  # 0: the model's vectors alone
        self.query_scale = float(meta.get("lexical_query_scale", 1.0))  # built before the scale: queries as passages
        self.lexical = None if lexical_df is None else lexical.LexicalSpace(  # built before idf powers: plain idf;
            lexical_df, meta["lexical_docs"], meta["lexical_dims"], meta.get("lexical_idf_power", 1.0),  # before
            meta.get("lexical_pair_weight", 0.0))  # word pairs: words alone
        self.offsets, self.members = inverted_lists(codes, len(centroids))

    @classmethod
    def load(cls, folder: str, checkpoint_sha: str | None = None) -> "Index":
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise UserError(f"{folder} is not an index (no index.json): build one with `kmer_index.py build`")
        meta = json.load(open(path))
        if meta.get("format") != INDEX_FORMAT:
            raise UserError(f"{folder} has index format {meta.get('format')!r}, not {INDEX_FORMAT!r}: rebuild it")
        ld = lambda n: np.load(os.path.join(folder, n), allow_pickle=False)
        opt = lambda n: ld(n) if os.path.isfile(os.path.join(folder, n)) else None
        words = None
        if os.path.isfile(os.path.join(folder, "list_vectors.npy")):
            from scipy.sparse import csr_matrix
            dense = ld("list_vectors.npy")
            words = (dense, csr_matrix((ld("list_words_vals.npy"), ld("list_words_cols.npy"),
                                        ld("list_words_indptr.npy")), shape=(len(dense), lexical.WIDTH)))
        index = cls(meta, ld("centroids.npy"), ld("codes.npy"), json.load(open(os.path.join(folder, "ids.json"))),
                    ld("sources.npy"), opt("center.npy"), opt("transform.npy"), opt("lexical_df.npy"), words)
        if checkpoint_sha:
            index.check_checkpoint(checkpoint_sha, folder)
        return index

    def check_checkpoint(self, checkpoint_sha: str, folder: str):
        """Refuse a model other than the one that built the index (one line)."""
        if checkpoint_sha != self.meta["checkpoint_sha256"]:
            raise UserError(f"{folder} was built by checkpoint {self.meta['checkpoint_sha256'][:12]}..., not this "
                            f"one ({checkpoint_sha[:12]}...): its codes mean nothing to this model; rebuild the index")

    def save(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        for name, arr in (("centroids.npy", self.centroids.astype(np.float32)), ("codes.npy", self.codes.astype(np.int32)),
                          ("sources.npy", self.sources.astype(np.int64)), ("list_offsets.npy", self.offsets),
                          ("list_members.npy", self.members)):
            _save_npy(folder, name, arr)
        for name, arr in (("center.npy", self.center), ("transform.npy", self.transform)):
            if arr is not None:
                _save_npy(folder, name, arr.astype(np.float32))
        if self.lexical is not None:
            _save_npy(folder, "lexical_df.npy", self.lexical.stored_df())
        if self.word_lists is not None:
            dense, words = self.word_lists
            for name, arr in (("list_vectors.npy", dense.astype(np.float32)), ("list_words_vals.npy", words.data),
                              ("list_words_cols.npy", words.indices.astype(np.int32)),
                              ("list_words_indptr.npy", words.indptr.astype(np.int64))):
                _save_npy(folder, name, arr)
        _save_json(folder, "ids.json", self.ids)
        _save_json(folder, "index.json", {**self.meta, "passages": len(self.ids)})  # last: marks it complete

    def route(self, vectors: np.ndarray, texts: list[str] | None = None, query: bool = False) -> np.ndarray:
        """The vectors the lists are fitted to and searched with: centred and whitened as the index is, then,
        for an index with a lexical part, at unit norm beside its weight x the texts' lexical vectors (queries:
        the weight x `lexical_query_scale`)."""
        v = routed(vectors, self.center, self.transform)
        if self.lexical is None:
            return v
        return lexical.joined(v, self.lexical.encode(texts), self._text_weight(texts, len(v), query))

    def _text_weight(self, texts: list[str] | None, n: int, query: bool) -> float:
        """The lexical part's weight for these texts (queries: x `lexical_query_scale`); one clear error when an
        index with a lexical part is not given the texts."""
        if texts is None or len(texts) != n:
            raise ValueError("this index routes on text too (a lexical part): pass the texts beside the vectors")
        return self.lexical_weight * (self.query_scale if query else 1.0)

    def list_scores(self, vectors: np.ndarray, texts: list[str] | None = None, query: bool = False) -> np.ndarray:
        """(n, K): how near each text is to each list (higher = nearer). With exact word lists: the routed vector
        and the texts' unprojected words against each list's exact centroid; else the routed vector against
        the k-means centroids."""
        if self.word_lists is None:
            return self.route(vectors, texts, query) @ self.centroids.T
        weight = self._text_weight(texts, len(vectors), query)
        if self._words_t is None:
            self._words_t = self.word_lists[1].T.tocsr()
        return lexical.list_scores(routed(vectors, self.center, self.transform), self.lexical.encode_sparse(texts),
                                   weight, *self.word_lists, self._words_t)

    def search(self, q_vec: np.ndarray, n_probe: int = 0, budget: float = 0.0,
               texts: list[str] | None = None) -> list[dict]:
        """Per query: probe the nearest lists until n_probe lists, or until `budget` passages (a count,
        or a fraction of the corpus when < 1) are kept. `texts`: the queries, for an index with a lexical part."""
        N = len(self.codes)
        limit = budget * N if 0 < budget < 1 else budget
        out = []
        for order in np.argsort(-self.list_scores(q_vec, texts, query=True), axis=1, kind="stable"):
            probe, cand = probe_lists(order, self.offsets, self.members, n_probe, limit)
            out.append({"codes": probe.tolist(), "candidates": cand, "fraction_kept": len(cand) / max(1, N)})
        return out


def _sha(path: str) -> str:
    from vqvae_phase1_model import file_sha256
    return file_sha256(path)


def encode_vectors(filt, texts: list[str], role: str, space: str = "z_code_raw") -> np.ndarray:
    """The vectors an index routes on: code space before normalisation (`z_code_raw`). Spherical lists see
    the same directions as `z_code`; the corpus centring and whitening see the encoder's own geometry.
    Indexes built before it (no "vectors" in index.json) routed on `z_code` and keep doing so."""
    return filt.encode(texts, role=role)[space].numpy().astype(np.float32)


def vector_space(meta: dict | None) -> str:
    """The vectors an index was built on: `z_code_raw`, or `z_code` for indexes that predate it."""
    return "z_code_raw" if meta is None else meta.get("vectors", "z_code")


DEFAULT_PRECISION = "auto"  # of `build`: bf16 where the hardware multiplies bf16


def set_precision(filt, precision: str) -> str:
    """Encode under bf16 autocast where `precision` resolves to bf16 ("auto": where the hardware multiplies
    bf16, README "Inference"); -> the precision used."""
    from teacher import resolve_precision
    used = resolve_precision(precision, str(next(filt.model.parameters()).device))
    filt.bf16 = used == "bf16"
    return used


ENCODERS = ("full", "bag")  # the whole model, or the weighted bag of k-mer embeddings alone (no blocks)


def prepare_encoder(filt, encoder: str, precision: str):
    """-> (the filter to encode with, the precision used). `bag`: the weighted bag alone, the transformer
    blocks (and Phase 1b's LoRA in them) skipped, Phase 2's adapters kept (README "Index a corpus":
    level recall, ~1.6x the passages/s); bf16 autocast where `precision` resolves to bf16."""
    if encoder == "bag":
        try:
            filt = filt.inference_variant(bag_only=True)
        except ValueError as e:
            raise UserError(f"--encoder bag: {e}; use --encoder full with this checkpoint") from None
    return filt, set_precision(filt, precision)


def built_encoding(meta: dict) -> tuple[str, str]:
    """How an index encoded its passages, (encoder, precision); indexes from before these options: full, fp32."""
    return meta.get("encoder", "full"), meta.get("precision", "fp32")


def build(args) -> Index:
    """Encode every passage (the Phase 2 passage adapter when there is one) and assign its list. Passages
    stream from disk; with lists fitted to the corpus their vectors wait in a float16 file on disk (not in
    memory) while k-means fits on up to --fit_sample of them, then are assigned chunk by chunk."""
    from tqdm.auto import tqdm
    from vqvae_phase1_model import CheckpointError, load_pretrained, spherical_kmeans
    import torch
    try:
        filt = load_pretrained(args.checkpoint)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if args.whiten is not None and (args.whiten < 0 or (args.whiten and args.lists == "model")):
        raise UserError(f"--whiten {args.whiten:g}: give a power >= 0 (0.5 = half-whitening), with --lists corpus "
                        f"(it is fitted to the corpus)")
    if args.num_lists < 0:
        raise UserError(f"--num_lists {args.num_lists}: give a number of lists >= 1, or 0 for the default (the model's "
                        f"codes, more for a large corpus)")
    weight = lexical_weight(getattr(args, "lexical", None), args.lists)
    try:
        lexical.check_settings(args.idf_power, args.query_scale, args.word_pairs, args.list_word_power,
                               args.list_count_power)
    except ValueError as e:
        raise UserError(str(e)) from None
    sha = _sha(args.checkpoint)
    old = Index.load(args.index, sha) if args.append else None
    # an appended corpus encodes as the index was built
    encoder, precision = built_encoding(old.meta) if old is not None else (args.encoder, args.precision)
    filt, precision = prepare_encoder(filt, encoder, precision)
    if not args.append and os.path.isfile(os.path.join(args.index, "index.json")) and not args.overwrite:
        raise UserError(f"{args.index} already holds an index: pass --append to add passages, or --overwrite")
    files = (old.meta["corpus_files"] if old else []) + [os.path.abspath(c) for c in args.corpus]
    centroids = old.centroids if old is not None else None
    center, transform = (old.center, old.transform) if old is not None else (None, None)
    whiten = float(old.meta.get("whiten", 0.0)) if old is not None else 0.0  # a corpus fit below sets its own
    vectors = vector_space(old.meta if old is not None else None)  # an appended corpus routes as the index does
    if centroids is None and args.lists == "model":
        centroids = filt.model.quantizer._codes().detach().numpy().astype(np.float32)
    os.makedirs(args.index, exist_ok=True)
    spool = os.path.join(args.index, ".tmp_vectors.f16")  # corpus lists: vectors wait here, not in memory
    lex_spool = os.path.join(args.index, ".tmp_words.i64")  # and each passage's (word bucket, count) pairs
    space, lex_sizes, word_cache = lexical.LexicalSpace(idf_power=args.idf_power, pair_weight=args.word_pairs), [], {}
    ids, sources, codes, dim = [], [], [], 0
    word_lists = old.word_lists if old is not None else None
    seen = set(old.meta.get("text_hashes", [])) if old is not None else set()
    fields = dict(id_field=args.id_field, text_field=args.text_field)
    try:
        with open(spool, "wb") as sp, open(lex_spool, "wb") as lsp, \
                tqdm(desc="encoding passages", unit=" passages") as bar:
            for c in args.corpus:  # the bar's line ends before any error line
                for chunk in read_corpus(c, files.index(os.path.abspath(c)), args.batch_size, **fields):
                    if args.unique_text:  # e.g. SQuAD rows: one per question, the passage repeated
                        chunk = [r for r in chunk if not (hash_text(r[1]) in seen or seen.add(hash_text(r[1])))]
                        if not chunk:
                            continue
                    texts = [t for _, t, _ in chunk]
                    v = encode_vectors(filt, texts, "passage", vectors)
                    dim = v.shape[1]
                    if centroids is not None:  # appended (routed as the index routes) or the model's codebook
                        scores = old.list_scores(v, texts) if old is not None else v @ centroids.T
                        codes.append(scores.argmax(1).astype(np.int32))
                    else:
                        sp.write(v.astype(np.float16).tobytes())
                        if weight:
                            if len(word_cache) > 1_000_000:  # term -> id memo; bounded on huge corpora
                                word_cache.clear()
                            bags = [space.bag(t, word_cache) for t in texts]
                            space.count(bags)
                            for buckets, counts in bags:
                                lsp.write(np.stack([buckets, counts], 1).astype(np.int64).tobytes())
                            lex_sizes += [len(buckets) for buckets, _ in bags]
                    ids += [i for i, _, _ in chunk]
                    sources += [s for _, _, s in chunk]
                    bar.update(len(chunk))
        if not ids:
            raise UserError(f"no passages in {', '.join(args.corpus)}")
        if centroids is None:
            V = np.memmap(spool, dtype=np.float16, mode="r", shape=(len(ids), dim))
            rng = np.random.default_rng(args.seed)
            fit = np.sort(rng.choice(len(ids), min(len(ids), args.fit_sample), replace=False))
            K = min(args.num_lists or default_lists(len(ids), filt.model.config.num_codes), len(fit))
            sample = np.asarray(V[fit], dtype=np.float32)
            # the corpus's mean vector: a one-domain corpus shares a large common direction that would
            # otherwise dominate the cosine between its passages (README "Filter quality")
            whiten = whitening_power(args.whiten, args.lists, args.no_center)
            center, transform = routing_transform(sample, not args.no_center, whiten)
            words_at = np.concatenate(([0], np.cumsum(lex_sizes))).astype(np.int64)
            n_pairs = os.path.getsize(lex_spool) // 16  # read from disk as needed, like the vectors
            pairs = (np.memmap(lex_spool, dtype=np.int64, mode="r", shape=(n_pairs, 2)) if n_pairs
                     else np.zeros((0, 2), np.int64))

            def route(rows: np.ndarray, v: np.ndarray):  # passages `rows`, their vectors v
                """-> (the vectors k-means sees, the routed vectors, the exact words or None)"""
                r = routed(v, center, transform)
                if not weight:
                    return r, r, None
                x = space.sparse([(p[:, 0], p[:, 1]) for p in (pairs[words_at[i]:words_at[i + 1]] for i in rows)])
                return lexical.joined(r, space.project(x), weight), r, x

            centroids = spherical_kmeans(torch.from_numpy(route(fit, sample)[0]), K, seed=args.seed)[0].numpy()
            step, sums = 16384, None
            for i in range(0, len(ids), step):  # assign, and with exact word routing sum each list's centroid
                joint, r, x = route(np.arange(i, min(i + step, len(ids))), np.asarray(V[i:i + step], dtype=np.float32))
                codes.append((joint @ centroids.T).argmax(1).astype(np.int32))
                if x is not None and args.word_routing == "exact":
                    part = lexical.list_sums(codes[-1], K, r, x, args.list_words)
                    sums = part if sums is None else lexical.add_list_sums(sums, part)
            if sums is not None:
                word_lists = lexical.unit_lists(*sums, weight, args.list_word_power, args.list_count_power)
            del V, pairs
    finally:
        for path in (spool, lex_spool):
            if os.path.exists(path):
                os.unlink(path)
    codes = np.concatenate(codes)
    meta = {"format": INDEX_FORMAT, "checkpoint": os.path.abspath(args.checkpoint), "checkpoint_sha256": sha,
            "lists": old.meta["lists"] if old else args.lists, "num_lists": int(len(centroids)),
            "corpus_files": files, "role": "passage" if filt.adapters is not None else None,
            "centred": center is not None, "whiten": whiten, "vectors": vectors,
            "precision": precision, "encoder": encoder, **fields}
    lexical_df = None
    if old is not None and old.lexical is not None:  # an appended corpus keeps the index's word statistics
        lexical_df = old.lexical.df
        meta.update({k: old.meta[k] for k in ("lexical", "lexical_dims", "lexical_docs", "lexical_idf_power",
                                              "lexical_pair_weight", "lexical_query_scale") if k in old.meta})
    elif old is None and weight:
        lexical_df = space.df
        meta.update(lexical=weight, lexical_dims=space.dims, lexical_docs=space.n_docs,
                    lexical_idf_power=space.idf_power, lexical_pair_weight=space.pair_weight,
                    lexical_query_scale=args.query_scale)
    if args.unique_text:
        meta["text_hashes"] = sorted(seen)
    sources = np.asarray(sources, dtype=np.int64).reshape(-1, 2)
    if old is not None:
        codes, ids, sources = np.concatenate([old.codes, codes]), old.ids + ids, np.concatenate([old.sources, sources])
    if word_lists is not None:  # an appended corpus keeps the index's word lists, and says so
        meta["word_routing"] = "exact"
        # how the lists' exact centroids were normalised (before: "joint", both parts together, and no field;
        # stored centroids route as built either way) and how their words were pooled: "max" with the power on
        # the count, "sum" with the power on the sums (before pools: "sum", and before the power: 1, no fields)
        meta["word_lists_norm"] = old.meta.get("word_lists_norm", "joint") if old is not None else "parts"
        meta["list_words"] = old.meta.get("list_words", "sum") if old is not None else args.list_words
        if meta["list_words"] == "sum":
            meta["list_word_power"] = (old.meta.get("list_word_power", 1.0) if old is not None
                                       else float(args.list_word_power))
        else:
            meta["list_count_power"] = (old.meta["list_count_power"] if old is not None
                                        else float(args.list_count_power))
    index = Index(meta, centroids, codes, ids, sources, center, transform, lexical_df, word_lists)
    index.save(args.index)
    return index


def hash_text(text: str) -> str:
    import hashlib
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:16]


def passage_texts(index: Index, rows: np.ndarray) -> list[str]:
    """The texts of passages `rows`, read back from the corpus files (for re-ranking)."""
    want: dict[int, dict[int, int]] = {}
    for r in rows:
        f, line = index.sources[r]
        want.setdefault(int(f), {})[int(line)] = int(r)
    texts: dict[int, str] = {}
    for f, lines in want.items():
        fields = {k: index.meta[k] for k in ("id_field", "text_field") if k in index.meta}
        for chunk in read_corpus(index.meta["corpus_files"][f], f, 4096, **fields):
            for _, text, (_, line) in chunk:
                if line in lines:
                    texts[lines[line]] = text
    return [texts[int(r)] for r in rows]


def query(args) -> list[dict]:
    from vqvae_phase1_model import CheckpointError, load_pretrained
    index = Index.load(args.index)
    ckpt = args.checkpoint or index.meta["checkpoint"]
    try:
        filt = load_pretrained(ckpt)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    index.check_checkpoint(_sha(ckpt), args.index)
    encoder, precision = built_encoding(index.meta)  # default: encode queries as the index encoded its passages
    filt, _ = prepare_encoder(filt, args.encoder or encoder, args.precision or precision)
    queries = list(args.query) + ([l.strip() for l in _open(args.queries) if l.strip()] if args.queries else [])
    if not queries:
        raise UserError("give --query TEXT (repeatable) or --queries FILE (one query per line)")
    if not args.n_probe and not args.budget:
        args.n_probe = 4
    hits = index.search(encode_vectors(filt, queries, "query", vector_space(index.meta)), args.n_probe, args.budget,
                        texts=queries)
    reranker = None
    if args.rerank:
        from teacher import Teacher
        reranker = Teacher.load("" if args.rerank is True else args.rerank, "cpu", None)
    results = []
    for q, h in zip(queries, hits):
        res = {"query": q, "codes": h["codes"], "fraction_kept": h["fraction_kept"],
               "candidates": [index.ids[i] for i in h["candidates"]]}
        if reranker is not None and len(h["candidates"]):
            t0 = time.time()
            p = reranker.embed(passage_texts(index, h["candidates"])).float().numpy()
            s = p @ reranker.embed([q]).float().numpy()[0]
            top = np.argsort(-s, kind="stable")[:args.top_k]
            res.update(top_k=[[index.ids[h["candidates"][i]], float(s[i])] for i in top],
                       reranker_embedded=len(h["candidates"]), rerank_s=time.time() - t0)
        results.append(res)
    return results


def main(argv=None):
    from teacher import PRECISIONS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="index a corpus (or --append to an index)")
    b.add_argument("--checkpoint", required=True, help="a trained checkpoint (Phase 2: its passage adapter is used)")
    b.add_argument("--corpus", required=True, nargs="+", help="JSONL (_id, text) or plain text files")
    b.add_argument("--index", required=True, help="index folder")
    b.add_argument("--lists", default="corpus", choices=("corpus", "model"),
                   help="fit the lists to the corpus (k-means), or use the model's own codebook")
    b.add_argument("--num_lists", type=int, default=0,
                   help="lists for --lists corpus (default: the model's codes, or ~4 x sqrt(passages) for a larger corpus)")
    b.add_argument("--no_center", action="store_true",
                   help="--lists corpus: do not subtract the corpus's mean vector before fitting and routing")
    b.add_argument("--whiten", type=float, default=None,
                   help="--lists corpus: scale each principal axis of the centred corpus by variance^(-P/2) before "
                        f"fitting and routing (0 = off, 0.5 = half-whitening, 1 = whitening; default {DEFAULT_WHITEN}, "
                        "0 with --no_center; README)")
    b.add_argument("--lexical", type=float, default=None,
                   help="--lists corpus: weight of the hashed-word TF-IDF part beside the model's vector in what the "
                        f"lists are fitted to and searched with (default {lexical.DEFAULT_LEXICAL:g}; 0 = off; README "
                        "'Adopted: a lexical part in the lists')")
    b.add_argument("--idf_power", type=float, default=lexical.IDF_POWER,
                   help=f"the lexical part's word weights: idf ** this (default {lexical.IDF_POWER:g}; 1 = plain idf; "
                        "README 'Adopted: idf squared in the lexical part')")
    b.add_argument("--word_pairs", type=float, default=lexical.PAIR_WEIGHT,
                   help=f"the lexical part's pairs of adjacent words, each at this x its idf ** --idf_power (default "
                        f"{lexical.PAIR_WEIGHT:g}; 0 = words alone; README 'Adopted: word pairs in the lexical part')")
    b.add_argument("--query_scale", type=float, default=lexical.QUERY_SCALE,
                   help=f"a query's lexical part picks lists at this x --lexical (default {lexical.QUERY_SCALE:g}; 1 = "
                        "as passages are routed; README 'Adopted: idf squared in the lexical part')")
    b.add_argument("--list_words", default=lexical.LIST_WORDS, choices=lexical.LIST_POOLS,
                   help="with exact word routing, each term of a list's word part weighs: max, its highest weight among "
                        "the list's passages x (the passages holding it) ** --list_count_power (the default; README "
                        "'Adopted: a list's words at their highest weight'); sum, its summed weight ** "
                        "--list_word_power (README 'Adopted: a list's words at the square root of their sums')")
    b.add_argument("--list_count_power", type=float, default=lexical.LIST_COUNT_POWER,
                   help=f"--list_words max: the power on the count (default {lexical.LIST_COUNT_POWER:g}; 0 = the "
                        "highest weight alone)")
    b.add_argument("--list_word_power", type=float, default=lexical.LIST_WORD_POWER,
                   help=f"--list_words sum: the power on the sums (default {lexical.LIST_WORD_POWER:g}: square roots; "
                        "1 = the mean TF-IDF row)")
    b.add_argument("--word_routing", default="exact", choices=("exact", "projected"),
                   help="with a lexical part: queries pick lists against each list's exact centroid, its words "
                        "unprojected (exact, the default), or against the k-means centroids on the words projected to "
                        f"{lexical.DIMS:,} dims (projected: smaller index; README \"Adopted: queries meet the lists' "
                        "words exactly\")")
    b.add_argument("--append", action="store_true", help="add passages to an existing index (same lists)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index")
    b.add_argument("--batch_size", type=int, default=512)
    b.add_argument("--id_field", default="_id", help="JSONL: the id column (SQuAD rows: id)")
    b.add_argument("--text_field", default="text", help="JSONL: the passage column (SQuAD rows: context)")
    b.add_argument("--unique_text", action="store_true", help="index each distinct passage text once")
    b.add_argument("--fit_sample", type=int, default=100_000, help="passages k-means fits the lists on (corpus lists)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="encode passages under bf16 autocast (auto: where the hardware multiplies bf16; "
                        "README 'Inference': same recall, faster)")
    b.add_argument("--encoder", default="full", choices=ENCODERS,
                   help="full: the whole model; bag: the weighted bag of k-mer embeddings alone, the transformer "
                        "blocks skipped (bag_path checkpoints; README 'Index a corpus': level recall on the demo, "
                        "~1.6x the passages/s). Recorded in index.json; queries and --append follow it")
    q = sub.add_parser("query", help="candidate passages for queries")
    q.add_argument("--index", required=True)
    q.add_argument("--checkpoint", default="", help="default: the one the index was built with")
    q.add_argument("--query", action="append", default=[], help="a query (repeatable)")
    q.add_argument("--queries", default="", help="a file of queries, one per line")
    q.add_argument("--n_probe", type=int, default=0, help="lists to probe (default 4 unless --budget)")
    q.add_argument("--budget", type=float, default=0.0, help="passages to keep: a count, or a fraction if < 1")
    q.add_argument("--rerank", nargs="?", const=True, default=None, metavar="MODEL",
                   help="re-rank candidates with the teacher (or a sentence-transformers model)")
    q.add_argument("--top_k", type=int, default=10)
    q.add_argument("--precision", default="", choices=("",) + PRECISIONS,
                   help="encode queries under bf16 autocast or fp32 (default: as the index was built)")
    q.add_argument("--encoder", default="", choices=("",) + ENCODERS,
                   help="encode queries with the full model or the bag alone (default: as the index was built)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            index = build(args)
            sizes = np.diff(index.offsets)
            print(f"indexed {len(index.ids):,} passages into {len(sizes)} lists ({index.meta['lists']}); "
                  f"largest list {sizes.max():,}, empty lists {(sizes == 0).sum()}; wrote {args.index}")
            return index
        results = query(args)
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "candidates"} | {"candidates": len(r["candidates"])}))
        return results
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
