"""The three phases chained on the bundled samples with tiny configs, the real teacher and real
`datasets` loaders (offline), wandb disabled."""
import itertools
import json

import numpy as np
import pytest
import torch

import vqvae_phase1_train as p1
import vqvae_phase1b_train_lora as p1b
import vqvae_phase2_train_adapters as p2
from lora_adapters import QueryPassageAdapters, inject_lora
from train_common import UserError, parse_config
from vqvae_phase1_model import KmerVQVAE, load_checkpoint, load_pretrained, model_from_checkpoint


def _cfg(module, cls, **over):
    args = ["--preset", "tiny"]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return parse_config(cls, module.PRESETS, args)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, teacher_cache_dir):
    d = tmp_path_factory.mktemp("chain")
    r1 = p1.main(_cfg(p1, p1.Phase1Config, output=d / "p1.pt", teacher_cache=teacher_cache_dir))
    r1b = p1b.main(_cfg(p1b, p1b.Phase1bConfig, phase1a_checkpoint=d / "p1.pt", output=d / "p1b.pt",
                        teacher_cache=teacher_cache_dir))
    r2 = p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2.pt",
                      teacher_cache=teacher_cache_dir))
    r2a = p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1.pt", output=d / "p2_from_1a.pt",
                       teacher_cache=teacher_cache_dir, adapter_type="shared"))
    return {"dir": d, "p1": r1, "p1b": r1b, "p2": r2, "p2a": r2a}


def test_phase1a_writes_loadable_checkpoint_and_learns(chain):
    d = chain["dir"]
    f = load_pretrained(str(d / "p1.pt"))
    assert f.checkpoint["phase"] == "phase1a" and f.checkpoint["step"] == 30
    assert f.encode(["hello there"])["indices"].shape == (1,)
    rows = [json.loads(l) for l in open(d / "p1_run" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    late = sum(r["cos_e"] for r in train[-3:]) / 3
    assert late > train[0]["cos_e"] + 0.03  # the continuous-path loss (1 - cos) falls
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {"perplexity", "utilisation", "dead_codes", "max_code_share", "cos_q", "cos_e"} <= set(evals[-1])


def test_warm_cache_makes_no_teacher_calls(chain, tmp_path, teacher_cache_dir):
    # a cache of its own: the session's cache may already be warm from earlier tests (order independent)
    cache = tmp_path / "cache"
    first = p1.main(_cfg(p1, p1.Phase1Config, output=tmp_path / "first.pt", teacher_cache=cache, max_steps=20))
    r = p1.main(_cfg(p1, p1.Phase1Config, output=tmp_path / "again.pt", teacher_cache=cache, max_steps=20))
    assert first["teacher_calls"] > 0
    assert r["teacher_calls"] == 0


@pytest.mark.parametrize("sparse", [True, False])
def test_resume_continues_to_the_same_budget(chain, tmp_path, teacher_cache_dir, sparse, capsys):
    out = tmp_path / "r.pt"
    p1.main(_cfg(p1, p1.Phase1Config, output=out, teacher_cache=teacher_cache_dir, max_steps=20,
                 sparse_embeddings=sparse))
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 20
    opt_state = ckpt["resume"]["optimizer"]
    assert ("optimizers" in opt_state) == sparse  # the sparse tables' lazy AdamW has its own state
    with pytest.raises(UserError, match="cannot resume"):  # another optimizer layout: one clear line
        p1.main(_cfg(p1, p1.Phase1Config, output=out, teacher_cache=teacher_cache_dir, resume=True,
                     sparse_embeddings=not sparse))
    capsys.readouterr()
    # a loss setting that differs from the one the run started with (as when a default changes between
    # versions) is named in one line; the same settings print none
    other = {} if sparse else {"contrastive_temperature": 0.2}
    r = p1.main(_cfg(p1, p1.Phase1Config, output=out, teacher_cache=teacher_cache_dir, resume=True,
                     sparse_embeddings=sparse, **other))
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: the resumed run")]
    assert notes == ([] if sparse else [
        "note: the resumed run trains with --contrastive_temperature 0.2 (it started with 0.1); pass the values "
        "it started with to keep its objective"])
    assert r["step"] == 30 and r["tokens_seen"] == chain["p1"]["tokens_seen"]
    # the stream continued where the checkpoint left it: same windows consumed as one straight run
    a, b = load_checkpoint(str(out)), load_checkpoint(str(chain["dir"] / "p1.pt"))
    assert a["resume"]["data_position"] == b["resume"]["data_position"]


def test_phase1b_merged_equals_unmerged_and_base_untouched(chain):
    d = chain["dir"]
    c1, c1b = load_checkpoint(str(d / "p1.pt")), load_checkpoint(str(d / "p1b.pt"), phases=("phase1b",))
    assert c1b["parent_checkpoint"]["sha256"] and c1b["lora_config"]["rank"] == 8
    m = c1b["metrics"]  # health on --health_size windows (96 in tiny), cosine on --eval_size (48)
    assert m["domain_n"] == m["web_n"] == 96 and m["before"]["domain_n"] == 96
    merged = model_from_checkpoint(c1b).eval()
    unmerged = model_from_checkpoint(c1)
    inject_lora(unmerged, rank=8, alpha=16, dropout=0.05)
    unmerged.load_state_dict({**unmerged.state_dict(), **c1b["lora_state_dict"]})
    unmerged.eval()
    b = merged.tokenizer()(["merged and unmerged agree", "on every text " * 9])
    za = merged.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])["z_e"]
    zb = unmerged.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])["z_e"]
    assert torch.allclose(za, zb, atol=1e-5)
    lora_touched = [k for k in c1b["base_model_state_dict"] if ".q_proj.weight" in k or ".v_proj.weight" in k]
    assert any(not torch.equal(c1b["base_model_state_dict"][k], c1["base_model_state_dict"][k]) for k in lora_touched)
    for k, v in c1["base_model_state_dict"].items():
        if k not in lora_touched:
            assert torch.equal(v, c1b["base_model_state_dict"][k]), k  # frozen base and codebook
    assert c1b["metrics"]["trainable_params"] == chain["p1b"]["lora_params"]


def test_phase2_keeps_base_and_codebook_and_runs_seed_snippet(chain):
    d = chain["dir"]
    for name, parent in (("p2.pt", "p1b.pt"), ("p2_from_1a.pt", "p1.pt")):
        c2, cp = load_checkpoint(str(d / name), phases=("phase2",)), load_checkpoint(str(d / parent))
        for k, v in cp["base_model_state_dict"].items():
            assert torch.equal(v, c2["base_model_state_dict"][k]), k
        assert ("lora_state_dict" in c2) == (parent == "p1b.pt")
        ckpt = torch.load(str(d / name), weights_only=True)
        b = KmerVQVAE(**ckpt["base_config"]).tokenizer()(["where do codes go?"])
        input_ids, attention_mask = b["input_ids"], b["attention_mask"]
        model = KmerVQVAE(**ckpt["base_config"]); model.load_state_dict(ckpt["base_model_state_dict"])  # noqa: E702
        out = model.encode(input_ids, attention_mask)   # dict: z_e, z_q, indices, ...
        assert out["indices"].shape == (1,)
        f = load_pretrained(str(d / name))
        assert torch.equal(out["indices"], f.encode(["where do codes go?"])["indices"])  # the same codes
        q = f.encode(["where do codes go?"], role="query", top_n=4)
        assert q["top_indices"].shape == (1, 4)
    m = chain["p2"]["metrics"]
    assert {"q2p_acc", "p2q_acc", "code_match_rate", "pos_similarity", "teacher_q2p_acc"} <= set(m)


def test_phase2_adapters_learn():
    """The Phase 2 objective on a fixed batch: a few steps of the query adapter lower the pair InfoNCE
    (the frozen passages stay put), where the held-out metrics of a 12-step tiny run are too noisy to say."""
    import vqvae_phase2_train_adapters as p2
    from lora_adapters import QueryPassageAdapters
    torch.manual_seed(0)
    p = torch.randn(16, 32)
    q = p @ torch.randn(32, 32) * 0.3 + 0.3 * torch.randn(16, 32)  # queries: a distorted view of their passages
    adapters = QueryPassageAdapters(d_model=32)
    params = [w for n, w in adapters.named_parameters() if n.startswith("query")]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = lambda: p2.info_nce(adapters(q, "query"), adapters(p, "passage"), 0.07)
    first = float(loss())
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < 0.5 * first
    assert torch.equal(adapters(p, "passage"), p)  # the passage adapter never trained: still the identity


def test_phase1a_codebook_from_unlabelled_windows(tmp_path, teacher_cache_dir):
    r = p1.main(_cfg(p1, p1.Phase1Config, output=tmp_path / "p1.pt", teacher_cache=teacher_cache_dir,
                     train_windows=64, codebook_windows=16, max_steps=20))
    ckpt = load_checkpoint(str(tmp_path / "p1.pt"))
    state = ckpt["base_model_state_dict"]
    assert bool(state["quantizer.initialized"]) and ckpt["step"] == 20
    m, K = r["metrics"], ckpt["base_config"]["num_codes"]
    assert m["n"] == 64  # the tiny preset's health windows
    assert m["dead_codes"] == K - round(m["utilisation"] * K)  # health numbers agree with each other
    assert 1.0 <= m["perplexity"] <= m["utilisation"] * K + 1e-6 and m["max_code_share"] >= 1 / (m["utilisation"] * K)


def test_phase1a_checkpoint_holds_the_weight_average_and_the_live_weights(chain):
    ckpt = load_checkpoint(str(chain["dir"] / "p1.pt"))
    live, avg = ckpt["resume"]["live_weights"], ckpt["base_model_state_dict"]
    assert "quantizer.codebook" not in live and "encoder.embed.weight" in live
    assert set(live) <= set(avg)
    assert any(not torch.equal(live[n], avg[n]) for n in live)  # the model saved is the average


def test_seed_snippet_verbatim_on_a_phase2_checkpoint(chain):
    """The seed's inference snippet, as written, on a Phase 2 checkpoint written by the script: it leaves
    every tensor unchanged and its codes equal load_pretrained's; a wrongly sized adapter is one line."""
    from lora_adapters import QueryPassageAdapters
    path = str(chain["dir"] / "p2.pt")
    ckpt = torch.load(path, weights_only=True)
    model = KmerVQVAE(**ckpt["base_config"]); model.load_state_dict(ckpt["base_model_state_dict"])  # noqa: E702
    state = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["what is a coarse quantiser?", "a passage about rivers, lakes and the sea"]
    batch = model.tokenizer()(texts)
    for _ in range(5):
        out = model.encode(batch["input_ids"], batch["attention_mask"], batch["text_index"], batch["num_texts"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    f = load_pretrained(path)
    assert torch.equal(out["indices"], f.encode(texts)["indices"])
    adapters = QueryPassageAdapters.from_checkpoint(ckpt)
    via = model.encode(batch["input_ids"], batch["attention_mask"], batch["text_index"], batch["num_texts"],
                       adapter=adapters, role="query")
    assert torch.equal(via["indices"], f.encode(texts, role="query")["indices"])
    with pytest.raises(ValueError, match=r"QueryPassageAdapters\(\*\*ckpt\['adapter_config'\]\)"):
        QueryPassageAdapters(d_model=384).load_state_dict(ckpt["adapter_state_dict"])  # tiny model: d_model 32


def test_phase2_passage_and_listwise_distillation_run(chain, teacher_cache_dir):
    """The two teacher objectives wired into a real Phase 2 run: passage distillation trains the passage
    adapter; the listwise one trains only the query adapter (the ranked passages stay frozen)."""
    d = chain["dir"]
    p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2_pd.pt", teacher_cache=teacher_cache_dir,
                 train_passage_adapter=True, passage_distill_weight=1, pair_weight=0, query_distill_weight=0))
    p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2_rank.pt", teacher_cache=teacher_cache_dir,
                 rank_distill_weight=1, rank_bank=16, pair_weight=0, query_distill_weight=0))
    pd, rank = (load_checkpoint(str(d / n))["adapter_state_dict"] for n in ("p2_pd.pt", "p2_rank.pt"))
    assert pd["passage.down.weight"].abs().sum() > 0 and pd["query.down.weight"].abs().sum() == 0
    assert rank["passage.down.weight"].abs().sum() == 0 and rank["query.down.weight"].abs().sum() > 0
    with pytest.raises(UserError, match="--train_passage_adapter"):  # without a trainable passage adapter
        p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2_bad.pt",
                     teacher_cache=teacher_cache_dir, passage_distill_weight=1))


def test_phase2_identity_penalty_run(chain, teacher_cache_dir):
    """--identity_weight in a real Phase 2 run: it trains the query adapter only, logs the penalty, and a
    large weight keeps the adapter's change to web sentences below an unpenalised run's."""
    d = chain["dir"]
    runs = {}
    for w in (0.0, 100.0):
        out = d / f"p2_id{int(w)}.pt"
        r = p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=out, teacher_cache=teacher_cache_dir,
                         identity_weight=w, lr=1e-2))
        runs[w] = load_checkpoint(str(out))
    assert runs[100.0]["adapter_state_dict"]["passage.down.weight"].abs().sum() == 0
    logged = [json.loads(l) for l in open(d / "p2_id100_run" / "metrics.jsonl")]
    assert any("identity" in r for r in logged if r.get("kind") == "train")
    model = model_from_checkpoint(runs[0.0]).eval()
    enc = p2.FrozenEncoder(model, torch.device("cpu"))
    from vqvae_phase1a_data_webtext import webtext_documents
    from vqvae_phase2_data import sentence_stream
    texts = list(itertools.islice(sentence_stream(webtext_documents("sample", "validation", {"wikipedia": 1},
                                                                    cycle=False)), 32))
    z = enc(texts)
    change = {}
    for w, ckpt in runs.items():
        adapters = QueryPassageAdapters.from_checkpoint(ckpt).eval()
        with torch.no_grad():
            change[w] = float(p2.identity_loss(z, adapters(z, "query")))
    assert change[100.0] < change[0.0]


def test_phase2_hard_negative_groups(chain, teacher_cache_dir):
    """--pair_groups: the pool is ordered by clusters of its passages' frozen vectors (two clear clusters
    here come out as two runs), a real Phase 2 run trains with it, and without a pool it is refused."""
    vecs = {f"p{i}": torch.tensor([1.0, 0.05 * i]) if i % 2 else torch.tensor([0.05 * i, 1.0]) for i in range(8)}
    order = p2.group_by_passage(lambda texts: torch.stack([vecs[t] for t in texts]), groups=2, seed=0)
    pool = [(f"q{i}", f"p{i}") for i in range(8)]
    idx = order(pool, np.random.default_rng(0))
    assert sorted(idx) == list(range(8))
    assert len({i % 2 for i in idx[:4]}) == 1 and len({i % 2 for i in idx[4:]}) == 1
    d = chain["dir"]
    p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2_groups.pt",
                 teacher_cache=teacher_cache_dir, train_pairs=32, pair_groups=4, query_distill_weight=0))
    assert load_checkpoint(str(d / "p2_groups.pt"))["adapter_state_dict"]["query.down.weight"].abs().sum() > 0
    with pytest.raises(UserError, match="--train_pairs"):
        p2.main(_cfg(p2, p2.Phase2Config, checkpoint=d / "p1b.pt", output=d / "p2_bad_groups.pt",
                     teacher_cache=teacher_cache_dir, pair_groups=4))


@pytest.mark.parametrize("sparse", [True, False])
def test_phase1a_table_lr_scale_sets_the_kmer_tables_lr(tmp_path, teacher_cache_dir, sparse):
    out = tmp_path / "t.pt"
    p1.main(_cfg(p1, p1.Phase1Config, output=out, teacher_cache=teacher_cache_dir, max_steps=12,
                 table_lr_scale=3.0, sparse_embeddings=sparse))
    opt = load_checkpoint(str(out))["resume"]["optimizer"]
    groups = [g for o in opt["optimizers"] for g in o["param_groups"]] if sparse else opt["param_groups"]
    tables = [g for g in groups if g.get("lr_base") == 3.0]
    rest = [g for g in groups if not g.get("lr_base") and not g.get("blocks")]
    assert len(tables) == 1 and len(rest) == 1 and len(tables[0]["params"]) == 4  # k-mer and word tables, and their bag weights
    assert tables[0]["lr"] == pytest.approx(3.0 * rest[0]["lr"]) and rest[0]["lr"] > 0


def test_phase1a_blocks_train_from_the_first_step_after_the_word_stage(tmp_path, teacher_cache_dir):
    """The tiny preset's word stage is steps 0-4: the blocks' zero-initialised output layers stay zero
    through it and move at step 5, the first step with the blocks on (their learning rate is set for
    the step about to run, not the one before)."""
    def out_proj(max_steps):
        out = tmp_path / f"{max_steps}.pt"
        p1.main(_cfg(p1, p1.Phase1Config, output=out, teacher_cache=teacher_cache_dir, max_steps=max_steps,
                     lexicon_steps=5, bag_steps=0, weight_average=0))
        return load_checkpoint(str(out))["base_model_state_dict"]["encoder.blocks.0.attn.out_proj.weight"]
    assert out_proj(5).abs().max() == 0
    assert out_proj(6).abs().max() > 0


def test_phase1a_word_rehearsal_keeps_training_words_after_the_word_stage(tmp_path, teacher_cache_dir):
    from teacher import Teacher
    from data_common import parse_weights
    from vqvae_phase1a_data_webtext import WEBTEXT_SOURCES, webtext_documents

    def run(**over):
        cfg = _cfg(p1, p1.Phase1Config, output=tmp_path / f"{len(over)}.pt", teacher_cache=teacher_cache_dir,
                   max_steps=40, **over)
        p1.main(cfg)
        return cfg, load_pretrained(cfg.output)
    (cfg, on), (_, off) = run(word_rehearsal=32), run()
    teacher = Teacher.load(cfg.teacher, "cpu", cfg.teacher_cache, cfg.teacher_batch_size)
    weights = parse_weights(cfg.sources, WEBTEXT_SOURCES)
    lex = p1.build_lexicon(cfg, lambda split, cycle: webtext_documents("sample", split, weights, cycle=cycle), teacher, 0)

    def word_cosine(f):  # the decoded vector of each lexicon word against the teacher's, as the word stage trains
        out = f.encode(lex.vocab)
        return float(torch.nn.functional.cosine_similarity(f.model.decode(out["z_code"]), lex.embeddings).mean())
    assert word_cosine(on) > word_cosine(off) + 0.03
