"""K-mer VQ-VAE: hashed character 4-mers -> transformer -> 1024-code VQ bottleneck -> teacher space.

Usage (notebook, CPU is fine):

    from vqvae_phase1_model import load_pretrained
    f = load_pretrained("runs/demo/kmer_vqvae_phase2_aligned.pt")
    f.encode(["what is a coarse quantiser?"], role="query", top_n=4)["top_indices"]

or, with nothing but a checkpoint dict (the seed's snippet):

    model = KmerVQVAE(**ckpt["base_config"]); model.load_state_dict(ckpt["base_model_state_dict"])
    out = model.encode(input_ids, attention_mask)   # dict: z_e, z_q, indices, ...

This module is pure: no device choice, no argument parsing, no printing, no Hub calls.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import shutil
import tempfile
import unicodedata
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "kmer-vqvae/1"
PHASES = ("phase1a", "phase1b", "phase2")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class KmerVQVAEConfig:
    # tokenizer geometry
    kmer_len: int = 4
    kmer_stride: int = 1
    kmer_buckets: int = 32768
    num_hashes: int = 2  # multi-hash embedding: ids from several hashes, embeddings summed
    window_size: int = 64  # encoder positions per window
    kmer_pool: int = 4  # k-mers mean-pooled into one position (1 = none); see README "Geometry"
    max_windows: int = 16  # windows kept per text (a passage longer than this is truncated)
    hash_version: int = 2  # k-mer hash: 2 = 32-bit (fast); 1 = the first, 64-bit one (older checkpoints)
    # hashed word features: each k-mer also looks up (this many hashes of) the whole word its first byte
    # belongs to, a variable-length character n-gram with no vocabulary (fastText's word feature; README
    # "Filter quality"), in a table of word_buckets rows that starts at zero, so a word never trained adds
    # nothing; 0 = k-mers only (checkpoints written before this option existed)
    word_hashes: int = 0
    word_buckets: int = 65536
    # encoder
    d_model: int = 384
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0
    # "zero": each block's attention and MLP output layers start at zero, so a new encoder is the bag
    # of its k-mer embeddings and the blocks learn context on top (README "Filter quality"); "normal":
    # the usual small random init (checkpoints written before this option existed)
    residual_init: str = "zero"
    # True: the text vector is a learned-weight mean of every k-mer's embedding, taken before pooling,
    # plus what the blocks add at the pooled positions (README "Filter quality"); False: the mean of
    # the blocks' pooled outputs (checkpoints written before this option existed)
    bag_path: bool = True
    # quantiser
    num_codes: int = 1024
    code_dim: int = 0  # 0 = d_model; else in/out projections to a lower code space
    distance: str = "cosine"  # "cosine" or "euclidean"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    commitment_weight: float = 0.25
    diversity_temperature: float = 0.1
    center_codes: bool = True  # subtract a running mean before the cosine: see README "Codebook health"
    # decoder
    teacher_dim: int = 384
    decoder_hidden: int = 768


def config_dict(cfg: KmerVQVAEConfig | dict) -> dict:
    """The plain dict stored in checkpoints; unknown keys are rejected with one clear line."""
    if isinstance(cfg, KmerVQVAEConfig):
        return asdict(cfg)
    known = {f.name for f in fields(KmerVQVAEConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    return asdict(KmerVQVAEConfig(**cfg))


# ----------------------------------------------------------------------------------------------
# Tokenizer

_HASH_MULTIPLIERS = np.array(  # hash_version 1 (64-bit; checkpoints written before hash_version existed)
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)
_HASH32_MULTIPLIERS = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=np.uint32)  # version 2
_SPACE_TABLE = bytes(32 if b in (9, 10, 11, 12, 13, 28, 29, 30, 31) else b for b in range(256))  # ASCII isspace()
_OTHER_SPACES = ("\x85", "\u1680", "\u2028", "\u2029")  # the only non-ASCII whitespace NFKC leaves in place


def normalize_text(text: str) -> str:
    """NFKC, lowercase, whitespace runs -> one space, strip. Never raises on any str."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    # Lone surrogates cannot be encoded to UTF-8: replace them before anything else looks at them.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def normalize_batch(texts: list) -> list[bytes]:
    """`normalize_text(t).encode()` for every text, in a few passes over the whole batch.

    NFKC and lower() run per text only where a text is not ASCII (ASCII is already NFKC, and
    bytes.lower() is str.lower() on ASCII); the whitespace rules run once, in numpy, over the texts
    joined with NUL, which no step changes and which is kept as the boundary. A batch in which a
    text itself holds NUL takes the one-by-one path.
    """
    texts = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in texts]
    joined = "\0".join(texts)
    if joined.count("\0") != len(texts) - 1:
        return [normalize_text(t).encode("utf-8") for t in texts]
    if not joined.isascii():
        parts = [t if t.isascii() else unicodedata.normalize("NFKC", t.encode("utf-8", "replace").decode("utf-8"))
                 .lower() for t in texts]
        joined = "\0".join(parts)
        for ch in _OTHER_SPACES:
            if ch in joined:
                joined = joined.replace(ch, " ")
    # ASCII letters -> lower case (UTF-8 multi-byte sequences hold no ASCII bytes); whitespace -> ' '
    data = joined.encode("utf-8").lower().translate(_SPACE_TABLE)
    a = np.frombuffer(data, dtype=np.uint8)
    if not a.size:
        return [b""] * len(texts)
    space = a == 32  # runs of spaces -> one space, then no space next to a boundary (NUL) or the ends
    a = a[~(space & np.concatenate(([False], space[:-1])))]
    edge = np.concatenate(([True], a[:-1] == 0)) | np.concatenate((a[1:] == 0, [True]))
    return a[~((a == 32) & edge)].tobytes().split(b"\0")


class KmerTokenizer:
    """Text -> windows of hashed byte k-mer ids (0 = padding), with attention masks.

    A text is cut into consecutive windows of at most `window_size * kmer_pool` k-mers, at a space
    where one falls in the second half of the window. Each window's text is kept, since the
    teacher target of a window is the teacher's embedding of exactly that text.
    """

    def __init__(self, kmer_len=KmerVQVAEConfig.kmer_len, kmer_stride=KmerVQVAEConfig.kmer_stride,
                 kmer_buckets=KmerVQVAEConfig.kmer_buckets, num_hashes=KmerVQVAEConfig.num_hashes,
                 window_size=KmerVQVAEConfig.window_size, kmer_pool=KmerVQVAEConfig.kmer_pool,
                 max_windows=KmerVQVAEConfig.max_windows, hash_version=KmerVQVAEConfig.hash_version,
                 word_hashes=KmerVQVAEConfig.word_hashes, word_buckets=KmerVQVAEConfig.word_buckets, **_model_keys):
        # one source of defaults: a tokenizer built with defaults feeds a default model its own windows
        if not (1 <= kmer_len <= 8):
            raise ValueError(f"kmer_len must be in 1..8, got {kmer_len}")
        if num_hashes > len(_HASH_MULTIPLIERS):
            raise ValueError(f"num_hashes must be <= {len(_HASH_MULTIPLIERS)}")
        if hash_version not in (1, 2):
            raise ValueError(f"hash_version must be 1 or 2, got {hash_version}")
        if word_hashes and (hash_version != 2 or num_hashes + word_hashes > len(_HASH32_MULTIPLIERS)):
            raise ValueError(f"word_hashes needs hash_version 2 and num_hashes + word_hashes <= "
                             f"{len(_HASH32_MULTIPLIERS)}, got {word_hashes} with {num_hashes}, version {hash_version}")
        self.word_hashes, self.word_buckets = word_hashes, word_buckets
        self.k, self.stride, self.buckets = kmer_len, kmer_stride, kmer_buckets
        self.num_hashes, self.window_size, self.pool = num_hashes, window_size, kmer_pool
        self.max_windows, self.hash_version = max_windows, hash_version
        self.kmers_per_window = window_size * kmer_pool
        self.window_bytes = (self.kmers_per_window - 1) * kmer_stride + kmer_len

    @classmethod
    def from_config(cls, cfg: dict | KmerVQVAEConfig) -> "KmerTokenizer":
        return cls(**config_dict(cfg))

    def split_windows(self, text: str, max_windows: int | None = None) -> list[str]:
        """Normalise and cut one text into window texts (always at least one, maybe empty)."""
        data = normalize_text(text).encode("utf-8")
        return [w.decode("utf-8") for w in self._split_bytes(data, max_windows)]

    def _split_bytes(self, data: bytes, max_windows: int | None = None) -> list[bytes]:
        if len(data) <= self.window_bytes:
            return [data]
        limit = self.max_windows if max_windows is None else max_windows
        out, start, budget = [], 0, self.window_bytes
        while start < len(data) and (limit <= 0 or len(out) < limit):
            end = start + budget
            if end >= len(data):
                out.append(data[start:])
                break
            cut = data.rfind(b" ", start + budget // 2, end + 1)
            if cut < 0:  # no space: cut at a character boundary (skip UTF-8 continuation bytes)
                cut = end
                while cut > start and (data[cut] & 0xC0) == 0x80:
                    cut -= 1
            out.append(data[start:cut])
            start = cut + 1 if data[cut:cut + 1] == b" " else cut
        return out

    def _kmer_values(self, rows: np.ndarray, W: int, L: int, R: int) -> np.ndarray:
        """Each k-gram of `rows` (W rows of R bytes, zero-padded) as one big-endian integer: (W, L)."""
        wide = np.uint64 if self.k > 4 or self.hash_version == 1 else np.uint32
        if self.k in (1, 2, 4, 8):  # read straight from the bytes
            view = np.ndarray((W, L), dtype=f">u{self.k}", buffer=rows, strides=(R, self.stride))
            return view.astype(wide)
        value = np.zeros((W, L), dtype=wide)
        for j in range(self.k):
            col = np.ndarray((W, L), dtype=np.uint8, buffer=rows, offset=j, strides=(R, self.stride))
            value = (value << wide(8)) | col.astype(wide)
        return value

    def _word_values(self, rows: np.ndarray, W: int, L: int, R: int) -> tuple[np.ndarray, np.ndarray]:
        """For each k-mer of `rows` (W rows of R bytes): a 32-bit value of the word its first byte belongs
        to, and whether there is one: (W, L) uint32, (W, L) bool. A word is a run of ASCII letters and
        digits and non-ASCII bytes; a k-mer starting on a space or a symbol belongs to the next word of
        its row. The value is a polynomial hash of the word's bytes (mod 2^32) mixed with its length, so
        it depends on the word alone, not on where it stands."""
        b = rows[:W * R].reshape(W, R)
        is_w = (b >= 0x80) | ((b >= 0x30) & (b <= 0x39)) | ((b >= 0x61) & (b <= 0x7A)) | ((b >= 0x41) & (b <= 0x5A))
        prev = np.zeros_like(is_w)
        prev[:, 1:] = is_w[:, :-1]
        nxt = np.zeros_like(is_w)
        nxt[:, :-1] = is_w[:, 1:]
        start, end = (is_w & ~prev).ravel(), (is_w & ~nxt).ravel()
        gid = np.cumsum(start).reshape(W, R)  # 1-based word number over the whole batch (0: none yet)
        pw, pinv = self._powers(W * R)
        term = np.where(is_w.ravel(), b.ravel().astype(np.uint32) * pw, np.uint32(0))
        csum = np.cumsum(term, dtype=np.uint32)
        s, e = np.flatnonzero(start), np.flatnonzero(end)
        value = np.zeros(len(s) + 1, dtype=np.uint32)
        value[1:] = ((csum[e] - csum[s] + term[s]) * pinv[s]) ^ ((e - s + 1).astype(np.uint32) * np.uint32(0x9E3779B1))
        first = np.arange(L) * self.stride  # each k-mer's first byte
        g = gid[:, first]
        own = is_w[:, first]
        has = own | (gid[:, -1:] > g)  # on a word, or a later word in the row
        idx = np.where(own, g, g + 1) * has
        return value[idx], has

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P^i and P^-i mod 2^32 for i < n (P odd, so invertible), cached and grown as needed."""
        cache = getattr(self, "_pow_cache", None)
        if cache is None or len(cache[0]) < n:
            m = max(n, 1 << 14)
            P = np.uint32(0x01000193)  # FNV's 32-bit prime
            P_inv = np.uint32(pow(int(P), -1, 1 << 32))
            ones = np.ones(1, dtype=np.uint32)
            cache = (np.concatenate((ones, np.cumprod(np.full(m - 1, P, dtype=np.uint32), dtype=np.uint32))),
                     np.concatenate((ones, np.cumprod(np.full(m - 1, P_inv, dtype=np.uint32), dtype=np.uint32))))
            self._pow_cache = cache
        return cache[0][:n], cache[1][:n]

    def _hash(self, value: np.ndarray, count: int | None = None, first: int = 0, buckets: int = 0) -> np.ndarray:
        """k-gram integers (W, L) -> bucket ids in [1, B - 1], (count, W, L) int32/int64, with the hash
        functions first .. first + count - 1 (count defaults to num_hashes, B to kmer_buckets)."""
        H, B = self.num_hashes if count is None else count, buckets or self.buckets
        if self.hash_version == 1:  # 64-bit multiply-xorshift, reduced modulo B - 1
            h = (value + np.uint64(1))[None] * _HASH_MULTIPLIERS[:H, None, None]
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
            return (h % np.uint64(B - 1)).astype(np.int64) + 1
        if value.dtype == np.uint64:  # k > 4: fold to 32 bits first
            value = ((value >> np.uint64(32)) ^ (value * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(32))
                     ^ value).astype(np.uint32)
        out = np.empty((H,) + value.shape, dtype=np.uint32)
        for i in range(H):  # a 32-bit multiply-xorshift permutation per hash, then multiply-shift range
            h = out[i]
            np.multiply(value, _HASH32_MULTIPLIERS[first + i], out=h)
            h ^= h >> np.uint32(16)
            h *= np.uint32(0x7FEB352D)
            h ^= h >> np.uint32(15)
            if B - 1 <= 0xFFFF:
                h >>= np.uint32(16)
                h *= np.uint32(B - 1)
                h >>= np.uint32(16)
                h += np.uint32(1)
            else:
                out[i] = (h.astype(np.uint64) * np.uint64(B - 1) >> np.uint64(32)).astype(np.uint32) + 1
        return out.view(np.int32)

    def encode_windows(self, windows: list[str] | list[bytes], pad_to_window: bool = False) -> dict:
        """Window texts (already normalised: from split_windows) -> input_ids (W, L[, H]) and
        attention_mask (W, L).

        L is the longest window's k-mer count rounded up to a multiple of kmer_pool (at most
        window_size * kmer_pool), so a batch of short queries is not padded to a full window;
        `pad_to_window` forces the full length. Padding never changes the encoder's output.
        """
        data = [w if isinstance(w, bytes) else w.encode("utf-8") for w in windows]
        W = len(data)
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=W)
        n_kmers = np.clip((lengths - self.k) // self.stride + 1, 1, self.kmers_per_window)
        L = self.kmers_per_window
        if not pad_to_window and W:
            L = min(L, -(-int(n_kmers.max()) // self.pool) * self.pool)
        R = (L - 1) * self.stride + self.k  # bytes a full row of L k-mers reads
        rows = np.frombuffer(b"".join([d[:R].ljust(R, b"\0") for d in data]) + bytes(8), dtype=np.uint8)
        ids = self._hash(self._kmer_values(rows, W, L, R))  # (H, W, L)
        mask = np.arange(L)[None, :] < n_kmers[:, None]  # (W, L)
        ids *= mask[None].astype(ids.dtype)  # padding -> 0
        if self.word_hashes:  # the word of each k-mer, through hash functions the k-mers do not use
            value, has = self._word_values(rows, W, L, R)
            words = self._hash(value, self.word_hashes, first=self.num_hashes, buckets=self.word_buckets)
            words *= (has & mask)[None].astype(words.dtype)  # no word (or padding) -> 0
            ids = np.concatenate((ids, words))
        ids = ids[0] if len(ids) == 1 else np.moveaxis(ids, 0, -1)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def __call__(self, texts: list[str] | str, max_windows: int | None = None) -> dict:
        """Texts -> batch of windows plus `text_index` (W,) mapping each window to its text."""
        if isinstance(texts, str):
            texts = [texts]
        per_text = [self._split_bytes(d, max_windows) for d in normalize_batch(texts)]
        windows = [w for ws in per_text for w in ws]
        batch = self.encode_windows(windows)
        counts = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        batch["text_index"] = torch.from_numpy(np.repeat(np.arange(len(texts)), counts))
        batch["window_texts"] = [w.decode("utf-8") for w in windows]
        batch["num_texts"] = len(texts)
        return batch


# ----------------------------------------------------------------------------------------------
# Encoder


class SelfAttention(nn.Module):
    """Separate q/k/v/out projections so LoRA can target Q and V alone."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, key_mask):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, h, T, d)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: KmerVQVAEConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, key_mask):
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


def rows_summed(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """`table`'s rows for ids (B, L) -> (B, L, D), or for ids (B, L, H) summed over the H hash functions.
    The gather and the sum are one `embedding_bag`, which never builds the (B, L, H, D) tensor of rows:
    the lookup-then-sum's values and gradients (sparse when the table is, as the optimizer expects;
    bit-identical for two hashes, tested), ~2x faster on this CPU (README "One gather for the hashed rows"). The
    padding id adds nothing, as its row (zero, never updated) does in a lookup."""
    if ids.dim() == 2:
        return table(ids)
    B, L, H = ids.shape
    return F.embedding_bag(ids.reshape(B * L, H), table.weight, mode="sum", sparse=table.sparse,
                           padding_idx=table.padding_idx).view(B, L, -1)


class KmerEncoder(nn.Module):
    """Hashed k-mer embedding -> optional pooling -> positions -> pre-LN blocks -> masked mean."""

    def __init__(self, cfg: KmerVQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.kmer_buckets, cfg.d_model, padding_idx=0)
        self.pos = nn.Embedding(cfg.window_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.word_hashes:  # starts at zero: a word no step has looked up adds nothing to its k-mers
            self.word_embed = nn.Embedding(cfg.word_buckets, cfg.d_model, padding_idx=0)
            nn.init.zeros_(self.word_embed.weight)
        if cfg.bag_path:
            self.ln_bag = nn.LayerNorm(cfg.d_model)
            self.bag_weight = nn.Embedding(cfg.kmer_buckets, 1, padding_idx=0)  # log-weight per k-mer id
            nn.init.zeros_(self.bag_weight.weight)  # starts as the plain mean
            if cfg.word_hashes:  # a log-weight per word id too, so a whole word can weigh less or more
                self.word_weight = nn.Embedding(cfg.word_buckets, 1, padding_idx=0)
                nn.init.zeros_(self.word_weight.weight)
        else:
            self.ln_f = nn.LayerNorm(cfg.d_model)
        self.bypass_blocks = False  # not state: Phase 1a sets it during its bag stage
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        if cfg.residual_init not in ("zero", "normal"):
            raise ValueError(f"residual_init must be 'zero' or 'normal', got {cfg.residual_init!r}")
        if cfg.residual_init == "zero":  # ReZero-style start (Bachlechner et al. 2020, arXiv:2003.04887)
            for blk in self.blocks:
                for layer in (blk.attn.out_proj, blk.mlp[2]):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def kmer_tables(self) -> list[nn.Embedding]:
        """The tables indexed by hashed id (the k-mer and word embeddings, and the bag path's log-weights)."""
        tables = [self.embed] + ([self.word_embed] if self.cfg.word_hashes else [])
        if self.cfg.bag_path:
            tables += [self.bag_weight] + ([self.word_weight] if self.cfg.word_hashes else [])
        return tables

    def forward(self, input_ids, attention_mask):
        """-> (z_e (B, D), positions (B,)). While `bypass_blocks` is set (Phase 1a's bag stage, with
        residual_init "zero" and the blocks not yet trained, so each block is exactly the identity)
        the blocks are skipped, which is exact and several times cheaper.

        With `bag_path`, z_e = sum_i w_i LN(e_i) / sum_i w_i over every k-mer i (w_i = exp of a
        learned scalar per k-mer id, so frequent uninformative k-mers can weigh less, as SIF weights
        do for words), plus the mean over pooled positions of what the blocks add to their input."""
        mask = attention_mask.bool()
        Hw = self.cfg.word_hashes
        kmer_ids = input_ids[..., :-Hw] if Hw else input_ids  # the last Hw ids of a k-mer are its word's
        word_ids = input_ids[..., -Hw:] if Hw else None
        x = rows_summed(self.embed, kmer_ids)  # (B, L, D): multi-hash sums the hash functions' embeddings
        if Hw:
            x = x + rows_summed(self.word_embed, word_ids)
        bag = None
        if self.cfg.bag_path:
            s = rows_summed(self.bag_weight, kmer_ids)  # (B, L, 1)
            if Hw:
                s = s + rows_summed(self.word_weight, word_ids)
            w = torch.exp(s.float().clamp(-10, 10)) * mask[..., None]
            bag = (self.ln_bag(x).float() * w).sum(1) / w.sum(1).clamp(min=1e-6)
        P = self.cfg.kmer_pool
        B, L = mask.shape
        if P > 1:  # CANINE-style downsampling: each group of P k-mers is one position
            if L % P:
                raise ValueError(f"sequence length {L} is not a multiple of kmer_pool {P}")
            group = mask.view(B, L // P, P).float()
            mask = group.sum(2) > 0  # (B, L/P)
        T = mask.shape[1]
        if T > self.cfg.window_size:
            raise ValueError(f"{T} positions exceed window_size {self.cfg.window_size}")
        positions = mask.sum(1)
        if bag is not None and (self.bypass_blocks or not len(self.blocks)):
            return bag.to(x.dtype), positions  # the bag alone: the pooled embeddings are never built
        if P > 1:  # their mean
            x = (x.view(B, L // P, P, -1) * group[..., None]).sum(2) / group.sum(2, keepdim=True).clamp(min=1)
        m = mask.to(x.dtype)[..., None]
        x = x + self.pos.weight[:T]
        h = x
        for blk in () if self.bypass_blocks else self.blocks:
            h = blk(h, mask)
        if bag is not None:  # the blocks' contribution (zero while they are the identity)
            return (bag + ((h - x) * m).sum(1).float() / m.sum(1).clamp(min=1).float()).to(x.dtype), positions
        h = self.ln_f(h)
        return (h * m).sum(1) / m.sum(1).clamp(min=1), positions  # (B, D), (B,) positions


# ----------------------------------------------------------------------------------------------
# Quantiser


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _all_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `t` over ranks (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def on_every_rank(flag: bool) -> bool:
    """True only if `flag` holds on every rank (one all-reduce; the flag itself in one process): a
    decision before a collective (an early return, a skipped step) must be taken by all ranks."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)
    return flag


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator, cosine: bool) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn far from the others."""
    n = x.shape[0]
    dist_fn = (lambda c: (1 - x @ c).clamp(min=0)) if cosine else (lambda c: (x - c).pow(2).sum(1))
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = dist_fn(x[idx[0]])
    for _ in range(1, k):
        w = d2.double().cpu()
        j = int(torch.multinomial(w / w.sum(), 1, generator=g)) if w.sum() > 0 else int(torch.randint(n, (1,), generator=g))
        idx.append(j)
        d2 = torch.minimum(d2, dist_fn(x[j]))
    c = x[torch.tensor(idx, device=x.device)].clone()
    return c + 1e-3 * torch.randn(c.shape, generator=g).to(c.device)  # duplicates (n < k) drift apart


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, cosine: bool = True):
    """Plain (spherical) k-means; returns (centroids (k, d), counts (k,)). Used for codebook init."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    if cosine:
        x = F.normalize(x, dim=-1)
    n = x.shape[0]
    c = _kmeans_pp(x, k, g, cosine)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1) if cosine else torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters from random samples
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=g).to(x.device)]
        if cosine:
            c = F.normalize(c, dim=-1)
    return c, counts


class VectorQuantizer(nn.Module):
    """Codebook with EMA / gradient / frozen updates, straight-through, commitment, diversity,
    dead-code restart. All state in the state_dict; maths in fp32 even under autocast.

    EMA update as in van den Oord et al. 2017, appendix A.1 (https://arxiv.org/abs/1711.00937),
    with Laplace smoothing of the counts as in vector-quantize-pytorch 1.14..1.32 (1.34 smooths
    differently: (sum + eps * code) / (count + eps)).
    """

    def __init__(self, cfg: KmerVQVAEConfig):
        super().__init__()
        K, cd = cfg.num_codes, cfg.code_dim or cfg.d_model
        self.K, self.cosine = K, cfg.distance == "cosine"
        if cfg.distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {cfg.distance!r}")
        self.decay, self.eps, self.tau = cfg.ema_decay, cfg.ema_eps, cfg.diversity_temperature
        self.commitment_weight = cfg.commitment_weight
        self.in_proj = nn.Linear(cfg.d_model, cd) if cd != cfg.d_model else nn.Identity()
        self.out_proj = nn.Linear(cd, cfg.d_model) if cd != cfg.d_model else nn.Identity()
        cb = torch.randn(K, cd)
        self.codebook = nn.Parameter(F.normalize(cb, dim=-1) if self.cosine else cb, requires_grad=False)
        self.register_buffer("ema_count", torch.ones(K))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("avg_probs", torch.full((K,), 1.0 / K))  # running mean soft assignment
        # the same running mean while the codebook is frozen (Phases 1b/2): the diversity loss must
        # see usage move, yet a frozen codebook leaves the checkpoint's state untouched: not saved
        self.register_buffer("live_probs", torch.full((K,), 1.0 / K), persistent=False)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("z_mean", torch.zeros(cd))  # running mean of in_proj(z_e), when centring
        self.center = cfg.center_codes
        self.mode = "ema"  # "ema" | "grad" | "frozen"; not state: the training script sets it
        # True: forward() in training updates the codebook statistics from its own batch. False: the
        # training script feeds them separately through observe() (Phase 1a's --codebook_windows).
        self.track_batch = True

    def set_mode(self, mode: str):
        if mode not in ("ema", "grad", "frozen"):
            raise ValueError(f"codebook mode must be ema, grad or frozen, got {mode!r}")
        self.mode = mode
        self.codebook.requires_grad_(mode == "grad")
        if mode == "frozen":
            self.live_probs.copy_(self.avg_probs)

    def offset(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder space -> code space before normalisation: in_proj(z), minus the running mean when centring."""
        z = self.in_proj(z.float())
        return z - self.z_mean if self.center else z

    def unit(self, zr: torch.Tensor) -> torch.Tensor:
        """Code space before normalisation -> the codes' space (normalised for cosine distance)."""
        return F.normalize(zr, dim=-1) if self.cosine else zr

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder space -> code space (normalised for cosine distance)."""
        return self.unit(self.offset(z))

    def _codes(self):
        return F.normalize(self.codebook, dim=-1) if self.cosine else self.codebook

    def similarity(self, zc: torch.Tensor) -> torch.Tensor:
        """(B, cd) code-space vectors -> (B, K) scores, higher = nearer."""
        cb = self._codes()
        if self.cosine:
            return zc @ cb.T
        return -(zc.pow(2).sum(1, keepdim=True) - 2 * zc @ cb.T + cb.pow(2).sum(1)[None])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids -> quantised vectors in code space (what `z_q` holds)."""
        return self._codes()[indices]

    def forward(self, z: torch.Tensor, top_n: int = 1, update: bool = False) -> dict:
        """Nearest codes and the VQ losses. The codebook statistics change only with update=True,
        which only a training step passes (KmerVQVAE.forward in training mode): inference never
        changes the model, whatever the module's mode."""
        update = update and self.training
        track = update and self.track_batch
        with torch.autocast(device_type=z.device.type, enabled=False):
            if track or (update and not bool(self.initialized)):
                self._track_mean(z)  # before the k-means init the training batches set the mean
            zr = self.offset(z)  # (B, cd)
            zc = self.unit(zr)  # = self.project(z)
            sim = self.similarity(zc)  # (B, K)
            top = sim.topk(min(top_n, self.K), dim=1).indices
            idx = top[:, 0]
            zq = self.decode_indices(idx)
            out = {"z_code": zc, "z_code_raw": zr, "indices": idx, "top_indices": top, "code_scores": sim}
            commit = F.mse_loss(zc, zq.detach())
            if self.mode == "grad":
                commit = commit + F.mse_loss(zq, zc.detach())  # codebook loss (VQ-VAE eq. 3)
            out["commit_loss"] = self.commitment_weight * commit
            p_batch = self._logits(sim).softmax(-1).mean(0)  # (K,) mean soft assignment
            out["diversity_loss"] = self.diversity_loss(p_batch)
            out["z_q"] = zc + (zq - zc).detach() if self.mode != "grad" else zq + (zc - zc.detach())
            if track:
                self._track_codes(zc.detach(), p_batch.detach(), idx)
        return out

    @torch.no_grad()
    def observe(self, z: torch.Tensor) -> torch.Tensor:
        """Update the codebook statistics (mean, EMA, running assignment) from encoder outputs that
        are not being trained on; returns their code ids. Every rank must call it (all-reduces)."""
        z = z.float()
        if z.shape[0] == 0:  # nothing to learn from (an empty mean would put NaN in the statistics)
            return torch.zeros(0, dtype=torch.long, device=z.device)
        self._track_mean(z)
        zc = self.project(z)
        sim = self.similarity(zc)
        idx = sim.argmax(1)
        self._track_codes(zc, self._logits(sim).softmax(-1).mean(0), idx)
        return idx

    @torch.no_grad()
    def _track_mean(self, z: torch.Tensor):
        """Statistics step 1, before projecting: the running mean that centring subtracts. It is
        tracked from the first training step, so the decoder's input does not jump at the k-means
        init (it did when the mean was first set there: README "Codebook health")."""
        if self.center and self.mode != "frozen":
            self.update_mean(z)

    @torch.no_grad()
    def _track_codes(self, zc: torch.Tensor, p_batch: torch.Tensor, idx: torch.Tensor):
        """Statistics step 2: the running mean assignment (diversity) and the EMA codebook."""
        self._usage().lerp_(_all_mean_(p_batch.clone()), 1 - self.decay)
        if self.mode == "ema" and bool(self.initialized):
            self.ema_update(zc, idx)

    def _usage(self) -> torch.Tensor:
        """The running mean assignment the diversity loss reads and the statistics update."""
        return self.live_probs if self.mode == "frozen" else self.avg_probs

    def _logits(self, sim: torch.Tensor) -> torch.Tensor:
        return sim / self.tau if self.cosine else sim / (self.tau * sim.detach().abs().mean().clamp(min=1e-6))

    def diversity_loss(self, p_batch: torch.Tensor) -> torch.Tensor:
        """1 - H(mean soft assignment)/log K, in [0, 1], using a running (EMA) mean assignment.

        p_batch: this batch's mean soft assignment (K,). A batch of B examples can show at most B
        codes, so the value is that of the running estimate and the gradient is its first-order
        term through the current batch.
        """
        run = self._usage().clamp(min=1e-12)
        log_k = math.log(self.K)
        value = 1 + (run * run.log()).sum() / log_k
        slope = (run.clamp(min=0.01 / self.K).log() + 1) / log_k  # dH/dp, bounded for unused codes
        grad_term = ((p_batch - run) * slope).sum()
        grad_term = grad_term - grad_term.detach()  # value is the running estimate's; gradient is first-order
        return value + grad_term  # forward() then updates the running estimate (_track_codes)

    @torch.no_grad()
    def update_mean(self, z: torch.Tensor):
        """EMA of the batch mean of in_proj(z): the common direction that cosine codes must ignore.
        The first batch sets it (an all-zero mean means "not started": a lerp from zero would lag)."""
        batch_mean = _all_mean_(self.in_proj(z.detach().float()).mean(0))
        if bool(self.z_mean.any()):
            self.z_mean.lerp_(batch_mean, 1 - self.decay)
        else:
            self.z_mean.copy_(batch_mean)

    @torch.no_grad()
    def ema_update(self, zc: torch.Tensor, idx: torch.Tensor):
        counts = torch.bincount(idx, minlength=self.K).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, zc.float())
        _all_reduce_(counts), _all_reduce_(sums)  # every rank applies the same update
        self.ema_count.lerp_(counts, 1 - self.decay)
        self.ema_sum.lerp_(sums, 1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.K * self.eps) * total
        new = self.ema_sum / smoothed[:, None]
        self.codebook.data.copy_(F.normalize(new, dim=-1) if self.cosine else new)

    @torch.no_grad()
    def init_from_samples(self, z: torch.Tensor, batch_size: int, iters: int = 20, seed: int = 0):
        """k-means initialisation on encoder outputs (rank 0 decides, all ranks receive)."""
        if self.center and not bool(self.z_mean.any()):  # no training step tracked it yet
            self.z_mean.copy_(self.in_proj(z.float()).mean(0))
        zc = self.project(z)
        centroids, counts = spherical_kmeans(zc, self.K, iters=iters, seed=seed, cosine=self.cosine)
        self.codebook.data.copy_(centroids.to(self.codebook))
        self.ema_count.copy_(counts * (batch_size / max(1, zc.shape[0])))  # per-step scale
        self.ema_sum.copy_(self.codebook.data * self.ema_count[:, None])
        self.avg_probs.copy_((counts + 1) / (counts + 1).sum())
        self.initialized.fill_(True)
        for t in (self.codebook.data, self.ema_count, self.ema_sum, self.avg_probs, self.z_mean):
            _broadcast_(t)

    @torch.no_grad()
    def restart_dead_codes(self, z_recent: torch.Tensor, batch_size: int, threshold: float,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed codes whose EMA usage < threshold * B/K from recent encoder outputs."""
        expected = batch_size / self.K
        dead = self.ema_count < threshold * expected
        n = int(dead.sum())  # the same on every rank: the EMA counts are all-reduced
        if n == 0 or not on_every_rank(z_recent.shape[0] > 0):  # decided together: the broadcasts below
            return 0
        zc = self.project(z_recent)
        pick = torch.randint(zc.shape[0], (n,), generator=generator).to(zc.device)
        noise = 0.01 * torch.randn(n, zc.shape[1], generator=generator).to(zc.device)
        new = zc[pick] + noise
        self.codebook.data[dead] = F.normalize(new, dim=-1) if self.cosine else new
        self.ema_count[dead] = expected
        self.ema_sum[dead] = self.codebook.data[dead] * expected
        for t in (self.codebook.data, self.ema_count, self.ema_sum):
            _broadcast_(t)  # rank 0's choice wins
        return n

    def running_perplexity(self) -> float:
        p = self.ema_count / self.ema_count.sum().clamp(min=1e-12)
        return float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum()))


def codebook_health(indices, num_codes: int) -> dict:
    """Perplexity exp(H(usage)), utilisation, dead codes, largest code share over an eval set."""
    idx = torch.as_tensor(indices).flatten().long()
    counts = torch.bincount(idx, minlength=num_codes).float()
    p = counts / counts.sum().clamp(min=1)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(h.exp()), "utilisation": used / num_codes, "dead_codes": num_codes - used,
            "max_code_share": float(p.max()), "n": int(idx.numel())}


# ----------------------------------------------------------------------------------------------
# Model


class KmerVQVAE(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = KmerVQVAEConfig(**config_dict(config))
        cfg = self.config
        self.encoder = KmerEncoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = nn.Sequential(nn.Linear(cfg.d_model, cfg.decoder_hidden), nn.GELU(),
                                     nn.Linear(cfg.decoder_hidden, cfg.teacher_dim))

    def config_dict(self) -> dict:
        return asdict(self.config)

    def tokenizer(self) -> KmerTokenizer:
        return KmerTokenizer.from_config(self.config)

    def encode_windows(self, input_ids, attention_mask, text_index=None, num_texts=None):
        """Windows -> one z_e per text (length-weighted mean of its windows' vectors)."""
        z, lengths = self.encoder(input_ids, attention_mask)  # (W, D), (W,)
        if text_index is None:
            return z
        n = int(num_texts) if num_texts is not None else int(text_index.max()) + 1
        w = lengths.to(z.dtype)[:, None]
        num = torch.zeros(n, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, text_index, z * w)
        den = torch.zeros(n, 1, dtype=z.dtype, device=z.device).index_add_(0, text_index, w)
        return num / den.clamp(min=1)

    def encode(self, input_ids, attention_mask, text_index=None, num_texts=None, adapter=None,
               role: str | None = None, top_n: int = 1) -> dict:
        """Dict with z_e (B, D), z_code (B, cd), z_code_raw (B, cd), z_q (B, cd), indices (B,), top_indices (B, n).

        z_code is z_code_raw normalised (cosine codebooks): the codes compare it; an index fitted to a corpus
        routes on z_code_raw, so its own centring and whitening see the encoder's geometry (README "Filter quality").

        `adapter` is a Phase 2 `QueryPassageAdapters`; `role` is "query" or "passage".
        """
        z_e = self.encode_windows(input_ids, attention_mask, text_index, num_texts)
        if adapter is not None:
            if role not in ("query", "passage"):
                raise ValueError("role must be 'query' or 'passage' when an adapter is given")
            z_e = adapter(z_e, role)
        out = self.quantizer(z_e, top_n=top_n)
        out["z_e"] = z_e
        return out

    def decode(self, z_code: torch.Tensor) -> torch.Tensor:
        """Code-space vector -> teacher space."""
        w = self.decoder[0].weight  # a method, not a tensor, once int8 dynamic quantisation replaced the layer
        dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float
        return self.decoder(self.quantizer.out_proj(z_code).to(dtype))

    def forward(self, input_ids, attention_mask, teacher=None, text_index=None, num_texts=None,
                continuous_weight: float = 1.0, relational_weight: float = 0.0, quantize: bool = True,
                target_center: torch.Tensor | None = None, contrastive_weight: float = 0.0,
                contrastive_temperature: float = 0.05, contrastive_bank: torch.Tensor | None = None,
                contrastive_soft: float = 0.0, target_transform: torch.Tensor | None = None):
        """Training forward: losses against teacher embeddings (B, teacher_dim).

        target_center (teacher_dim,): the cosine losses compare decoded - center with teacher - center,
        so they reward what tells texts apart rather than the direction all of them share (the decoder
        still outputs the teacher's own space). contrastive_weight: in-batch InfoNCE that each decoded
        vector picks its own teacher target among the batch's (continuous path), and among
        contrastive_bank's (earlier batches' targets, already minus the centre) when given; out["targets_c"]
        holds this batch's (targets minus the centre) for such a bank. target_transform (teacher_dim,
        teacher_dim): the losses compare (decoded - center) @ T with (teacher - center) @ T, e.g. the targets'
        principal axes rescaled as an index's half-whitened lists rescale them."""
        z_e = self.encode_windows(input_ids, attention_mask, text_index, num_texts)
        q = self.quantizer(z_e, update=self.training)  # the training path: codebook statistics may move
        dec_e = self.decode(q["z_code"])
        out = {"indices": q["indices"], "z_e": z_e, "decoded_e": dec_e}
        if teacher is None:
            return out
        t = teacher.float()
        c = target_center.float() if target_center is not None else None
        tf = target_transform.float() if target_transform is not None else None

        def shift(v):
            v = v - c if c is not None else v
            return v @ tf if tf is not None else v
        cos_e = F.cosine_similarity(dec_e.float(), t, dim=-1)
        d_e, t_c = shift(dec_e.float()), shift(t)
        loss_e = (1 - F.cosine_similarity(d_e, t_c, dim=-1)).mean()
        out.update(cos_e=cos_e.mean().detach(), loss_cont=loss_e.detach(), targets_c=t_c.detach())
        if contrastive_weight > 0:
            nce = info_nce(d_e, t_c, contrastive_temperature, contrastive_bank, contrastive_soft)
            loss_e = loss_e + contrastive_weight * nce
            out["nce"] = nce.detach()
        if relational_weight > 0:  # every stage, continuous path: the batch's similarity structure
            rel = relational_loss(d_e, t_c)
            loss_e = loss_e + relational_weight * rel
            out["relational"] = rel.detach()
        if not quantize or not bool(self.quantizer.initialized):
            out["loss"] = loss_e  # warm-up: continuous distillation only
            return out
        dec_q = self.decode(q["z_q"])
        cos_q = F.cosine_similarity(dec_q.float(), t, dim=-1)
        loss_q = (1 - F.cosine_similarity(shift(dec_q.float()), t_c, dim=-1)).mean()
        loss = loss_q + continuous_weight * loss_e + q["commit_loss"]
        out.update(cos_q=cos_q.mean().detach(), loss_q=loss_q.detach(), commit=q["commit_loss"].detach(),
                   diversity=q["diversity_loss"].detach(), decoded_q=dec_q)
        out["diversity_term"] = q["diversity_loss"]
        out["loss"] = loss
        return out


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float,
             bank: torch.Tensor | None = None, soft: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE between student vectors and their teacher targets (row i matches row i):
    per-example cosine alone lets a student sit near the common direction; this rewards ranking
    each text's own target above the other texts' (what a filter's routing needs). bank (M, D): more
    targets (of earlier batches) that each student vector must also rank its own above. soft > 0: the
    labels are not one-hot but the targets' own softmax over the same candidates at temperature soft,
    so a text whose target is close to another's is not pushed away from that one as hard."""
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    cands = t if bank is None or not len(bank) else torch.cat([t, F.normalize(bank.to(t.dtype), dim=-1)])
    logits = p @ cands.T / temperature  # (B, B + M)
    B = logits.shape[0]
    if soft > 0:
        sims = (t @ cands.T / soft).detach()  # (B, B + M): the targets' own cosines to every candidate
        labels = F.softmax(sims, dim=-1)
        back = F.softmax(sims[:, :B], dim=-1)  # each target over the B students (symmetric)
    else:
        labels = back = torch.arange(B, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :B].T, back))


def relational_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between in-batch cosine-similarity matrices (student vs teacher; both already minus the
    targets' centre when centring is on, so the shared direction does not fill every entry): how close
    two texts are to each other, which is what corpus lists are fitted to, beyond each text's own target."""
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    return F.mse_loss(p @ p.T, t @ t.T)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint problem the user can act on; the message is one line."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(write, tmp: str, path: str) -> None:
    """write(tmp) a complete file, then rename it onto `path` and fsync the folder; on any failure the
    temporary goes and `path` keeps what it held."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic save: temporary file in the same folder, fsync, rename. A crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)

    def write(_):
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    _publish(write, tmp, path)


def copy_checkpoint(src: str, dst: str) -> None:
    """Atomically make `dst` the checkpoint just written at `src` (the *_best.pt beside the latest): a hard
    link, since every save replaces its file by rename and never writes into it, so the two names part at
    the next save; a byte copy where the file system has no hard links. Either way no second
    serialisation (~3 s for the demo's 1.1 GB Phase 1a file)."""
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".tmp_{os.path.basename(dst)}link{os.getpid()}")  # save_checkpoint's prefix: cleaned up

    def write(t):
        try:
            os.link(src, t)
        except OSError:
            shutil.copyfile(src, t)
    _publish(write, tmp, dst)


def load_checkpoint(path: str, phases: tuple[str, ...] | None = None, map_location="cpu",
                    need_codebook: bool = False) -> dict:
    """torch.load(weights_only=True) with one-line errors; `phases` = accepted phases;
    need_codebook: refuse a checkpoint saved before its k-means codebook init (later phases)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or train the earlier phase first)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused: it holds objects that would run code when loaded "
                              f"({first[:120]}); only load checkpoints written by these scripts") from None
    except Exception as e:  # truncated zip, bad magic, a corrupt pickle stream: all the same to the user
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                              f"{type(e).__name__}); re-run the phase or use its previous checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a k-mer VQ-VAE checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    if phases is not None and ckpt.get("phase") not in phases:
        raise CheckpointError(f"{path} is a {ckpt.get('phase')} checkpoint, but this step needs "
                              f"{' or '.join(phases)}")
    if isinstance(ckpt.get("base_config"), dict):  # written before hash_version existed: the 64-bit hash
        ckpt["base_config"].setdefault("hash_version", 1)
        ckpt["base_config"].setdefault("residual_init", "normal")  # (an init choice: weights come from the file)
        ckpt["base_config"].setdefault("bag_path", False)
    init = ckpt.get("base_model_state_dict", {}).get("quantizer.initialized")
    if need_codebook and init is not None and not bool(init):
        raise CheckpointError(f"{path} was saved at step {ckpt.get('step')}, before its codebook's k-means init "
                              f"(after --vq_warmup_steps): train Phase 1a longer, then use its checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> KmerVQVAE:
    """Rebuild the plain model; a config/state mismatch is one line, not a state_dict traceback."""
    try:
        model = KmerVQVAE(**ckpt["base_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config is not valid for this code: {e}") from None
    mismatch = "checkpoint weights do not match its config ({}); it was written by another version " \
               "or edited: retrain, or load it with the version that wrote it"
    try:
        result = model.load_state_dict(ckpt["base_model_state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), "shapes differ")
        raise CheckpointError(mismatch.format(first[:160])) from None
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise CheckpointError(mismatch.format(f"{len(bad)} keys differ, e.g. {bad[0]}"))
    return model


class KmerFilter:
    """A trained filter in one object: tokenizer, model, optional Phase 2 adapters."""

    def __init__(self, model: KmerVQVAE, adapters=None, checkpoint: dict | None = None):
        self.model, self.adapters = model.eval(), adapters
        self.tokenizer = model.tokenizer()
        self.bf16 = False  # encode under bf16 autocast (inference_variant(bf16=True))
        self.checkpoint = checkpoint or {}

    def inference_variant(self, int8: bool = False, bag_only: bool = False, bf16: bool = False) -> "KmerFilter":
        """A copy for faster inference, measured in benchmark.py and eval_filter.py: `int8` runs every
        Linear layer with int8 dynamic quantisation (CPU only); `bag_only` skips the transformer blocks
        and returns the weighted bag (needs `bag_path`; Phase 1b's LoRA lives in the blocks, so it is
        skipped too); `bf16` encodes under bf16 autocast (fast where the hardware multiplies bf16,
        README "Adopted: a bf16 teacher")."""
        if int8 and bf16:
            raise ValueError("choose int8 or bf16, not both")
        model, adapters = copy.deepcopy(self.model), copy.deepcopy(self.adapters)
        if bag_only:
            if not model.config.bag_path:
                raise ValueError("bag_only needs a checkpoint trained with bag_path")
            model.encoder.bypass_blocks = True
        if int8:
            if next(model.parameters()).device.type != "cpu":
                raise ValueError("int8 dynamic quantisation runs on CPU only")
            from torch.ao.quantization import quantize_dynamic
            with warnings.catch_warnings():  # torch marks its quantised tensors deprecated, not removed
                warnings.simplefilter("ignore")
                model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
                if adapters is not None:
                    adapters = quantize_dynamic(adapters, {nn.Linear}, dtype=torch.qint8)
        variant = KmerFilter(model, adapters, self.checkpoint)
        variant.bf16 = bf16
        return variant

    @torch.no_grad()
    def encode(self, texts: list[str], role: str | None = None, top_n: int = 1, batch_size: int = 256) -> dict:
        """Texts -> dict of z_e, z_code, z_code_raw, indices, top_indices (CPU tensors); role picks the adapter."""
        device = next(self.model.parameters()).device
        adapter = self.adapters if (self.adapters is not None and role is not None) else None
        parts = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenizer(texts[i:i + batch_size])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model.encode(b["input_ids"].to(device), b["attention_mask"].to(device),
                                        b["text_index"].to(device), b["num_texts"], adapter=adapter,
                                        role=role, top_n=top_n)
            parts.append({k: out[k].float().cpu() if out[k].is_floating_point() else out[k].cpu()
                          for k in ("z_e", "z_code", "z_code_raw", "indices", "top_indices")})
        if not parts:
            return {}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def load_pretrained(path: str, map_location="cpu") -> KmerFilter:
    """One call for notebooks: any phase's checkpoint -> KmerFilter (adapters when Phase 2)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = model_from_checkpoint(ckpt)
    adapters = None
    if "adapter_config" in ckpt:
        from lora_adapters import QueryPassageAdapters
        adapters = QueryPassageAdapters(**ckpt["adapter_config"])
        adapters.load_state_dict(ckpt["adapter_state_dict"])
        adapters.eval()
    return KmerFilter(model, adapters, ckpt)
