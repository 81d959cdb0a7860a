"""The seed's contract and the CLI surface: the lr schedule ends where the run ends, stale temporary
files go, nothing is overwritten silently, --help is clean, and bad flags are one line."""
import os
import subprocess
import sys

import pytest

import train_common as tc
import vqvae_phase1_train as p1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schedule_ends_where_the_token_budget_stops_the_run():
    st = tc.LoopState()
    assert tc.schedule_steps(st, 4000, 10_000) == 4000  # nothing seen yet: max_steps
    st.step, st.tokens_seen = 100, 50_000  # 500 k-mers a step: a 1.5M budget stops the run at step 3,000
    assert tc.schedule_steps(st, 4000, 1_500_000) == 3000
    assert tc.schedule_steps(st, 4000, 0) == 4000  # no budget: max_steps
    assert tc.schedule_steps(st, 2000, 1_500_000) == 2000  # max_steps comes first
    lr_end = tc.lr_at(2999, 100, tc.schedule_steps(st, 4000, 1_500_000), 1e-3)
    assert lr_end == pytest.approx(1e-4, rel=1e-3)  # the last step of the run is at the floor (0.1 x peak)


def test_a_run_removes_its_own_stale_temporaries_and_refuses_to_overwrite(tmp_path, teacher_cache_dir):
    out = tmp_path / "p1.pt"
    for stale in (".tmp_p1.ptab12", ".tmp_p1_best.ptcd34"):
        (tmp_path / stale).write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp_other.pt99").write_bytes(b"not ours")
    cfg = lambda *extra: tc.parse_config(p1.Phase1Config, p1.PRESETS, ["--preset", "tiny", "--output", str(out),
                                                                        "--teacher_cache", teacher_cache_dir,
                                                                        "--max_steps", "12", *extra])
    p1.main(cfg())
    left = sorted(f for f in os.listdir(tmp_path) if f.startswith(".tmp_"))
    assert left == [".tmp_other.pt99"]  # another output's files are not ours to delete
    before = out.read_bytes()
    with pytest.raises(tc.UserError, match="already exists"):
        p1.main(cfg())
    assert out.read_bytes() == before
    p1.main(cfg("--overwrite"))  # said explicitly: replaced


def test_help_is_clean_and_mentions_preset_defaults():
    out = subprocess.run([sys.executable, "vqvae_phase1_train.py", "--preset", "demo", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120).stdout
    assert "{," not in out and "[RESUME]" not in out and "--resume [true|false]" in out
    assert "(default: <output>_run) (default" not in out
    assert "--preset demo --help" in out
    steps = p1.PRESETS["demo"]["max_steps"]
    assert steps != p1.Phase1Config().max_steps and f"(default: {steps})" in out  # the preset's, not the dataclass's


SCRIPTS = ("eval_filter.py", "kmer_index.py", "kmer_index.py build", "kmer_index.py query", "benchmark.py",
           "compare_evals.py", "ablation.py", "run_demo.py", "vqvae_phase1_train.py", "vqvae_phase1b_train_lora.py",
           "vqvae_phase2_train_adapters.py")


def test_every_command_prints_its_help():
    # argparse formats each help string with %: a bare "1%" in one crashed `eval_filter.py --help`
    runs = {s: subprocess.Popen([sys.executable, *s.split(), "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    for script, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        last = (err.strip().splitlines() or [""])[-1]
        assert proc.returncode == 0 and out.startswith("usage:"), f"{script} --help: {last}"


def test_eval_beir_without_folder_is_refused():
    r = subprocess.run([sys.executable, "eval_filter.py", "--checkpoint", "x.pt", "--dataset", "beir"], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --dataset beir needs --beir_dir")
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Maths that a breakage must not survive (each test names the breakage it catches)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vqvae_phase1_model import KmerVQVAEConfig, VectorQuantizer  # noqa: E402


def test_phase2_info_nce_is_both_directions():
    """Catches InfoNCE computed in one direction only."""
    import vqvae_phase2_train_adapters as p2
    torch.manual_seed(0)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    logits = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / 0.07
    t = torch.arange(5)
    want = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    assert float(p2.info_nce(q, p, 0.07)) == pytest.approx(float(want), rel=1e-6)
    assert abs(float(F.cross_entropy(logits, t)) - float(F.cross_entropy(logits.T, t))) > 1e-3  # directions differ


def test_inbatch_accuracies_use_their_own_axis():
    """Catches p2q_acc computed along the q2p axis."""
    import vqvae_phase2_train_adapters as p2
    # q0 is nearest p0 and q1 nearest p0 too: q2p = 1/2; p0's nearest query is q0, p1's nearest is q1: p2q = 1
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = p2.inbatch_metrics(q, p)
    assert m["q2p_acc"] == pytest.approx(0.5) and m["p2q_acc"] == pytest.approx(1.0)


def _vq(K=16, d=8, **kw):
    return VectorQuantizer(KmerVQVAEConfig(d_model=d, num_codes=K, center_codes=False, **kw)).train()


def test_dead_code_threshold_is_relative_to_the_expected_usage():
    """Catches an absolute threshold: at B=256, K=16 a code used once a step is dead at threshold 0.1
    (0.1 x 256/16 = 1.6), though 1 > 0.1."""
    q = _vq()
    q.initialized.fill_(True)
    q.ema_count.fill_(16.0)
    q.ema_count[3] = 1.0
    n = q.restart_dead_codes(torch.randn(64, 8), batch_size=256, threshold=0.1,
                             generator=torch.Generator().manual_seed(0))
    assert n == 1 and float(q.ema_count[3]) == 16.0


def test_restart_resets_the_codes_ema_sum():
    """Catches a restart that leaves the code's EMA sum stale: the next EMA step would drag it back."""
    q = _vq()
    q.initialized.fill_(True)
    q.ema_count.fill_(2.0)
    q.ema_count[5] = 0.0
    q.ema_sum[5] = 100.0
    q.restart_dead_codes(torch.randn(64, 8), batch_size=32, threshold=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q.ema_sum[5], q.codebook[5] * q.ema_count[5])


def test_diversity_gradient_spreads_the_assignment():
    """Catches a flipped sign of the diversity loss's gradient: a step down its gradient must raise the
    entropy of the batch's mean soft assignment."""
    torch.manual_seed(0)
    q = _vq()
    q.initialized.fill_(True)
    z = (q.codebook.detach()[0] + 0.3 * torch.randn(64, 8)).requires_grad_(True)  # crowded near code 0
    q.avg_probs.copy_(q._logits(q.similarity(q.project(z.detach()))).softmax(-1).mean(0))

    def entropy(x):
        p = q._logits(q.similarity(q.project(x))).softmax(-1).mean(0)
        return float(-(p * p.clamp(min=1e-12).log()).sum())
    out = q(z)
    out["diversity_loss"].backward()
    stepped = (z - 0.5 * z.grad / z.grad.norm()).detach()
    assert entropy(stepped) > entropy(z.detach()) + 1e-4


def test_commitment_pulls_the_encoder_not_the_codebook():
    """Catches a commitment loss that moves the codebook: in EMA mode its gradient reaches z only,
    and equals that of w * ||zc - sg(zq)||^2."""
    torch.manual_seed(0)
    q = _vq(commitment_weight=0.25)
    q.initialized.fill_(True)
    z = torch.randn(4, 8, requires_grad=True)
    out = q(z)
    out["commit_loss"].backward()
    assert q.codebook.grad is None
    z2 = z.detach().clone().requires_grad_(True)
    zc = q.project(z2)
    (0.25 * F.mse_loss(zc, q.decode_indices(out["indices"]).detach())).backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_kmeans_init_counts_are_a_per_step_rate():
    """Catches k-means counts left as totals: EMA counts are per step, so they must sum to the batch."""
    q = _vq()
    q.init_from_samples(torch.randn(640, 8), batch_size=32, iters=3)
    assert float(q.ema_count.sum()) == pytest.approx(32.0, rel=1e-5)
    assert torch.allclose(q.ema_sum, q.codebook * q.ema_count[:, None], atol=1e-5)


def test_bare_commands_are_the_full_runs_and_say_how_to_go_offline(tmp_path):
    """The seed's Quick Start: a bare command is the full run (Hub data); offline it is one line."""
    cfg = tc.parse_config(p1.Phase1Config, p1.PRESETS, [])
    assert cfg.preset == "full" and cfg.data == "hub" and cfg.max_tokens_total == 200_000_000
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "vqvae_phase1_train.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: source")
    assert "--data sample --preset demo" in err[0] and "--data files" in err[0]
    assert not os.listdir(tmp_path)  # nothing written


def test_unreachable_hub_is_one_line_at_once(tmp_path):
    """Without the offline variables, an unreachable Hub is one line within seconds, not ~25 s of retries.
    The endpoint is a closed port on this machine's loopback."""
    import time
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(REPO, "vqvae_phase1_train.py"), "--preset", "tiny", "--data", "hub",
                        "--output", str(tmp_path / "p1.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    err = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert "127.0.0.1:9 is unreachable" in err[0] and "--data sample --preset demo" in err[0]
    assert time.time() - t0 < 60  # imports included; the check itself is one refused connection


def test_checkpoint_rng_state_restores_every_generator(tmp_path):
    """Resume restores torch, numpy and Python RNGs (CUDA's too where present), through weights_only."""
    import random

    import numpy as np
    from vqvae_phase1_model import save_checkpoint
    tc.seed_everything(3)
    torch.randn(5), np.random.rand(3), random.random()  # move every generator somewhere
    save_checkpoint({"rng": tc.rng_state()}, str(tmp_path / "r.pt"))
    first = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    tc.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and np.array_equal(first[3], again[3])


def test_phase2_align_and_code_match_losses():
    """align: 1 - cos of matched rows; code match: cross-entropy of the query's code scores against
    the passage's nearest code."""
    import vqvae_phase2_train_adapters as p2
    torch.manual_seed(0)
    q = _vq(K=6, d=4)
    q.codebook.data = torch.randn(6, 4)
    zq = F.normalize(torch.randn(5, 4), dim=-1).requires_grad_()
    zp = F.normalize(torch.randn(5, 4), dim=-1).requires_grad_()
    want = (1 - (zq * zp).sum(-1)).mean().detach()
    assert float(p2.align_loss(zq, zp).detach()) == pytest.approx(float(want), abs=1e-6)
    assert float(p2.align_loss(zp, zp).detach()) == pytest.approx(0.0, abs=1e-6)
    cb = F.normalize(q.codebook, dim=-1)
    label = (zp @ cb.T).argmax(1)
    logits = zq @ cb.T / 0.07
    want = -logits.log_softmax(1)[torch.arange(5), label].mean()
    got = p2.code_match_loss(q, zq, zp, 0.07)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got.backward()
    assert zq.grad.abs().sum() > 0


def test_phase2_identity_loss_and_sentences():
    """identity: mean |adapted - z|^2 / |z|^2 (0 at the identity, scale-free); the sentences it reads are
    a document's sentences of 4 to 40 words."""
    import vqvae_phase2_train_adapters as p2
    from vqvae_phase2_data import sentence_stream
    torch.manual_seed(0)
    z, delta = torch.randn(5, 4), torch.randn(5, 4)
    want = (delta.pow(2).sum(-1) / z.pow(2).sum(-1)).mean()
    assert float(p2.identity_loss(z, z + delta)) == pytest.approx(float(want), rel=1e-6)
    assert float(p2.identity_loss(z, z)) == 0.0
    assert float(p2.identity_loss(3 * z, 3 * (z + delta))) == pytest.approx(float(want), rel=1e-5)
    docs = ["Four words right here. Too short now! Is this a question of seven words? " + "x " * 40 + "end.",
            "Forty words: " + "y " * 37 + "end."]
    assert list(sentence_stream(iter(docs))) == ["Four words right here.", "Is this a question of seven words?",
                                                 "Forty words: " + "y " * 37 + "end."]


def test_phase2_distillation_losses_and_passage_bank():
    """distill: centred cosine + InfoNCE against the teacher; rank: KL(teacher || model) of softmaxes
    over the bank's passages, zero when the model's cosines are the teacher's; the bank keeps the most
    recent distinct passages."""
    import vqvae_phase2_train_adapters as p2
    from vqvae_phase1_model import info_nce
    torch.manual_seed(0)
    d, t, c = torch.randn(6, 5), torch.randn(6, 5), torch.randn(5)
    want = (1 - F.cosine_similarity(d - c, t - c, dim=-1)).mean() + info_nce(d - c, t - c, 0.05)
    assert float(p2.distill_loss(d, t, c)) == pytest.approx(float(want), rel=1e-6)
    assert float(p2.distill_loss(t, t, c)) < float(p2.distill_loss(t.flip(0), t, c))
    zq, bank_z = torch.randn(4, 5, requires_grad=True), torch.randn(7, 5)
    tq, bank_t = torch.randn(4, 8), torch.randn(7, 8)
    got = p2.rank_distill_loss(zq, bank_z, tq, bank_t, 0.1)
    sm = F.normalize(zq, dim=-1) @ F.normalize(bank_z, dim=-1).T / 0.1
    st = F.normalize(tq, dim=-1) @ F.normalize(bank_t, dim=-1).T / 0.1
    pt = st.softmax(1)
    want = (pt * (pt.log() - sm.log_softmax(1))).sum(1).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got.backward()
    assert zq.grad.abs().sum() > 0
    same = p2.rank_distill_loss(zq.detach(), bank_z, zq.detach(), bank_z, 0.1)  # model ranks as the teacher
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    bank = p2.PassageBank(3)
    for i, text in enumerate(["a", "b", "c", "a", "d"]):
        bank.add([text], torch.full((1, 2), float(i)), torch.full((1, 3), float(i)))
    z, tt = bank.tensors()
    assert list(bank.rows) == ["c", "a", "d"] and z[:, 0].tolist() == [2.0, 3.0, 4.0] and tt.shape == (3, 3)


def test_sparse_row_adamw_is_adamw_on_the_rows_a_step_looks_up():
    """Every row looked up every step: AdamW exactly (moments, decoupled decay, bias correction),
    with the gradient clipped by the sparse-aware clip as torch clips the dense one. Rows a step
    does not look up keep their weights and moments."""
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    dense, sparse = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ref = torch.optim.AdamW([dense], lr=0.1, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    opt = tc.SparseRowAdamW([sparse], lr=0.1, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(4):
        ids, target = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2]), torch.randn(8, 4)  # row 2 three times
        for p, sp in ((dense, False), (sparse, True)):
            ((F.embedding(ids, p, sparse=sp) - target) ** 2).sum().backward()
        assert sparse.grad.is_sparse
        n_ref = torch.nn.utils.clip_grad_norm_([dense], 1.0)
        n = tc.clip_grad_norm([sparse], 1.0)
        assert torch.allclose(n, n_ref) and n > 1.0  # it did clip
        ref.step(); opt.step(); ref.zero_grad(); opt.zero_grad()  # noqa: E702
        assert torch.allclose(sparse, dense, atol=1e-6)
    before, st = sparse.detach().clone(), {k: v.clone() for k, v in opt.state[sparse].items()}
    (F.embedding(torch.tensor([1, 3, 3]), sparse, sparse=True).sum()).backward()
    opt.step()
    moved = (sparse.detach() != before).any(1)
    assert moved.tolist() == [False, True, False, True, False, False]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[sparse][k][[0, 2, 4, 5]], st[k][[0, 2, 4, 5]])
        assert not torch.equal(opt.state[sparse][k][[1, 3]], st[k][[1, 3]])
    with pytest.raises(ValueError, match="sparse gradients only"):
        dense.grad = torch.ones_like(dense)
        tc.SparseRowAdamW([dense]).step()


def test_the_best_checkpoint_copy_is_atomic_and_keeps_its_content_when_the_latest_is_replaced(tmp_path):
    from vqvae_phase1_model import copy_checkpoint, load_checkpoint, save_checkpoint
    latest, best = str(tmp_path / "p.pt"), str(tmp_path / "p_best.pt")
    save_checkpoint({"format": "kmer-vqvae/1", "step": 1}, latest)
    copy_checkpoint(latest, best)
    save_checkpoint({"format": "kmer-vqvae/1", "step": 2}, latest)  # the next save replaces the latest by rename
    assert load_checkpoint(best)["step"] == 1 and load_checkpoint(latest)["step"] == 2
    copy_checkpoint(latest, best)  # over an existing best
    assert load_checkpoint(best)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["p.pt", "p_best.pt"]  # no temporaries left
