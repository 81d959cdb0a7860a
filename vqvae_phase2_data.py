"""Phase 2 data: (query, passage) pairs, a deterministic held-out split, duplicate-free batches.

    from vqvae_phase2_data import pair_stream, PAIR_SOURCES
    pairs = pair_stream("sample", "train", {"squad": 1, "medquad": 1})
    batch = next(PairBatcher(lambda: pairs, batch_size=64))   # no passage (or query) twice in a batch

The held-out side is chosen by a hash of a group key (the article title where there is one, else
the passage), so no passage is on both sides. SQuAD dev rows (which carry a title) are split by
article: half of the articles belong to the retrieval evaluation (`squad_eval_article`) and are
never used here.
"""
from __future__ import annotations

import json
import re
import zipfile
from typing import Callable, Iterator

import numpy as np

from data_common import Source, held_out, iter_shard, mix, open_sources
from train_common import UserError
from vqvae_phase1_model import normalize_text
from vqvae_phase1b_data_domains import read_arxiv_local

TRAIN_ONLY = {"train": "train", "validation": "train"}  # the Hub pair sets have only train


def squad_eval_article(title: str) -> bool:
    """True for the SQuAD dev articles reserved for the retrieval evaluation (half, by title hash)."""
    return held_out("squad-article:" + title, 50.0)


def read_squad_local(path: str):
    """Original SQuAD v1.1 JSON (or .json.zip) -> rajpurkar/squad rows (title, context, question)."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read([n for n in z.namelist() if n.endswith(".json")][0]))
    elif path.endswith(".json"):
        data = json.load(open(path, encoding="utf-8"))
    else:
        return None
    if not isinstance(data, dict) or "data" not in data:
        return None
    return [{"title": a["title"], "context": p["context"], "question": qa["question"]}
            for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


def _pair(q_key: str, p_key: str, alt_p: str | None = None):
    def fmt(r):
        passage = r.get(p_key) or (r.get(alt_p) if alt_p else None) or ""
        return (r.get(q_key) or "").strip(), passage.strip(), (r.get("title") or passage)
    return fmt


PAIR_SOURCES: dict[str, tuple[Source, Callable]] = {
    "msmarco": (Source("msmarco", "sentence-transformers/msmarco-bm25", "triplet", splits=TRAIN_ONLY,
                       columns=("query", "positive")), _pair("query", "positive")),
    "nq": (Source("nq", "sentence-transformers/natural-questions", splits=TRAIN_ONLY, columns=("query", "answer")),
           _pair("query", "answer")),
    "squad": (Source("squad", "sentence-transformers/squad", splits=TRAIN_ONLY, columns=("question",),
                     local_reader=read_squad_local,
                     sample={"train": "pairs/squad_dev.jsonl.gz", "validation": "pairs/squad_dev.jsonl.gz"}),
              _pair("question", "answer", alt_p="context")),
    "hotpotqa": (Source("hotpotqa", "sentence-transformers/hotpotqa", "triplet", splits=TRAIN_ONLY,
                        columns=("anchor", "positive")), _pair("anchor", "positive")),
    "triviaqa": (Source("triviaqa", "sentence-transformers/trivia-qa", splits=TRAIN_ONLY, columns=("query", "answer")),
                 _pair("query", "answer")),
    "eli5": (Source("eli5", "sentence-transformers/eli5", splits=TRAIN_ONLY, columns=("question", "answer")),
             _pair("question", "answer")),
    # offline extras (bundled): MedQuAD question -> answer, PubMedQA question -> abstract
    "medquad": (Source("medquad", "", splits=TRAIN_ONLY, columns=("question", "answer"),
                       sample={"train": "pairs/medquad.jsonl.gz", "validation": "pairs/medquad.jsonl.gz"}),
                _pair("question", "answer")),
    "pubmedqa": (Source("pubmedqa", "", splits=TRAIN_ONLY, columns=("question", "abstract"),
                        sample={"train": "academic/pubmed_train.jsonl.gz", "validation": "academic/pubmed_train.jsonl.gz"}),
                 _pair("question", "abstract")),
    # title -> abstract: the title states what the abstract is about, in other words (a query type no other source
    # has: short, descriptive, technical). Passages are the abstract alone, so the title is not a substring of them
    "arxiv": (Source("arxiv", "gfissore/arxiv-abstracts-2021", splits=TRAIN_ONLY, columns=("title", "abstract"),
                     local_reader=read_arxiv_local,
                     sample={"train": "academic/arxiv_train.jsonl.gz", "validation": "academic/arxiv_train.jsonl.gz"}),
              _pair("title", "abstract")),
}
HUB_DEFAULT = "msmarco=0.3,nq=0.2,squad=0.15,hotpotqa=0.1,triviaqa=0.1,eli5=0.15"
SAMPLE_DEFAULT = "squad=0.5,medquad=0.35,pubmedqa=0.15"


def _pairs(name: str, ds, want_held_out: bool, percent: float) -> Callable[[], Iterator[tuple[str, str]]]:
    fmt = PAIR_SOURCES[name][1]

    def gen():
        for r in ds:
            q, p, group = fmt(r)
            if not q or not p:
                continue
            if name == "squad" and r.get("title") and squad_eval_article(r["title"]):
                continue  # reserved for the retrieval evaluation
            if held_out(f"{name}:{group}", percent) == want_held_out:
                yield q, p
    return gen


def pair_stream(mode: str, split: str, weights: dict[str, float], files: dict | None = None, seed: int = 0,
                held_out_percent: float = 5.0, rank: int = 0, world: int = 1, cycle: bool = True,
                skip_unavailable: bool = False) -> Iterator[tuple[str, str]]:
    """Mixed (query, passage) pairs of one side of the deterministic split."""
    for name in weights:
        if mode == "hub" and not PAIR_SOURCES[name][0].hub_id:
            raise UserError(f"source '{name}' is offline-only here: use --data sample, or --data files "
                            f"--data_files {name}=PATH")
    sources = {n: PAIR_SOURCES[n][0] for n in weights}
    opened = open_sources(sources, weights, "train", mode, files or {}, skip_unavailable)
    streams = {n: _pairs(n, ds(), split == "validation", held_out_percent) for n, ds in opened.items()}
    out = (pair for _, pair in mix(streams, {n: weights[n] for n in streams}, seed, cycle=cycle))
    return iter_shard(out, rank, world)


def grouped_order(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An epoch's order that keeps each group together: the groups in random order, each group's
    members shuffled. Consecutive batches then hold pairs of one group (hard in-batch negatives)."""
    groups = np.asarray(groups)
    out = []
    for g in rng.permutation(np.unique(groups)):
        members = np.flatnonzero(groups == g)
        out.append(members[rng.permutation(len(members))])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class PairBatcher:
    """Batches with no repeated passage or query (in-batch negatives must be true negatives).

    A pair that would repeat one waits for a later batch. `position` counts pairs consumed, and a
    fresh batcher skips to it on resume. With pool_size > 0 the first pool_size pairs are
    collected once and reshuffled every epoch; `order(pool, rng)`, if given, returns each epoch's
    order instead of a random permutation (e.g. `grouped_order`: batches of similar pairs).
    """

    def __init__(self, pairs: Callable[[], Iterator[tuple[str, str]]], batch_size: int, seed: int = 0,
                 pool_size: int = 0, order: Callable | None = None):
        self.pairs_fn, self.batch_size, self.pool_size, self.order = pairs, batch_size, pool_size, order
        self.rng = np.random.default_rng(seed)
        self.position, self.waiting, self.batches = 0, [], 0  # pairs read, pairs deferred, batches given
        self._it = self._source()

    def _source(self):
        if not self.pool_size:
            yield from self.pairs_fn()
            return
        pool = []
        for pair in self.pairs_fn():
            pool.append(pair)
            if len(pool) == self.pool_size:
                break
        while pool:
            for i in (self.order(pool, self.rng) if self.order else self.rng.permutation(len(pool))):
                yield pool[i]

    def __iter__(self):
        return self

    def __next__(self) -> list[tuple[str, str]]:
        batch, seen_q, seen_p, keep = [], set(), set(), []
        candidates = iter(self.waiting)
        self.waiting = []
        while len(batch) < self.batch_size:
            pair = next(candidates, None)
            if pair is None:
                pair = next(self._it, None)
                if pair is None:
                    break
                self.position += 1
            q, p = normalize_text(pair[0]), normalize_text(pair[1])
            if q in seen_q or p in seen_p:
                keep.append(pair)
                if len(keep) > 4 * self.batch_size:  # a tiny pool of near-duplicates: give up waiting
                    keep.pop(0)
                continue
            seen_q.add(q)
            seen_p.add(p)
            batch.append(pair)
        self.waiting = keep + list(candidates)
        if not batch:
            raise StopIteration
        self.batches += 1
        return batch

    def skip_batches(self, n: int):
        """Replay n batches (text only, no model work): the deferred pairs come back exactly as they were,
        which a skip of the pair stream alone would lose."""
        while self.batches < n:
            try:
                next(self)
            except StopIteration:
                break

    def skip(self, n: int):
        while self.position < n:
            if next(self._it, None) is None:
                break
            self.position += 1


def sentence_stream(documents: Iterator[str], min_words: int = 4, max_words: int = 40) -> Iterator[str]:
    """Documents -> their sentences of `min_words` to `max_words` words (split after . ! or ?): text of a
    query's length that is not a query, for Phase 2's --identity_weight."""
    for doc in documents:
        for sentence in re.split(r"(?<=[.!?])\s+", doc):
            if min_words <= len(sentence.split()) <= max_words:
                yield sentence.strip()
