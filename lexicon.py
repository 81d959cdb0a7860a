"""Word knowledge from the teacher, for Phase 1a: a word list, the teacher's embedding of each word,
and cheap "static" window targets built from them.

    from lexicon import Lexicon
    lex = Lexicon.build(documents, teacher, size=40_000)   # ~35 s of teacher time on a 2-core CPU
    ids, mask = ...; targets = lex.embeddings[some_word_ids]  # word stage: a word -> its teacher vector
    lex.static_targets(["a window of text", ...])            # (N, 384) SIF-weighted bag of word vectors
    Lexicon.build(documents, teacher, size=40_000, pieces=True)  # words outside it count through their word pieces

Why: the teacher labels ~50-90 windows/s on a CPU, so a CPU run sees a few thousand labelled
windows; embedding each word of a vocabulary alone costs ~1,000 words/s and teaches the k-mer
embeddings what words mean (what Model2Vec distils, but read from characters, not a subword
table). A window's static target is the SIF-weighted sum of its words' teacher vectors (Arora et
al. 2017, https://openreview.net/forum?id=SyK00v5xx): unlimited targets at no teacher cost, which on
the SQuAD evaluation half route as well as Model2Vec (README "Filter quality").
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

import torch
import torch.nn.functional as F

from vqvae_phase1_model import normalize_text

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]")  # words (with an inner apostrophe) and single symbols


def words(text: str) -> list[str]:
    return WORD.findall(normalize_text(text))


class Lexicon:
    """Words, their teacher embeddings (V, D) and SIF weights a / (a + p(word))."""

    def __init__(self, vocab: list[str], embeddings: torch.Tensor, counts: dict[str, int], sif: float = 1e-4):
        self.vocab, self.embeddings = vocab, embeddings.float()
        self.index = {w: i for i, w in enumerate(vocab)}
        total = max(1, sum(counts.values()))
        self.weights = torch.tensor([sif / (sif + counts.get(w, 0) / total) for w in vocab])
        self.center = self.embeddings.mean(0)  # the direction every word vector shares
        self.table = self.embeddings  # the vectors static_targets sums: the words', then any pieces'
        self.tokenize, self.piece_index, self.pieces_of = None, {}, {}

    @classmethod
    def build(cls, documents: Iterable[str], teacher, size: int, max_chars: int = 20_000_000,
              sif: float = 1e-4, min_count: int = 2, teacher_vocab: bool = True,
              more: tuple[tuple[Iterable[str], int], ...] = (), pieces: bool = False) -> "Lexicon":
        """The `size` most frequent words of `documents` (read up to max_chars) that occur at least
        min_count times, plus the teacher's whole-word vocabulary (general English beyond the sample).
        `more`: (documents, n) pairs, each adding its own n most frequent words (another domain's text,
        whose words the first text's counts would drown); the SIF weights count all the texts.
        pieces: static targets also count words outside the lexicon, through the teacher's word pieces."""
        counts: collections.Counter = collections.Counter()
        vocab = set(teacher_words(teacher) if teacher_vocab else ())
        for docs, n_words in ((documents, size), *more):
            seen = count_words(docs, max_chars)
            vocab |= {w for w, c in seen.most_common(n_words) if c >= min_count}
            counts.update(seen)
        vocab = sorted(vocab)
        lex = cls(vocab, teacher.embed(vocab), dict(counts), sif)
        if pieces:
            lex.add_pieces(teacher)
        return lex

    def add_pieces(self, teacher):
        """Let static_targets count a word outside the lexicon (a name, a technical term) through the
        teacher tokenizer's pieces of it instead of dropping it: each piece's vector is the teacher's
        embedding of the piece's text ('##ase' -> 'ase'; a lexicon word's own vector where it is one), and
        the word's SIF weight, ~1 for a word too rare for the lexicon, is split evenly over its pieces. The
        tokenizer's vocabulary texts that are not lexicon words are embedded once (3,702 beside the demo's
        lexicon)."""
        tok = teacher_tokenizer(teacher)
        if tok is None or not hasattr(tok, "tokenize"):
            raise ValueError("word pieces for the static targets need the teacher's tokenizer")
        texts = {piece_text(p) for p in getattr(tok, "vocab", {})} - set(self.index) - {""}
        texts = sorted(t for t in texts if not (t.startswith("[") and t.endswith("]")))  # [CLS], [unused0] ...
        self.piece_index = {t: len(self.vocab) + i for i, t in enumerate(texts)}
        if texts:
            self.table = torch.cat([self.embeddings, teacher.embed(texts).float()])
        self.tokenize = tok.tokenize

    def pieces(self, word: str) -> list[int]:
        """Rows of `table` for a word outside the lexicon: its pieces' (empty without add_pieces)."""
        if self.tokenize is None:
            return []
        rows = self.pieces_of.get(word)
        if rows is None:
            rows = [j for t in map(piece_text, self.tokenize(word))
                    for j in (self.index.get(t, self.piece_index.get(t)),) if j is not None]
            self.pieces_of[word] = rows
        return rows

    def static_targets(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit vectors: SIF-weighted sums of the texts' known words' teacher vectors, and with
        add_pieces of the other words' pieces' (zero where a text has neither)."""
        rows, cols, vals = [], [], []
        for i, text in enumerate(texts):
            for w in words(text):
                j = self.index.get(w)
                if j is not None:
                    rows.append(i), cols.append(j), vals.append(float(self.weights[j]))
                else:
                    ps = self.pieces(w)
                    for k in ps:
                        rows.append(i), cols.append(k), vals.append(1.0 / len(ps))
        out = torch.zeros(len(texts), self.embeddings.shape[1])
        if rows:
            cols_t = torch.tensor(cols)
            out.index_add_(0, torch.tensor(rows), self.table[cols_t] * torch.tensor(vals)[:, None])
        return F.normalize(out, dim=-1)


def count_words(documents: Iterable[str], max_chars: int) -> collections.Counter:
    """Word counts over the documents, read until max_chars characters."""
    counts: collections.Counter = collections.Counter()
    n = 0
    for doc in documents:
        counts.update(words(doc))
        n += len(doc)
        if n >= max_chars:
            break
    return counts


def piece_text(piece: str) -> str:
    """A word piece's text: '##ase' -> 'ase' (a continuation piece), 'photo' -> 'photo'."""
    return piece[2:] if piece.startswith("##") else piece


def teacher_tokenizer(teacher):
    """The teacher's (sentence-transformers) tokenizer, or None where the teacher has none."""
    return getattr(getattr(teacher, "model", None), "tokenizer", None)


def teacher_words(teacher) -> list[str]:
    """The teacher tokenizer's whole words (no '##' pieces, letters only, 2+ characters)."""
    tok = teacher_tokenizer(teacher)
    vocab = getattr(tok, "vocab", None) or {}
    return [w for w in vocab if len(w) > 1 and w.isalpha() and not w.startswith("##")]
