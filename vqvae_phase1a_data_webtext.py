"""Phase 1a data: WikiText-103 + C4 English (+ optional Wikipedia) -> windows -> teacher targets.

    from vqvae_phase1a_data_webtext import webtext_documents
    docs = webtext_documents("sample", split="train", weights={"wikitext": 1, "c4": 1})

WikiText comes one row per *line*; lines are joined back into articles (a ` = Title = ` line
starts one, ` = = Section = = ` headings become plain lines). C4 is streamed and capped at
`c4_docs` documents. Everything streams: memory stays flat however long the run.
"""
from __future__ import annotations

import re
from typing import Callable, Collection, Iterable, Iterator

import numpy as np

from data_common import Source, iter_shard, mix, open_sources

WEBTEXT_SOURCES = {
    "wikitext": Source("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1",
                       sample={"train": "webtext/wikitext_train.txt.gz",
                               "validation": "webtext/wikitext_validation.txt.gz"}),
    "c4": Source("c4", "allenai/c4", "en",
                 sample={"train": "webtext/c4_train.jsonl.gz", "validation": "webtext/c4_validation.jsonl.gz"}),
    "wikipedia": Source("wikipedia", "wikimedia/wikipedia", "20231101.en", splits={"train": "train"},
                        sample={"train": "webtext/wikipedia_train.jsonl.gz",
                                "validation": "webtext/wikipedia_validation.jsonl.gz"}),
}
DEFAULT_WEIGHTS = "wikitext=0.5,c4=0.5"

_TITLE = re.compile(r"^ = [^=].* = $")
_HEADING = re.compile(r"^ (=+ )+(.*?)( =+)+ $")


def wikitext_articles(rows: Iterable[dict]) -> Iterator[str]:
    """WikiText line rows -> article strings (title line starts a new article)."""
    lines: list[str] = []
    for row in rows:
        line = row["text"].rstrip("\r\n")
        if _TITLE.match(line) and lines:
            yield "\n".join(lines)
            lines = []
        m = _HEADING.match(line)
        if m:
            line = m.group(2)
        line = line.strip()
        if line:
            lines.append(line)
    if lines:
        yield "\n".join(lines)


def _documents(name: str, ds, max_docs: int) -> Callable[[], Iterator[str]]:
    def gen():
        rows = iter(ds)
        if name == "wikitext":
            yield from wikitext_articles(rows)
            return
        for i, row in enumerate(rows):
            if max_docs and i >= max_docs:
                return
            if row.get("text"):
                yield row["text"]
    return gen


def webtext_documents(mode: str, split: str, weights: dict[str, float], files: dict | None = None,
                      seed: int = 0, c4_docs: int = 200_000, rank: int = 0, world: int = 1,
                      cycle: bool = True) -> Iterator[str]:
    """Mixed document stream (train cycles; validation runs once), sharded by rank."""
    split_weights = {n: w for n, w in weights.items() if split in WEBTEXT_SOURCES[n].splits
                     or mode != "hub"}
    opened = open_sources(WEBTEXT_SOURCES, split_weights, split, mode, files or {})
    streams = {n: _documents(n, ds(), c4_docs if n == "c4" else 0) for n, ds in opened.items()}
    docs = (doc for _, doc in mix(streams, split_weights, seed, cycle=cycle))
    return iter_shard(docs, rank, world)


class WindowStream:
    """Documents -> windows (min_chars or longer), through a seeded shuffle buffer.

    `position` counts windows handed out; `skip(n)` fast-forwards a fresh stream to where a
    killed run stopped (no teacher work: only text is cut).
    """

    def __init__(self, documents: Callable[[], Iterator[str]], tokenizer, seed: int = 0,
                 shuffle_buffer: int = 2048, min_chars: int = 32, pool_size: int = 0,
                 exclude: Collection[str] = ()):
        self.documents, self.tok, self.min_chars = documents, tokenizer, min_chars
        self.pool_size = pool_size  # > 0: only the first pool_size windows, cycled (epochs)
        self.exclude = exclude  # windows never handed out (e.g. the teacher-labelled training pool)
        self.rng = np.random.default_rng(seed)
        self.buffer_size, self.position = shuffle_buffer, 0
        self._it = self._windows()

    def _raw(self) -> Iterator[str]:
        while True:
            n = 0
            for doc in self.documents():
                for w in self.tok.split_windows(doc, max_windows=0):
                    if len(w) >= self.min_chars and w not in self.exclude:
                        yield w
                        n += 1
                        if n == self.pool_size:
                            break
                if self.pool_size and n == self.pool_size:
                    break
            if not self.pool_size or n == 0:
                return

    def _windows(self) -> Iterator[str]:
        buf: list[str] = []
        for w in self._raw():
            if len(buf) < self.buffer_size:
                buf.append(w)
                continue
            j = int(self.rng.integers(len(buf)))
            buf[j], w = w, buf[j]
            yield w
        self.rng.shuffle(buf)
        yield from buf

    def take(self, n: int) -> list[str]:
        out = []
        for w in self._it:
            out.append(w)
            if len(out) == n:
                break
        self.position += len(out)
        return out

    def skip(self, n: int):
        while n > 0:
            got = len(self.take(min(n, 4096)))
            if got == 0:
                break
            n -= got


def eval_windows(documents: Iterator[str], tokenizer, n: int, min_chars: int = 32) -> list[str]:
    """The first n windows of a validation stream (deterministic, no shuffling)."""
    out: list[str] = []
    for doc in documents:
        out.extend(w for w in tokenizer.split_windows(doc, max_windows=0) if len(w) >= min_chars)
        if len(out) >= n:
            break
    return out[:n]
