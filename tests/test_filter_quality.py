"""The pieces behind filter quality: the distillation objective (centred cosine + InfoNCE), the
lexicon and its static targets, the bag stage, and inference that never changes the model."""
import math

import pytest
import torch
import torch.nn.functional as F

from lexicon import Lexicon, words
from vqvae_phase1_model import KmerVQVAE, info_nce


def test_info_nce_is_symmetric_cross_entropy_over_the_batch():
    torch.manual_seed(0)
    p, t = torch.randn(6, 8), torch.randn(6, 8)
    sim = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).T / 0.1
    by_row = -sum(math.log(sim[i].softmax(0)[i]) for i in range(6)) / 6  # each prediction picks its target
    by_col = -sum(math.log(sim[:, i].softmax(0)[i]) for i in range(6)) / 6  # each target picks its prediction
    assert float(info_nce(p, t, 0.1)) == pytest.approx(0.5 * (by_row + by_col), rel=1e-5)
    assert float(info_nce(t, t, 0.1)) < float(info_nce(p, t, 0.1))  # matching rows score better
    # a bank of earlier targets: more candidates for each prediction's row; the column term stays in-batch
    bank = torch.randn(5, 8)
    full = torch.cat([sim, F.normalize(p, dim=-1) @ F.normalize(bank, dim=-1).T / 0.1], dim=1)
    by_row_bank = -sum(math.log(full[i].softmax(0)[i]) for i in range(6)) / 6
    assert float(info_nce(p, t, 0.1, bank)) == pytest.approx(0.5 * (by_row_bank + by_col), rel=1e-5)
    assert float(info_nce(p, t, 0.1, bank[:0])) == pytest.approx(float(info_nce(p, t, 0.1)), rel=1e-6)


def test_target_bank_keeps_the_newest_targets_of_one_stage():
    from vqvae_phase1_train import TargetBank
    bank = TargetBank(5)
    assert bank.get(True) is None
    bank.add(torch.full((3, 2), 1.0))
    bank.add(torch.full((3, 2), 2.0))
    assert bank.get(True).tolist() == [[2.0, 2.0]] * 3 + [[1.0, 1.0]] * 2  # newest first, at most 5
    assert bank.get(False) is None  # words -> windows: another centre, another kind of target
    off = TargetBank(0)
    off.add(torch.ones(3, 2))
    assert off.get(True) is None


def test_centred_cosine_loss_compares_offsets_from_the_centre(tiny_model):
    torch.manual_seed(0)
    tok = tiny_model.tokenizer()
    b = tok.encode_windows(["one window of text", "a second, different window", "and a third one"])
    t = torch.randn(3, 24)
    c = torch.randn(24)
    tiny_model.eval()
    out = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c)
    dec = out["decoded_e"]
    expected = (1 - F.cosine_similarity(dec - c, t - c, dim=-1)).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out["cos_e"]) == pytest.approx(float(F.cosine_similarity(dec, t, dim=-1).mean().detach()), rel=1e-5)
    both = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c, contrastive_weight=0.5)
    assert float(both["loss"].detach()) == pytest.approx(float((expected + 0.5 * info_nce(dec - c, t - c, 0.05)).detach()),
                                                         rel=1e-5)


def test_short_windows_cut_a_fixed_share_of_windows_to_prefixes_at_a_space():
    """--short_windows: about the asked share of windows become a prefix of themselves ending at a word, the
    same prefix every time a text comes back (the teacher cache keys on the text), the rest stay whole."""
    from vqvae_phase1_train import shorten
    windows = [f"window {i} " + "with some words in it, " * 10 for i in range(2000)]
    cut = [shorten(w, 0.3) for w in windows]
    changed = [(c, w) for c, w in zip(cut, windows) if c != w]
    assert 0.25 < len(changed) / len(windows) < 0.35
    assert all(w.startswith(c) and w[len(c)] == " " and 12 <= len(c) < len(w) for c, w in changed)
    assert len({len(c) for c, _ in changed}) > 20  # lengths spread, not one fixed cut
    assert [shorten(w, 0.3) for w in windows] == cut  # deterministic per text
    assert [shorten(w, 0.0) for w in windows] == windows
    assert all(shorten(w, 1.0) != w for w in windows)


def test_target_transform_compares_both_sides_in_the_transformed_space(tiny_model):
    """--target_whiten: decoded and target minus the centre, then both times the same matrix, in the cosine
    loss and the InfoNCE; the identity changes nothing, and a half-whitening from routing_transform is what
    the losses use."""
    from kmer_index import routing_transform
    torch.manual_seed(0)
    tok = tiny_model.tokenizer()
    b = tok.encode_windows(["one window of text", "a second, different window", "and a third one"])
    t, c = torch.randn(3, 24), torch.randn(24)
    tiny_model.eval()
    plain = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c, contrastive_weight=0.5)
    same = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c, contrastive_weight=0.5,
                      target_transform=torch.eye(24))
    assert float(same["loss"].detach()) == pytest.approx(float(plain["loss"].detach()), rel=1e-6)
    w = torch.from_numpy(routing_transform(torch.randn(200, 24).numpy() * torch.linspace(0.1, 3, 24).numpy(),
                                           True, 0.5)[1])
    out = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c, contrastive_weight=0.5,
                     target_transform=w)
    dec = out["decoded_e"]
    d_w, t_w = (dec - c) @ w, (t - c) @ w
    expected = (1 - F.cosine_similarity(d_w, t_w, dim=-1)).mean() + 0.5 * info_nce(d_w, t_w, 0.05)
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out["loss"].detach()) != pytest.approx(float(plain["loss"].detach()), rel=1e-3)
    assert torch.allclose(out["targets_c"], t_w)  # a bank holds targets in the space the losses compare
    assert float(out["cos_e"]) == pytest.approx(float(plain["cos_e"]), rel=1e-6)  # the log stays the raw cosine


class _FakeTokenizer:  # a WordPiece vocabulary and its greedy longest-match split, as BERT's tokenizer does
    vocab = {"apple": 0, "##s": 1, "tree": 2, "a": 3, "[UNK]": 4}

    def tokenize(self, word):
        out = []
        while word:
            cut = next((n for n in range(len(word), 0, -1) if ("##" if out else "") + word[:n] in self.vocab), 0)
            if not cut:
                return ["[UNK]"]
            out.append(("##" if out else "") + word[:cut])
            word = word[cut:]
        return out


class _FakeTeacherModel:  # only the tokenizer is read from it
    tokenizer = _FakeTokenizer()


class _Teacher:
    model = _FakeTeacherModel()

    def embed(self, texts):
        g = torch.Generator().manual_seed(1)
        table = {w: torch.randn(8, generator=g) for w in sorted(set(texts))}
        return torch.stack([table[w] for w in texts])


def test_lexicon_words_weights_and_static_targets():
    docs = ["The apple tree. The apple!", "the tree, the end"]
    lex = Lexicon.build(docs, _Teacher(), size=10, min_count=1)
    assert words("The apple-tree's") == ["the", "apple", "-", "tree's"]
    assert "apple" in lex.index and "tree" in lex.index and "##s" not in lex.index and "a" not in lex.index
    counts = {"the": 4, "apple": 2, "tree": 2}
    total = 4 + 2 + 2 + 1 + 1 + 1 + 1  # the, apple, tree, '.', '!', ',', 'end'
    w = lambda word: 1e-4 / (1e-4 + counts[word] / total)
    E = lambda word: lex.embeddings[lex.index[word]]
    got = lex.static_targets(["apple tree the", "zzz unknown", ""])
    want = F.normalize(w("apple") * E("apple") + w("tree") * E("tree") + w("the") * E("the"), dim=0)
    assert torch.allclose(got[0], want, atol=1e-6)
    assert torch.equal(got[1], torch.zeros(8)) and torch.equal(got[2], torch.zeros(8))  # no known word
    assert float(lex.weights[lex.index["the"]]) < float(lex.weights[lex.index["apple"]])  # frequent: lighter


def test_static_targets_count_words_outside_the_lexicon_through_their_pieces():
    docs = ["The apple tree. The apple!", "the tree, the end"]
    lex = Lexicon.build(docs, _Teacher(), size=10, min_count=1, pieces=True)
    assert set(lex.piece_index) == {"s", "a"}  # the vocabulary's texts that are not lexicon words; no [UNK]
    piece = dict(zip(["a", "s"], _Teacher().embed(["a", "s"])))  # one teacher call, as add_pieces makes
    assert torch.equal(lex.table[lex.piece_index["s"]], piece["s"])
    E = lambda word: lex.embeddings[lex.index[word]]
    w_tree = float(lex.weights[lex.index["tree"]])
    got = lex.static_targets(["apples tree", "zzz", "apple tree"])
    # 'apples' -> 'apple' + '##s': a rare word's SIF weight (1) split over its two pieces
    want = F.normalize(w_tree * E("tree") + 0.5 * E("apple") + 0.5 * piece["s"], dim=0)
    assert torch.allclose(got[0], want, atol=1e-6)
    assert torch.equal(got[1], torch.zeros(8))  # [UNK]: nothing to count
    assert torch.allclose(got[2], Lexicon.build(docs, _Teacher(), size=10, min_count=1).static_targets(
        ["apple tree"])[0], atol=1e-6)  # known words: as without pieces
    plain = Lexicon.build(docs, _Teacher(), size=10, min_count=1).static_targets(["apples tree"])[0]
    assert torch.allclose(plain, F.normalize(w_tree * E("tree"), dim=0), atol=1e-6)  # without: dropped


def test_lexicon_domain_text_adds_its_own_most_frequent_words():
    web = ["the cat sat on the mat"] * 3 + ["a dog ran"] * 2
    domain = ["the lemma holds", "the lemma fails", "a theorem", "a theorem", "the proof"]
    alone = Lexicon.build(web, _Teacher(), size=6, teacher_vocab=False)
    assert "lemma" not in alone.index  # the web text alone never names it
    lex = Lexicon.build(web, _Teacher(), size=6, teacher_vocab=False, more=((domain, 2),))
    assert set(lex.vocab) == set(alone.vocab) | {"lemma"}  # the domain's top 2: 'the' (known), 'lemma'
    assert "theorem" not in lex.index  # third in the domain text ('lemma' came first at the same count)
    total = 18 + 6 + 12  # words of web (18 + 6) and domain (12) text: the SIF weights count both
    assert float(lex.weights[lex.index["the"]]) == pytest.approx(1e-4 / (1e-4 + 9 / total))
    assert float(lex.weights[lex.index["lemma"]]) == pytest.approx(1e-4 / (1e-4 + 2 / total))


def test_bag_stage_skips_blocks_exactly_at_zero_init(tiny_config):
    torch.manual_seed(0)
    model = KmerVQVAE(**tiny_config).eval()
    b = model.tokenizer()(["some text to encode", "and another, longer piece of text to encode here"])
    full = model.encode_windows(b["input_ids"], b["attention_mask"])
    model.encoder.bypass_blocks = True
    assert torch.allclose(model.encode_windows(b["input_ids"], b["attention_mask"]), full, atol=1e-6)
    with torch.no_grad():  # once a block has trained, skipping it changes the output
        model.encoder.blocks[0].mlp[2].weight.normal_()
    model.encoder.bypass_blocks = False
    assert not torch.allclose(model.encode_windows(b["input_ids"], b["attention_mask"]), full, atol=1e-4)
    normal = KmerVQVAE(**{**tiny_config, "residual_init": "normal"})
    assert normal.encoder.blocks[0].attn.out_proj.weight.abs().sum() > 0


def test_inference_never_changes_the_model(tiny_model):
    """The seed's snippet runs on a model in training mode: encode() must leave every tensor alone."""
    q = tiny_model.quantizer
    q.initialized.fill_(True)
    tiny_model.train()
    state = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    b = tiny_model.tokenizer()(["what is a coarse quantiser?", "another query"])
    first = tiny_model.encode(b["input_ids"], b["attention_mask"])["indices"]
    for _ in range(20):
        again = tiny_model.encode(b["input_ids"], b["attention_mask"])["indices"]
    assert torch.equal(first, again)
    assert all(torch.equal(state[k], v) for k, v in tiny_model.state_dict().items())
    # the training forward is the one path that moves the statistics
    tiny_model(b["input_ids"], b["attention_mask"], teacher=torch.randn(2, 24))
    assert not torch.equal(state["quantizer.avg_probs"], q.avg_probs)


def test_tokenizer_defaults_are_the_models():
    from vqvae_phase1_model import KmerTokenizer, KmerVQVAEConfig
    tok, cfg = KmerTokenizer(), KmerVQVAEConfig()
    assert (tok.pool, tok.window_size, tok.buckets, tok.num_hashes) == (cfg.kmer_pool, cfg.window_size,
                                                                         cfg.kmer_buckets, cfg.num_hashes)
    model_tok = KmerVQVAE().tokenizer()
    x = ["the same text through both tokenizers, long enough to fill several positions"]
    assert torch.equal(tok(x)["input_ids"], model_tok(x)["input_ids"])


def test_bag_path_is_the_weighted_mean_of_normalised_kmer_embeddings_plus_the_blocks_delta(tiny_config):
    """z_e = sum_i w_i LN(e_i) / sum_i w_i over every (unpooled) k-mer, w_i = exp(learned log-weight
    summed over the hash functions), plus the mean over pooled positions of what the blocks add."""
    torch.manual_seed(0)
    model = KmerVQVAE(**{**tiny_config, "bag_path": True, "kmer_pool": 2}).eval()
    enc = model.encoder
    with torch.no_grad():
        enc.bag_weight.weight.normal_(0, 1.0)
    b = model.tokenizer()(["some text to encode", "and another, longer piece of text to encode here"])
    ids, mask = b["input_ids"], b["attention_mask"].bool()
    with torch.no_grad():
        e = enc.embed(ids).sum(2)  # (W, L, D): multi-hash ids (W, L, H)
        w = torch.exp(enc.bag_weight(ids).sum(2)) * mask[..., None]
        bag = (enc.ln_bag(e) * w).sum(1) / w.sum(1)
        assert torch.allclose(model.encode_windows(ids, b["attention_mask"]), bag, atol=1e-5)  # blocks are zero
        enc.blocks[0].mlp[2].weight.normal_()  # now the block adds something
        W, L, D = e.shape
        pm = mask.view(W, L // 2, 2).float()
        x = (e.view(W, L // 2, 2, D) * pm[..., None]).sum(2) / pm.sum(2, keepdim=True).clamp(min=1)
        pmask = pm.sum(2) > 0
        x = x + enc.pos.weight[:x.shape[1]]
        delta = (enc.blocks[0](x, pmask) - x) * pmask[..., None]
        want = bag + delta.sum(1) / pmask.sum(1, keepdim=True)
        assert torch.allclose(model.encode_windows(ids, b["attention_mask"]), want, atol=1e-5)
        plain = KmerVQVAE(**{**tiny_config, "bag_path": False})
        assert not hasattr(plain.encoder, "bag_weight") and hasattr(plain.encoder, "ln_f")


def test_inference_variants_int8_bag_only_and_bf16(tiny_config):
    """int8 and bf16 stay close to float and leave the original alone; bag_only is exactly the weighted bag."""
    from lora_adapters import QueryPassageAdapters
    from vqvae_phase1_model import KmerFilter
    torch.manual_seed(0)
    model = KmerVQVAE(**{**tiny_config, "bag_path": True, "d_model": 64, "decoder_hidden": 96})
    with torch.no_grad():
        for blk in model.encoder.blocks:  # blocks that add something, so skipping them shows
            blk.mlp[2].weight.normal_(0, 0.05)
    adapters = QueryPassageAdapters(d_model=64)
    with torch.no_grad():
        adapters.query.down.weight.normal_(0, 0.05)
    f = KmerFilter(model, adapters)
    texts = ["a query about quantisation", "a longer passage of text that the filter places into lists"] * 3
    ref = f.encode(texts, role="query")
    f8 = f.inference_variant(int8=True)
    q8 = f8.encode(texts, role="query")
    assert F.cosine_similarity(q8["z_e"], ref["z_e"]).min() > 0.98
    assert F.cosine_similarity(q8["z_code"], ref["z_code"]).min() > 0.95
    b = model.tokenizer()(texts)
    base, base8 = (g.model.encode_windows(b["input_ids"], b["attention_mask"]) for g in (f, f8))
    assert not torch.equal(base8, base)  # it did quantise the model, not only the adapters
    assert F.cosine_similarity(f8.model.decode(q8["z_code"]), model.decode(ref["z_code"])).min() > 0.95
    assert torch.equal(f.encode(texts, role="query")["z_code"], ref["z_code"])  # the original is untouched
    bag = f.inference_variant(bag_only=True)
    model.encoder.bypass_blocks = True
    want = model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])["z_e"]
    model.encoder.bypass_blocks = False
    got = bag.encode(texts)["z_e"]
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, ref["z_e"], atol=1e-3)
    with pytest.raises(ValueError, match="bag_path"):
        KmerFilter(KmerVQVAE(**{**tiny_config, "bag_path": False})).inference_variant(bag_only=True)
    half = f.inference_variant(bf16=True)  # bf16 autocast: close to fp32, but it did run in bf16
    qh = half.encode(texts, role="query")
    assert qh["z_e"].dtype == torch.float32 and F.cosine_similarity(qh["z_e"], ref["z_e"]).min() > 0.99
    assert not torch.equal(qh["z_e"], ref["z_e"])
    assert not f.bf16 and torch.equal(f.encode(texts, role="query")["z_e"], ref["z_e"])  # the original stays fp32
    with pytest.raises(ValueError, match="int8 or bf16"):
        f.inference_variant(int8=True, bf16=True)


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_gathers_give_the_lookups_values_and_gradients(sparse):
    """rows_summed (one embedding_bag) against nn.Embedding's lookup summed over the hashes: the same
    values and the same gradients, sparse where the table is, the padding id adding and receiving nothing."""
    from vqvae_phase1_model import rows_summed
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (3, 8, 2))
    ids[:, 6:] = 0  # padded positions
    ids[0, 0] = torch.tensor([7, 7])  # an id twice in one k-mer, and again elsewhere
    ids[1, 3, 0] = 7
    g = torch.randn(3, 8, 5)
    grads = []
    for fused in (False, True):
        table = torch.nn.Embedding(50, 5, padding_idx=0, sparse=sparse)
        torch.manual_seed(1)
        with torch.no_grad():
            table.weight.normal_()
            table.weight[0].zero_()
        out = rows_summed(table, ids) if fused else table(ids).sum(2)
        (out * g).sum().backward()
        grad = table.weight.grad
        assert grad.is_sparse == sparse
        grads.append((out.detach(), grad.to_dense()))
    (a, ga), (b, gb) = grads
    assert torch.equal(a, b) and torch.allclose(ga, gb, atol=1e-6)
    assert torch.equal(ga, gb) or not sparse  # dense gradients may add a repeated id's rows in another order
    assert ga[0].abs().sum() == 0 and gb[7].abs().sum() > 0
    table = torch.nn.Embedding(50, 5)
    assert torch.equal(rows_summed(table, ids[..., 0]), table(ids[..., 0]))  # one hash: the plain lookup


@pytest.mark.parametrize("bypass", [False, True])
def test_bag_alone_counts_the_pooled_positions(tiny_config, bypass):
    """The bag alone returns before pooling: it must still count the pooled positions that weigh a
    text's windows, as the full forward does."""
    torch.manual_seed(0)
    model = KmerVQVAE(**{**tiny_config, "bag_path": True, "kmer_pool": 2}).eval()
    model.encoder.bypass_blocks = bypass
    b = model.tokenizer()(["short", "a longer piece of text that spans more than one window of the tiny model " * 3])
    mask = b["attention_mask"]
    assert (mask == 0).any()
    _, positions = model.encoder(b["input_ids"], mask)
    W, L = mask.shape
    assert positions.tolist() == (mask.view(W, L // 2, 2).sum(2) > 0).sum(1).tolist()
