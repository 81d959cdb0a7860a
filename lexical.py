"""A lexical part beside the model's vectors: hashed word TF-IDF, projected to a fixed 2,048-dim vector.

A coarse filter routes a query to the lists whose passages it resembles. The model's vectors say what a
text is about; whether a passage shares the query's rare words (a name, a drug, a method) they say only
roughly. This module adds that signal as a dense vector an IVF can fit lists to:

    words (NFKC, lowercase, \\w+ runs) -> hashed into BUCKETS rows (no vocabulary is stored); each pair of
    adjacent words ("new york") -> hashed into BUCKETS rows after those (terms: WIDTH = 2 x BUCKETS rows)
    weight = (1 + log tf) * idf ** IDF_POWER (x PAIR_WEIGHT for a word pair),
    idf = log((N + 1) / (df + 1)) + 1 with df counted on the corpus
    vector = sum of weight * the bucket's fixed sparse random sign vector (8 of DIMS coordinates), unit norm

An index routes on [unit model vector, weight * unit lexical vector] (`kmer_index.py build --lexical`,
README "Adopted: a lexical part in the lists"); queries pick their lists with the lexical part at
QUERY_SCALE x the weight, against each list's exact centroid (`word_lists`, `list_scores`: the words
unprojected; README "Adopted: queries meet the lists' words exactly"). The document frequencies are fitted to
the corpus an index holds, as its centre and lists are; queries use the corpus's. Deterministic: the same words give the same
vector in every process (blake2b, not Python's salted hash).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
from scipy.sparse import csr_matrix

BUCKETS = 1 << 20  # hashed word rows; as many again for word pairs (document frequencies: 8 MB of int32)
WIDTH = 2 * BUCKETS  # term ids: words in [0, BUCKETS), pairs of adjacent words in [BUCKETS, WIDTH)
DIMS = 2048  # width of the projected vector (README: 512 and 1,024 measured lower)
NONZERO = 8  # coordinates each bucket's sign vector touches
DEFAULT_LEXICAL = 1.25  # weight of the lexical part in an index's routed vectors (README "Adopted: word pairs in
# the lexical part"; 1.5 with words alone, 2 before that, with queries at 1.5x and 2.5x)
IDF_POWER = 2.0  # idf ** IDF_POWER: the rarest words carry the vector (README "Adopted: idf squared"; 1 = plain idf)
QUERY_SCALE = 12.0  # a query's lexical part weighs this x a passage's when it picks lists (README "Adopted: list
# centroids normalised part by part"; 16 before them, 4 with words alone, 1.5 before exact word routing)
LIST_WORDS = "max"  # a list's word part, each term at: "max", its highest weight among the list's passages x (the
# passages holding it) ** LIST_COUNT_POWER (README "Adopted: a list's words at their highest weight"); "sum", its
# summed weight ** LIST_WORD_POWER (README "Adopted: a list's words at the square root of their sums"); unit norm
LIST_POOLS = ("max", "sum")
LIST_COUNT_POWER = 0.25  # "max": 0 = the highest weight alone
LIST_WORD_POWER = 0.5  # "sum": 1 = the mean TF-IDF row, as before the square roots
PAIR_WEIGHT = 0.7  # a word pair's weight, x its idf ** IDF_POWER (README "Adopted: word pairs in the lexical
# part"; 0 = words alone, as every index built before them)
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """NFKC, lowercase, runs of word characters (letters, digits, underscore in any script)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _bucket(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "replace"), digest_size=8).digest(), "little") % BUCKETS


def bag(text: str, cache: dict | None = None, pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distinct term ids of the text, sorted; how often each occurs): its words' buckets, and with `pairs`
    each pair of adjacent words' bucket + BUCKETS. cache: a memo of term -> id, shared between calls."""
    cache = {} if cache is None else cache
    ws = words(text)
    ids = []
    for term in ws + ([f"{a} {b}" for a, b in zip(ws, ws[1:])] if pairs else []):
        b = cache.get(term)
        if b is None:  # a space is never inside a word: it marks a pair
            b = cache[term] = _bucket(term) + (BUCKETS if " " in term else 0)
        ids.append(b)
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.asarray(ids, np.int64), return_counts=True)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sign_vectors(buckets: np.ndarray, dims: int = DIMS, nonzero: int = NONZERO) -> np.ndarray:
    """(len(buckets), dims) float32: each bucket's fixed sparse random vector, `nonzero` coordinates of
    +-1/sqrt(nonzero) (a sparse Johnson-Lindenstrauss projection: cosines of TF-IDF vectors are kept up to
    ~1/sqrt(dims) of noise)."""
    b = buckets.astype(np.uint64)
    out = np.zeros((len(b), dims), np.float32)
    rows = np.arange(len(b))
    for j in range(nonzero):
        h = _mix(b * np.uint64(nonzero) + np.uint64(j) + np.uint64(0x9E3779B97F4A7C15))
        col = (h % np.uint64(dims)).astype(np.int64)
        sign = np.where((h >> np.uint64(63)) == 1, 1.0, -1.0).astype(np.float32)
        np.add.at(out, (rows, col), sign / np.sqrt(nonzero))
    return out


class LexicalSpace:
    """Document frequencies of a corpus over hashed words (and word pairs), and the projected TF-IDF vectors
    they give."""

    def __init__(self, df: np.ndarray | None = None, n_docs: int = 0, dims: int = DIMS,
                 idf_power: float = IDF_POWER, pair_weight: float = PAIR_WEIGHT):
        self.df = np.zeros(WIDTH, np.int32) if df is None else df.astype(np.int32)
        if self.df.shape == (BUCKETS,):  # counted before word pairs: words alone
            self.df, pair_weight = np.concatenate([self.df, np.zeros(BUCKETS, np.int32)]), 0.0
        if self.df.shape != (WIDTH,):
            raise ValueError(f"document frequencies have shape {self.df.shape}, not ({WIDTH},)")
        self.n_docs, self.dims, self.idf_power = int(n_docs), int(dims), float(idf_power)
        self.pair_weight = float(pair_weight)

    def stored_df(self) -> np.ndarray:
        """The document frequencies to keep on disk: the words' rows alone when this space counts no pairs (as
        indexes built before them; `__init__` reads either)."""
        return self.df if self.pair_weight else self.df[:BUCKETS]

    def bag(self, text: str, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`bag` with the word pairs this space counts (none at pair weight 0)."""
        return bag(text, cache, pairs=self.pair_weight > 0)

    def count(self, bags: list[tuple[np.ndarray, np.ndarray]]):
        """Add passages to the document frequencies (each distinct word once per passage)."""
        for ids, _ in bags:
            self.df[ids] += 1
        self.n_docs += len(bags)

    def idf(self, ids: np.ndarray) -> np.ndarray:
        """The terms' weights: (log((N + 1) / (df + 1)) + 1) ** idf_power, x pair_weight for word pairs."""
        w = (np.log((self.n_docs + 1) / (self.df[ids] + 1.0)) + 1.0) ** self.idf_power
        return np.where(ids >= BUCKETS, self.pair_weight * w, w).astype(np.float32)

    def sparse(self, bags: list[tuple[np.ndarray, np.ndarray]]) -> csr_matrix:
        """(len(bags), WIDTH) unit rows of the exact weighted TF-IDF, before any projection (zero rows for
        texts without words): what word lists (`word_lists`) are summed from and scored with."""
        lens = np.array([len(ids) for ids, _ in bags], np.int64)
        if not bags or lens.sum() == 0:
            return csr_matrix((len(bags), WIDTH), dtype=np.float32)
        ids = np.concatenate([i for i, _ in bags])
        tf = np.concatenate([c for _, c in bags]).astype(np.float32)
        w = (1.0 + np.log(tf)) * self.idf(ids)
        rows = np.repeat(np.arange(len(bags)), lens)
        norm = np.sqrt(np.bincount(rows, w * w, minlength=len(bags))).clip(min=1e-12)
        return csr_matrix(((w / norm[rows]).astype(np.float32), (rows, ids)), shape=(len(bags), WIDTH))

    def project(self, x: csr_matrix) -> np.ndarray:
        """(rows, dims) float32 unit vectors: `sparse` rows projected by their words' sign vectors (zero for a
        text without words)."""
        if x.nnz == 0:
            return np.zeros((x.shape[0], self.dims), np.float32)
        uniq, inv = np.unique(x.indices, return_inverse=True)
        x = csr_matrix((x.data, inv, x.indptr), shape=(x.shape[0], len(uniq)))
        return unit_rows(np.asarray(x @ sign_vectors(uniq, self.dims), dtype=np.float32))

    def vectors(self, bags: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """(len(bags), dims) float32 unit vectors (zero for a text without words)."""
        return self.project(self.sparse(bags))

    def encode(self, texts: list[str]) -> np.ndarray:
        cache: dict = {}
        return self.vectors([self.bag(t, cache) for t in texts])

    def encode_sparse(self, texts: list[str]) -> csr_matrix:
        cache: dict = {}
        return self.sparse([self.bag(t, cache) for t in texts])

    @classmethod
    def fit(cls, texts: list[str], dims: int = DIMS, idf_power: float = IDF_POWER,
            pair_weight: float = PAIR_WEIGHT) -> "LexicalSpace":
        space = cls(dims=dims, idf_power=idf_power, pair_weight=pair_weight)
        cache: dict = {}
        space.count([space.bag(t, cache) for t in texts])
        return space


def check_settings(idf_power: float, query_scale: float, pair_weight: float = PAIR_WEIGHT,
                   list_word_power: float = LIST_WORD_POWER, list_count_power: float = LIST_COUNT_POWER):
    """One line naming the flag (`--idf_power`, `--query_scale`, `--word_pairs`, `--list_word_power`,
    `--list_count_power`: kmer_index.py build and eval_filter.py) when a setting cannot be used."""
    if idf_power < 0:
        raise ValueError(f"--idf_power {idf_power:g}: give a power >= 0 (1 = plain idf, {IDF_POWER:g} = the default)")
    if pair_weight < 0:
        raise ValueError(f"--word_pairs {pair_weight:g}: give a weight >= 0 (0 = words alone, {PAIR_WEIGHT:g} = the "
                         f"default)")
    if query_scale <= 0:
        raise ValueError(f"--query_scale {query_scale:g}: give a scale > 0 (1 = queries weigh their words as passages "
                         f"do, {QUERY_SCALE:g} = the default)")
    if not 0 < list_word_power <= 1:
        raise ValueError(f"--list_word_power {list_word_power:g}: give a power in (0, 1] (1 = each list's mean TF-IDF "
                         f"row, {LIST_WORD_POWER:g} = the default)")
    if not 0 <= list_count_power <= 1:
        raise ValueError(f"--list_count_power {list_count_power:g}: give a power in [0, 1] (0 = each term's highest "
                         f"weight alone, {LIST_COUNT_POWER:g} = the default)")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row at unit norm (zero rows, and rows of no columns, stay as they are)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def joined(vectors: np.ndarray, lexical: np.ndarray | None, weight: float) -> np.ndarray:
    """The routed vector: the model's (or any encoder's) vector at unit norm, beside `weight` x the unit
    lexical vector. weight 0 or no lexical part: the unit vector alone."""
    v = unit_rows(vectors)
    if lexical is None or not weight:
        return v.astype(np.float32)
    return np.concatenate([v, weight * lexical], 1).astype(np.float32)


def list_sums(codes: np.ndarray, K: int, vectors: np.ndarray, words, pool: str = LIST_WORDS):
    """Per list, the sum of its passages' unit routed vectors, and what its word part is made from, their exact
    unit TF-IDF rows pooled: (K, d) dense, then (K, WIDTH) csr matrices: pool "max", (each term's highest weight
    among the list's passages, how many of them hold it); "sum", (each term's summed weight,). Chunks of a corpus
    combine with `add_list_sums`; `unit_lists` makes them centroids.
    vectors: (n, d) routed vectors (d may be 0); words: (n, WIDTH) csr from `LexicalSpace.sparse`."""
    n = len(codes)
    member = csr_matrix((np.ones(n, np.float32), (codes, np.arange(n))), shape=(K, n))
    dense = np.asarray(member @ unit_rows(vectors).astype(np.float32), dtype=np.float32).reshape(K, vectors.shape[1])
    if pool == "sum":
        return dense, (csr_matrix(member @ words, dtype=np.float32),)
    if pool != "max":
        raise ValueError(f"list words pooled by {pool!r}: give one of {', '.join(LIST_POOLS)}")
    w = csr_matrix(words, dtype=np.float32).tocoo()
    key = codes[w.row].astype(np.int64) * w.shape[1] + w.col  # (list, term)
    order = np.lexsort((-w.data, key))  # by (list, term), the highest weight first
    key, first, count = np.unique(key[order], return_index=True, return_counts=True)
    at = (key // w.shape[1], key % w.shape[1])
    return dense, (csr_matrix((w.data[order][first], at), shape=(K, w.shape[1]), dtype=np.float32),
                   csr_matrix((count.astype(np.float32), at), shape=(K, w.shape[1]), dtype=np.float32))


def add_list_sums(a, b):
    """Two chunks' `list_sums` (same lists, same pool) as one: vectors and counts add, highest weights the higher
    of the two, summed weights add."""
    (da, wa), (db, wb) = a, b
    if len(wa) == 1:
        return da + db, (wa[0] + wb[0],)
    return da + db, (wa[0].maximum(wb[0]), wa[1] + wb[1])


def unit_lists(dense: np.ndarray, words: tuple, weight: float, word_power: float = LIST_WORD_POWER,
               count_power: float = LIST_COUNT_POWER):
    """`list_sums` -> each list's centroid, its two parts normalised apart, as a passage's are: [unit mean vector,
    weight x unit word part] / sqrt(1 + weight^2) (a list with no words: its unit mean vector alone, scaled the
    same). Normalised together, the words of a list of many passages (which share few rare words) shrank against
    its vector as the list grew, so a query's words counted for less in larger lists and corpora (README "Adopted:
    list centroids normalised part by part"). The word part: pool "max", each term's highest weight among the
    list's passages x (the passages holding it) ** count_power; pool "sum", each term's summed weight **
    word_power (1 = the mean row). Either way the rare words a single passage holds, which are what a query's words
    find, are not buried by the words many of the list's passages share (README "Adopted: a list's words at the
    square root of their sums", "Adopted: a list's words at their highest weight")."""
    if len(words) == 2:
        top, count = words
        scale = csr_matrix(count, dtype=np.float32, copy=True)
        scale.data = np.power(scale.data, np.float32(count_power))  # counts >= 1; power 0: ones
        sparse = csr_matrix(top.multiply(scale), dtype=np.float32)
    else:
        sparse = csr_matrix(words[0], dtype=np.float32, copy=True)
        if word_power != 1:
            sparse.data = np.power(np.maximum(sparse.data, 0), np.float32(word_power))  # float32 in, float32 out
    dn = np.sqrt((dense * dense).sum(1)).clip(min=1e-12)
    sn = np.sqrt(np.asarray(sparse.multiply(sparse).sum(1)).ravel()).clip(min=1e-12)
    total = np.float32(np.sqrt(1.0 + weight * weight))
    return ((dense / dn[:, None]) / total).astype(np.float32), \
        csr_matrix(sparse.multiply((np.float32(weight) / (sn * total)).astype(np.float32)[:, None]), dtype=np.float32)


def word_lists(codes: np.ndarray, K: int, vectors: np.ndarray, words, weight: float, pool: str = LIST_WORDS,
               word_power: float = LIST_WORD_POWER, count_power: float = LIST_COUNT_POWER):
    """Each list's centroid in the exact space, (K, d) dense part and (K, WIDTH) sparse word part: the mean
    direction of its passages' unit vectors beside weight x the direction of their exact unit TF-IDF rows pooled
    (`list_sums`, `unit_lists`). Lists are fitted (k-means) on the projected vectors; queries then pick them against
    these centroids, so a query's words meet the lists' words without the projection's noise (README "Adopted:
    queries meet the lists' words exactly")."""
    return unit_lists(*list_sums(codes, K, vectors, words, pool), weight, word_power, count_power)


def list_scores(vectors: np.ndarray, words, weight: float, dense: np.ndarray, sparse, sparse_t=None) -> np.ndarray:
    """(n, K) cosines (up to each row's norm, which does not change its order) of texts routed as
    [unit vector, weight x exact unit TF-IDF row] against `word_lists` centroids. sparse_t: `sparse.T` as a csr
    matrix (WIDTH, K), when the caller keeps one: converting the transpose walks all 2^21 term rows and every list
    word, ~40 ms at 512 lists of 21,000 passages, which a single query would pay on every call (README "Index a
    corpus")."""
    t = sparse.T.tocsr() if sparse_t is None else sparse_t
    out = unit_rows(vectors).astype(np.float32) @ dense.T
    return (out + weight * np.asarray((words @ t).todense(), dtype=np.float32)).astype(np.float32)
