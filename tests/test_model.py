import pytest
import torch
import torch.nn.functional as F

from vqvae_phase1_model import KmerVQVAE, KmerVQVAEConfig, VectorQuantizer, codebook_health, spherical_kmeans

TEXTS = ["the cat sat on the mat", "quantum chromodynamics at hadron colliders", "",
         "a longer passage " * 30]


def test_shapes(tiny_model):
    tok = tiny_model.tokenizer()
    b = tok(TEXTS)
    out = tiny_model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"], top_n=3)
    assert out["z_e"].shape == (4, 32)
    assert out["z_q"].shape == (4, 32) and out["indices"].shape == (4,)
    assert out["top_indices"].shape == (4, 3)
    assert torch.equal(out["top_indices"][:, 0], out["indices"])
    # per-window encode, as in the seed's snippet
    w = tiny_model.encode(b["input_ids"], b["attention_mask"])
    assert w["indices"].shape == (b["input_ids"].shape[0],)


def test_extra_padding_does_not_change_z_e(tiny_model):
    tiny_model.eval()
    cfg = tiny_model.config
    tok = tiny_model.tokenizer()
    b = tok.encode_windows(["short text here"], pad_to_window=True)
    ids, mask = b["input_ids"], b["attention_mask"]
    n = int(mask.sum())
    z_full = tiny_model.encode_windows(ids, mask)
    keep = -(-n // cfg.kmer_pool) * cfg.kmer_pool  # trim padding to a pool multiple
    z_trim = tiny_model.encode_windows(ids[:, :keep], mask[:, :keep])
    assert keep < ids.shape[1]
    assert torch.allclose(z_full, z_trim, atol=1e-5)


def test_multi_window_pooling_is_length_weighted(tiny_model):
    tiny_model.eval()
    tok = tiny_model.tokenizer()
    b = tok(["word " * 40])
    assert b["input_ids"].shape[0] > 1
    z_w, lengths = tiny_model.encoder(b["input_ids"], b["attention_mask"])
    expected = (z_w * lengths[:, None]).sum(0) / lengths.sum()
    got = tiny_model.encode_windows(b["input_ids"], b["attention_mask"], b["text_index"], 1)
    assert torch.allclose(got[0], expected, atol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_decoding_indices_gives_z_q(tiny_config, distance):
    model = KmerVQVAE(**{**tiny_config, "distance": distance}).eval()
    model.quantizer.z_mean.normal_()  # a running mean that is not zero
    b = model.tokenizer()(TEXTS)
    out = model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])
    assert torch.allclose(model.quantizer.decode_indices(out["indices"]), out["z_q"], atol=1e-6)
    # z_code_raw: code space before normalisation (what an index routes on); z_code normalises it (cosine)
    assert torch.allclose(out["z_code_raw"], model.quantizer.in_proj(out["z_e"]) - model.quantizer.z_mean, atol=1e-6)
    want = F.normalize(out["z_code_raw"], dim=-1) if distance == "cosine" else out["z_code_raw"]
    assert torch.allclose(out["z_code"], want, atol=1e-6)
    # and the index is the nearest code
    sim = model.quantizer.similarity(out["z_code"])
    assert torch.equal(sim.argmax(1), out["indices"])


@pytest.mark.parametrize("cosine", [False, True])
def test_ema_step_matches_vector_quantize_pytorch(cosine):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    d, K = 8, 16
    ref = vqp.VectorQuantize(dim=d, codebook_size=K, decay=0.99, eps=1e-5, kmeans_init=False,
                             use_cosine_sim=cosine, commitment_weight=1.0).train()
    cfg = KmerVQVAEConfig(d_model=d, num_codes=K, distance="cosine" if cosine else "euclidean", ema_decay=0.99,
                          center_codes=False)
    ours = VectorQuantizer(cfg).train()
    with torch.no_grad():
        ours.codebook.copy_(ref._codebook.embed[0])
        ours.ema_sum.copy_(ref._codebook.embed_avg[0])
        ours.ema_count.copy_(ref._codebook.cluster_size[0])
        ours.initialized.fill_(True)
    x = torch.randn(64, d)
    for _ in range(3):
        _, ref_idx, _ = ref(x[None])
        out = ours(x, update=True)
        assert torch.equal(out["indices"], ref_idx[0])
    assert torch.allclose(ours.ema_count, ref._codebook.cluster_size[0], atol=1e-5)
    assert torch.allclose(ours.codebook, ref._codebook.embed[0], atol=1e-5)


@pytest.mark.parametrize("cosine", [False, True])
def test_ema_step_by_hand(cosine):
    """One EMA step written out (van den Oord et al. 2017, A.1, Laplace-smoothed counts), no library."""
    torch.manual_seed(1)
    d, K, decay, eps = 4, 5, 0.9, 0.3  # an eps large enough that the smoothing shows
    cfg = KmerVQVAEConfig(d_model=d, num_codes=K, distance="cosine" if cosine else "euclidean", ema_decay=decay,
                          center_codes=False)
    q = VectorQuantizer(cfg).train()
    q.eps = eps
    count0, sum0 = torch.rand(K) + 0.5, torch.randn(K, d)
    with torch.no_grad():
        q.ema_count.copy_(count0)
        q.ema_sum.copy_(sum0)
    z = torch.randn(7, d)
    idx = torch.tensor([0, 0, 2, 3, 3, 3, 1])
    q.ema_update(z, idx)
    count = [decay * float(count0[k]) + (1 - decay) * int((idx == k).sum()) for k in range(K)]
    total = sum(count)
    for k in range(K):
        s = decay * sum0[k] + (1 - decay) * z[idx == k].sum(0)
        code = s / ((count[k] + eps) / (total + K * eps) * total)
        if cosine:
            code = code / code.norm()
        assert float(q.ema_count[k]) == pytest.approx(count[k], rel=1e-6)
        assert torch.allclose(q.codebook[k], code, atol=1e-6)


def test_frozen_and_grad_modes(tiny_model):
    q = tiny_model.quantizer.train()
    q.initialized.fill_(True)
    before = q.codebook.detach().clone()
    q.set_mode("frozen")
    q(torch.randn(32, 32))
    assert torch.equal(before, q.codebook)
    q.set_mode("grad")
    out = q(torch.randn(32, 32, requires_grad=True))
    out["commit_loss"].backward()
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
    grad = q.codebook.grad.clone()
    torch.optim.SGD([q.codebook], lr=0.5).step()  # grad mode: the codebook moves by its optimizer's step
    assert torch.allclose(q.codebook, before - 0.5 * grad)


def test_straight_through_passes_gradient(tiny_model):
    q = tiny_model.quantizer.train()
    z = torch.randn(8, 32, requires_grad=True)
    q(z)["z_q"].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_dead_code_restart_revives_unused_codes():
    cfg = KmerVQVAEConfig(d_model=8, num_codes=16, center_codes=False)
    q = VectorQuantizer(cfg).train()
    with torch.no_grad():
        q.initialized.fill_(True)
        q.codebook.copy_(F.normalize(torch.ones(16, 8) + 0.01 * torch.randn(16, 8), dim=-1))
    q.ema_count.zero_()
    q.ema_count[0] = 32.0  # one code takes all the usage
    recent = torch.randn(256, 8)
    n = q.restart_dead_codes(recent, batch_size=32, threshold=0.1, generator=torch.Generator().manual_seed(0))
    assert n == 15
    assert (q.ema_count[1:] == 2.0).all()  # reset to the expected usage B/K
    idx = q(recent)["indices"]
    assert len(idx.unique()) > 8  # the revived codes now win assignments


def test_diversity_loss_range_and_gradient():
    cfg = KmerVQVAEConfig(d_model=8, num_codes=16)
    q = VectorQuantizer(cfg).train()
    z = torch.randn(64, 8, requires_grad=True)
    out = q(z)
    assert 0.0 <= out["diversity_loss"].item() <= 1.0
    q.avg_probs.zero_()
    q.avg_probs[0] = 1.0  # collapsed running average
    loss = q(z)["diversity_loss"]
    assert float(loss.detach()) > 0.9
    loss.backward()
    assert z.grad.abs().sum() > 0


def test_kmeans_init_spreads_codes():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(8, 16), dim=-1)
    x = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(400, 16)
    c, counts = spherical_kmeans(x, 8, iters=20)
    assert (counts > 0).all()
    assert ((c @ centers.T).max(0).values > 0.99).all()  # every true centre is found


def test_state_dict_round_trips_every_buffer(tiny_model, tiny_config):
    q = tiny_model.quantizer
    with torch.no_grad():
        q.initialized.fill_(True)
        q.ema_count.uniform_(0, 5)
        q.avg_probs.uniform_(0, 1)
    clone = KmerVQVAE(**tiny_config)
    clone.load_state_dict(tiny_model.state_dict())
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), k
    for name in ("codebook", "ema_count", "ema_sum", "avg_probs", "initialized", "z_mean"):
        assert f"quantizer.{name}" in tiny_model.state_dict()


def test_codebook_health_on_known_usage():
    h = codebook_health(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert h["perplexity"] == pytest.approx(4.0)
    assert h["utilisation"] == 0.5 and h["dead_codes"] == 4 and h["max_code_share"] == 0.25
    assert codebook_health(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)


def test_training_forward_losses(tiny_model):
    tok = tiny_model.tokenizer()
    b = tok.encode_windows(["some text", "more text here"])
    t = F.normalize(torch.randn(2, 24), dim=-1)
    out = tiny_model(b["input_ids"], b["attention_mask"], teacher=t)
    assert "cos_q" not in out  # not initialised: continuous warm-up only
    tiny_model.quantizer.initialized.fill_(True)
    out = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, relational_weight=0.5)
    assert {"cos_q", "commit", "diversity", "relational"} <= set(out)
    out["loss"].backward()


def test_relational_loss_compares_similarity_structure():
    from vqvae_phase1_model import relational_loss
    torch.manual_seed(0)
    t = torch.randn(6, 24)
    assert float(relational_loss(3 * t, t)) < 1e-10  # the same in-batch cosines at any scale
    rot, _ = torch.linalg.qr(torch.randn(24, 24))
    assert float(relational_loss(t @ rot, t)) < 1e-10  # and in any rotated space
    shuffled = t[[1, 0, 2, 3, 4, 5]]  # two rows swapped: each row's own cosine is intact, the structure is not
    assert float(relational_loss(shuffled, t)) > 1e-3


def test_relational_term_is_centred_and_in_every_stage(tiny_model):
    """The relational term compares the batch's similarity matrices of decoded - centre and target - centre,
    in the continuous warm-up too (where the word and bag stages train)."""
    from vqvae_phase1_model import relational_loss
    tok = tiny_model.tokenizer()
    b = tok.encode_windows(["some text", "more text here", "quantum chromodynamics", "a cat"])
    torch.manual_seed(1)
    t = F.normalize(torch.randn(4, 24), dim=-1)
    c = F.normalize(torch.randn(24), dim=-1)
    out = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, relational_weight=1.0, target_center=c,
                     quantize=False)
    want = relational_loss(out["decoded_e"].float() - c, t - c)
    assert float(out["relational"]) == pytest.approx(float(want), rel=1e-5)
    assert float(want) != pytest.approx(float(relational_loss(out["decoded_e"].float(), t)), rel=1e-3)
    base = tiny_model(b["input_ids"], b["attention_mask"], teacher=t, target_center=c, quantize=False)
    assert float(out["loss"] - base["loss"]) == pytest.approx(float(want), rel=1e-4)


def test_soft_info_nce_is_stationary_where_the_student_copies_the_targets():
    """With soft labels at the InfoNCE's own temperature, a student whose vectors are its targets already
    has the labels' distribution, so the loss has no gradient there; one-hot labels still push the
    texts apart. A bank of earlier targets takes part in the labels too."""
    from vqvae_phase1_model import info_nce
    torch.manual_seed(0)
    t = torch.randn(8, 16) + 0.8 * torch.randn(1, 16)  # correlated: neighbours the teacher sees as close
    bank = torch.randn(5, 16)
    for b in (None, bank):
        pred = t.clone().requires_grad_(True)
        info_nce(pred, t, 0.1, b, soft=0.1).backward()
        assert pred.grad.abs().max() < 1e-6
        pred = t.clone().requires_grad_(True)
        info_nce(pred, t, 0.1, b).backward()
        assert pred.grad.abs().max() > 1e-3
    pred = t.clone().requires_grad_(True)
    info_nce(pred, t, 0.1, soft=0.2).backward()  # labels softer than the student's softmax: still a pull
    assert pred.grad.abs().max() > 1e-3
    # a tiny label temperature is the one-hot InfoNCE
    x = torch.randn(8, 16)
    assert float(info_nce(x, t, 0.1, bank, soft=1e-4)) == pytest.approx(float(info_nce(x, t, 0.1, bank)), rel=1e-5)


def test_codebook_learns_from_observed_windows_not_the_batch(tiny_model):
    q = tiny_model.quantizer.train()
    q.initialized.fill_(True)
    q.track_batch = False  # Phase 1a --codebook_windows: the training batch leaves the codebook alone
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    q(torch.randn(32, 32), update=True)
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())
    idx = q.observe(torch.randn(64, 32))
    assert idx.shape == (64,)
    changed = {k for k, v in q.state_dict().items() if not torch.equal(state[k], v)}
    assert {"codebook", "ema_count", "ema_sum", "avg_probs", "z_mean"} <= changed
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    assert q.observe(torch.randn(0, 32)).shape == (0,)  # an empty batch changes nothing (no NaN mean)
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())
    q.set_mode("frozen")
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    q.observe(torch.randn(64, 32))
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())


def test_eval_before_kmeans_init_reports_no_codebook_health(tiny_model):
    from vqvae_phase1_train import evaluate_distillation
    tok = tiny_model.tokenizer()
    windows = [f"window number {i} of some text" for i in range(8)]
    targets = torch.randn(8, tiny_model.config.teacher_dim)
    m = evaluate_distillation(tiny_model, tok, windows, targets, torch.device("cpu"))
    assert not m["initialized"] and m["cos_q"] == 0.0  # a random codebook's numbers would mislead
    assert not {"perplexity", "utilisation", "_code_usage"} & set(m)
    tiny_model.quantizer.initialized.fill_(True)
    m = evaluate_distillation(tiny_model, tok, windows, targets, torch.device("cpu"))
    assert {"perplexity", "utilisation", "dead_codes", "_code_usage"} <= set(m) and m["n"] == 8
    from vqvae_phase1_train import embed_windows  # health on a longer list that starts with `windows`
    more = windows + [f"another held-out window, number {i}" for i in range(8)]
    m = evaluate_distillation(tiny_model, tok, windows, targets, torch.device("cpu"), more)
    tiny_model.eval()
    direct = tiny_model.quantizer(embed_windows(tiny_model, tok, more, torch.device("cpu")))["indices"]
    assert m["n"] == 16 and m["_code_usage"] == torch.bincount(direct, minlength=16).tolist()


def test_frozen_codebook_diversity_sees_usage_move_without_changing_state():
    cfg = KmerVQVAEConfig(d_model=8, num_codes=16, center_codes=False)
    q = VectorQuantizer(cfg).train()
    q.initialized.fill_(True)
    q.set_mode("frozen")
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    assert "live_probs" not in state
    z = q.codebook.detach()[0].repeat(64, 1)  # every window on code 0: a collapse
    first = float(q(z)["diversity_loss"])
    for _ in range(200):
        q(z, update=True)
    assert float(q(z)["diversity_loss"]) > first + 0.1  # the loss now sees the collapse
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())  # checkpoint state untouched
    q.set_mode("ema")
    assert float(q(z)["diversity_loss"]) == pytest.approx(first, abs=1e-6)  # back on the saved estimate

