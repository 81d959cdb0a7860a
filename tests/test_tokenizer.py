import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqvae_phase1_model import (KmerTokenizer, KmerVQVAE, load_checkpoint, normalize_batch, normalize_text,
                                save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NASTY = ["", "   \t\n ", "😀🎉👍🏽", "日本語のテキストと中文", "a\ud800b\udfffc", "\x00\x01\x02\x7f\x1b[0m",
         "e\u0301 ﬁ ①", "x"]


def test_normalisation():
    assert normalize_text("  Hello\t\tWORLD \n ") == "hello world"
    assert normalize_text("ﬁ①") == "fi1"  # NFKC


@pytest.mark.parametrize("text", NASTY + ["word " * 200_000 + "x" * 1000])
def test_any_text_tokenizes(text):
    tok = KmerTokenizer(window_size=16, kmer_pool=2, kmer_buckets=1024)
    b = tok([text, "ok"])
    L = b["input_ids"].shape[1]
    assert L <= 32 and L % 2 == 0 and b["input_ids"].shape[2] == 2  # trimmed to a multiple of kmer_pool
    assert tok.encode_windows(["ok"], pad_to_window=True)["input_ids"].shape[1:] == (32, 2)
    assert b["input_ids"].min() >= 0 and b["input_ids"].max() < 1024
    assert b["attention_mask"].sum(1).min() >= 1  # every window has at least one k-mer
    assert set(b["text_index"].tolist()) == {0, 1}


def test_padding_is_zero_and_real_ids_are_not():
    tok = KmerTokenizer(window_size=8, kmer_pool=1, kmer_buckets=64, num_hashes=1)
    b = tok.encode_windows(["abcdef"], pad_to_window=True)
    ids, mask = b["input_ids"][0], b["attention_mask"][0]
    assert mask.sum() == 3  # 6 bytes -> 3 overlapping 4-mers
    assert (ids[mask] > 0).all() and (ids[~mask] == 0).all()


def test_stride_and_kmers():
    tok = KmerTokenizer(kmer_len=4, kmer_stride=4, window_size=8, kmer_pool=1, num_hashes=1)
    b = tok(["abcdabcdabcd"])  # three identical non-overlapping 4-mers
    ids = b["input_ids"][0][b["attention_mask"][0]]
    assert ids.tolist() == [ids[0].item()] * 3


def test_windows_cut_at_whitespace_and_cover_text():
    tok = KmerTokenizer(window_size=16, kmer_pool=1)
    text = " ".join(f"word{i}" for i in range(60))
    windows = tok.split_windows(text, max_windows=0)
    assert len(windows) > 1
    assert " ".join(windows) == normalize_text(text)
    assert all(len(w.encode()) <= tok.window_bytes for w in windows)
    assert all(not w.startswith(" ") and not w.endswith(" ") for w in windows)


def test_max_windows_truncates():
    tok = KmerTokenizer(window_size=8, kmer_pool=1, max_windows=3)
    assert len(tok.split_windows("abc " * 1000)) == 3


def test_same_ids_across_hash_seeds():
    code = ("import sys; sys.path.insert(0, %r); from vqvae_phase1_model import KmerTokenizer; "
            "print(KmerTokenizer()(['Hello, wörld! 日本'])['input_ids'].sum().item())" % REPO)
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert len(outs) == 1


def test_hash_spreads_over_buckets():
    tok = KmerTokenizer(kmer_buckets=4096, num_hashes=1, window_size=64, kmer_pool=4)
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 20_000))
    ids = tok([text], max_windows=0)["input_ids"]
    counts = torch.bincount(ids[ids > 0], minlength=4096)[1:].float()
    assert counts.max() < 10 * counts.mean()  # no bucket takes a pathological share


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=400))
def test_fuzz_never_raises_and_is_deterministic(text):
    tok = KmerTokenizer(window_size=8, kmer_pool=2, kmer_buckets=512)
    a, b = tok([text]), tok([text])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["attention_mask"].any(1).all()


# Characters that make batch normalisation hard: NUL (the batch separator), whitespace of every
# kind, final sigma, combining marks, compatibility forms, surrogates.
_TRICKY = st.sampled_from(["\x00", " ", "\t", "\n", "\x1c", "\x85", "\xa0", "\u1680", "\u2028", "\u3000",
                           "\u0301", "\u0308", "Σ", "ς", "İ", "ﬁ", "①", "\ud800", "'", "A", "e"])
_TEXT = st.lists(st.one_of(st.characters(codec=None), _TRICKY), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT, max_size=8))
def test_batch_normalisation_equals_one_by_one(texts):
    assert normalize_batch(texts) == [normalize_text(t).encode("utf-8") for t in texts]


@settings(max_examples=100, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=6))
def test_batch_call_equals_split_then_encode(texts):
    tok = KmerTokenizer(window_size=4, kmer_pool=2, kmer_buckets=512, max_windows=3)
    got = tok(texts)
    windows = [tok.split_windows(t) for t in texts]
    flat = [w for ws in windows for w in ws]
    want = tok.encode_windows(flat)
    assert got["window_texts"] == flat
    assert got["text_index"].tolist() == [i for i, ws in enumerate(windows) for _ in ws]
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_hash_version_1_reproduces_the_first_tokenizer():
    # ids the 64-bit tokenizer gave (before hash_version existed): old checkpoints must see the same
    tok = KmerTokenizer(window_size=64, kmer_pool=4, hash_version=1)
    ids = tok(["hello world"])["input_ids"][0]
    assert ids.tolist() == [[814, 27702], [14832, 24440], [22709, 20475], [32095, 9364], [10721, 25562],
                            [244, 30842], [28149, 11736], [18516, 21226]]
    assert not torch.equal(ids, KmerTokenizer(window_size=64, kmer_pool=4)(["hello world"])["input_ids"][0])


@pytest.mark.parametrize("kw", [dict(), dict(kmer_len=3, kmer_stride=2), dict(kmer_len=8, kmer_stride=4),
                                dict(kmer_buckets=100_000), dict(hash_version=1)])
def test_every_geometry_hashes_into_range(kw):
    tok = KmerTokenizer(**{"num_hashes": 2, "window_size": 16, "kmer_pool": 1, **kw})
    b = tok(["The quick brown fox jumps over the lazy dog; 日本語 ünïcödé " * 3, "x", ""])
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids[mask].min() >= 1 and ids.max() < tok.buckets and (ids[~mask] == 0).all()
    assert ids[0][mask[0]].unique().numel() > 0.5 * mask[0].sum()  # distinct k-mers mostly get distinct ids


def test_old_checkpoint_keeps_its_hash(tmp_path):
    model = KmerVQVAE(d_model=16, n_layers=1, n_heads=2, num_codes=4, kmer_buckets=64, window_size=8)
    config = model.config_dict()
    del config["hash_version"]  # as written before the field existed
    save_checkpoint({"format": "kmer-vqvae/1", "phase": "phase1a", "base_config": config,
                     "base_model_state_dict": model.state_dict()}, str(tmp_path / "old.pt"))
    ckpt = load_checkpoint(str(tmp_path / "old.pt"))
    assert ckpt["base_config"]["hash_version"] == 1
    assert KmerVQVAE(**ckpt["base_config"]).tokenizer().hash_version == 1


def _reference_word_of_kmers(window: str, tok: KmerTokenizer) -> list[str | None]:
    """Plain-Python statement of the word feature: the word each k-mer's first byte belongs to (a run of
    ASCII letters and digits and non-ASCII bytes); a k-mer starting on a space or symbol takes the next
    word of its window, or none."""
    data = window.encode()
    is_w = [c >= 0x80 or chr(c).isascii() and chr(c).isalnum() for c in data]
    words, out = [], []
    for i, w in enumerate(is_w):  # (start, end) of every word
        if w and (i == 0 or not is_w[i - 1]):
            j = i
            while j < len(data) and is_w[j]:
                j += 1
            words.append((i, j))
    n = max(1, (len(data) - tok.k) // tok.stride + 1)
    for k in range(min(n, tok.kmers_per_window)):
        p = k * tok.stride
        after = [(s, e) for s, e in words if e > p]
        out.append(data[after[0][0]:after[0][1]].decode("utf-8", "replace") if after else None)
    return out


@pytest.mark.parametrize("text", ["the cat sat, on the mat; the cat!", "x", "...", "a  (b) ü-über naïve 日本 end.",
                                  "word " * 40])
def test_word_feature_is_the_word_of_each_kmer(text):
    tok = KmerTokenizer(window_size=16, kmer_pool=1, kmer_buckets=1 << 18, word_hashes=1)
    plain = KmerTokenizer(window_size=16, kmer_pool=1, kmer_buckets=1 << 18)
    b, p = tok([text]), plain([text])
    assert torch.equal(b["input_ids"][..., :2], p["input_ids"])  # the k-mer ids are unchanged
    word_ids = b["input_ids"][..., 2]
    seen = {}  # one id per word, wherever it stands; different words, different ids
    for row, window in zip(word_ids, b["window_texts"]):
        ref = _reference_word_of_kmers(window, tok)
        assert row[len(ref):].eq(0).all()  # padding
        for word, i in zip(ref, row[:len(ref)].tolist()):
            if word is None:
                assert i == 0
            else:
                assert i > 0 and seen.setdefault(word, i) == i
    assert len(set(seen.values())) == len(seen)


def test_word_feature_ignores_position_and_bad_settings_raise():
    tok = KmerTokenizer(window_size=8, kmer_pool=1, kmer_buckets=1 << 18, word_hashes=2)
    a = tok.encode_windows(["cats"])["input_ids"][0, 0, 2:]
    b = tok.encode_windows(["a b cats"])["input_ids"][0, 3, 2:]  # " cat" starts on a space: the next word
    assert torch.equal(a, b) and a[0] != a[1]
    with pytest.raises(ValueError, match="word_hashes"):
        KmerTokenizer(num_hashes=3, word_hashes=2)
    with pytest.raises(ValueError, match="word_hashes"):
        KmerTokenizer(hash_version=1, word_hashes=1)


def test_model_with_word_features_reads_them_and_keeps_them_in_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    geometry = dict(d_model=16, n_layers=1, n_heads=2, num_codes=4, kmer_buckets=1 << 12, window_size=8)
    model = KmerVQVAE(**geometry, word_hashes=1, word_buckets=512).eval()
    save_checkpoint({"format": "kmer-vqvae/1", "phase": "phase1a", "base_config": model.config_dict(),
                     "base_model_state_dict": model.state_dict()}, str(tmp_path / "w.pt"))
    tok = KmerVQVAE(**load_checkpoint(str(tmp_path / "w.pt"))["base_config"]).tokenizer()
    b = tok(["cats sit", "cats"])
    assert b["input_ids"].shape[-1] == 3 and b["input_ids"][..., 2].max() < 512

    def z(m, ids):
        with torch.no_grad():
            return m.encode(ids, b["attention_mask"], b["text_index"], b["num_texts"])["z_e"]

    plain = KmerVQVAE(**geometry).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # the same weights, without the word tables
    assert torch.allclose(z(model, b["input_ids"]), z(plain, b["input_ids"][..., :2]))  # untrained words add nothing
    with torch.no_grad():
        model.encoder.word_embed.weight.normal_(std=0.1)
        model.encoder.word_weight.weight.normal_()
    other = b["input_ids"].clone()
    other[..., 2] = torch.where(other[..., 2] > 0, other[..., 2] % 100 + 1, 0)  # other words, same k-mers
    assert not torch.allclose(z(model, b["input_ids"]), z(model, other))
