"""kmer_index.py: build, save, load, query, append, refuse a foreign checkpoint, name a bad line."""
import json
import os

import numpy as np
import pytest
import torch

import kmer_index
import vqvae_phase1_train as p1
from train_common import REPO, parse_config
from vqvae_phase1_model import load_checkpoint, load_pretrained, save_checkpoint


@pytest.fixture(autouse=True)
def fp32_indexes(monkeypatch):
    """Indexes build in fp32 here, as KmerFilter.encode runs, which the tests compare them with; the bf16
    test asks for each precision by name."""
    monkeypatch.setattr(kmer_index, "DEFAULT_PRECISION", "fp32")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, teacher_cache_dir):
    d = tmp_path_factory.mktemp("index")
    p1.main(parse_config(p1.Phase1Config, p1.PRESETS, ["--preset", "tiny", "--output", str(d / "p1.pt"),
                                                        "--teacher_cache", teacher_cache_dir]))
    return d / "p1.pt"


def _corpus(path, texts, start=0):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"d{start + i}", "title": "", "text": t}) + "\n")
    return str(path)


TEXTS = [f"passage number {i} about {topic}" for i, topic in
         enumerate(["rivers and lakes", "the history of printing", "protein folding", "football rules",
                    "cheese making", "volcanoes", "railway timetables", "poetry of the sea"] * 4)]


def test_round_trip_equals_in_memory_and_append_equals_build_at_once(ckpt, tmp_path):
    a = _corpus(tmp_path / "a.jsonl", TEXTS[:20])
    b = _corpus(tmp_path / "b.jsonl", TEXTS[20:], start=20)
    built = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i1"),
                             "--lists", "model"])
    loaded = kmer_index.Index.load(str(tmp_path / "i1"))
    assert np.array_equal(built.codes, loaded.codes) and built.ids == loaded.ids
    assert np.array_equal(built.centroids, loaded.centroids)
    filt = load_pretrained(str(ckpt))
    q = kmer_index.encode_vectors(filt, ["rivers", "cheese"], "query")
    for x, y in zip(built.search(q, n_probe=3), loaded.search(q, n_probe=3)):
        assert x["codes"] == y["codes"] and np.array_equal(x["candidates"], y["candidates"])
    # the codes equal the model's own nearest codes for each passage
    assert np.array_equal(loaded.codes, filt.encode(TEXTS[:20])["indices"].numpy())
    # every passage sits in exactly one inverted list, the one of its code
    for k in range(len(loaded.centroids)):
        members = loaded.members[loaded.offsets[k]:loaded.offsets[k + 1]]
        assert (loaded.codes[members] == k).all()
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", b, "--index", str(tmp_path / "i1"), "--append"])
    once = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, b, "--index", str(tmp_path / "i2"),
                            "--lists", "model"])
    appended = kmer_index.Index.load(str(tmp_path / "i1"))
    assert appended.ids == once.ids and np.array_equal(appended.codes, once.codes)
    assert np.array_equal(appended.offsets, once.offsets) and np.array_equal(appended.members, once.members)
    budget = appended.search(q, budget=0.25)
    assert all(h["fraction_kept"] >= 0.25 for h in budget)
    assert set(os.listdir(tmp_path / "i1")) >= {"index.json", "codes.npy", "centroids.npy", "ids.json",
                                                 "sources.npy", "list_offsets.npy", "list_members.npy"}


def test_bf16_index_records_its_precision_and_routes_like_fp32(ckpt, tmp_path, monkeypatch):
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    idx = {p: kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / p),
                               "--num_lists", "4", "--precision", p]) for p in ("fp32", "bf16")}
    assert [idx[p].meta["precision"] for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert not np.array_equal(idx["fp32"].centroids, idx["bf16"].centroids)  # autocast really ran ...
    assert np.abs(idx["fp32"].centroids - idx["bf16"].centroids).max() < 0.05  # ... and moved the lists little
    assert (idx["fp32"].codes == idx["bf16"].codes).mean() >= 0.9
    # a query defaults to the precision the index was built with
    seen = []
    real = kmer_index.encode_vectors
    monkeypatch.setattr(kmer_index, "encode_vectors", lambda f, *a, **k: (seen.append(f.bf16), real(f, *a, **k))[1])
    for p in ("fp32", "bf16"):
        kmer_index.main(["query", "--index", str(tmp_path / p), "--query", "rivers"])
    kmer_index.main(["query", "--index", str(tmp_path / "bf16"), "--query", "rivers", "--precision", "fp32"])
    assert seen == [False, True, False]
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "bf16"), "--append"])
    assert kmer_index.Index.load(str(tmp_path / "bf16")).meta["precision"] == "bf16"  # appended as it was built


def test_bag_encoder_routes_the_bag_and_queries_and_append_follow_the_index(ckpt, tmp_path, monkeypatch, capsys):
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    bag = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "bag"),
                           "--num_lists", "4", "--encoder", "bag", "--lexical", "0"])
    assert bag.meta["encoder"] == "bag"
    filt = load_pretrained(str(ckpt))
    v_bag = kmer_index.encode_vectors(filt.inference_variant(bag_only=True), TEXTS, "passage")
    assert not np.allclose(v_bag, kmer_index.encode_vectors(filt, TEXTS, "passage"), atol=1e-3)  # blocks matter
    # every passage sits in the list its bag vector routes to (through the index's own centre and transform)
    routed = kmer_index.routed(v_bag, bag.center, bag.transform)
    assert np.array_equal(bag.codes, (routed @ bag.centroids.T).argmax(1))
    seen = []  # does each encode skip the blocks?
    real = kmer_index.encode_vectors
    monkeypatch.setattr(kmer_index, "encode_vectors",
                        lambda f, *a, **k: (seen.append(f.model.encoder.bypass_blocks), real(f, *a, **k))[1])
    kmer_index.main(["query", "--index", str(tmp_path / "bag"), "--query", "rivers"])
    kmer_index.main(["query", "--index", str(tmp_path / "bag"), "--query", "rivers", "--encoder", "full"])
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "bag"), "--append"])
    assert seen == [True, False, True]
    assert kmer_index.Index.load(str(tmp_path / "bag")).meta["encoder"] == "bag"  # appended as it was built
    # a checkpoint without the bag path: one clear line
    import vqvae_phase1_model

    def no_bag(path, real_load=vqvae_phase1_model.load_pretrained):
        f = real_load(path)
        f.model.config.bag_path = False
        return f
    monkeypatch.setattr(vqvae_phase1_model, "load_pretrained", no_bag)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "nb"),
                         "--encoder", "bag"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--encoder bag" in err and "bag_path" in err


def test_corpus_lists_and_rerank_text_lookup(ckpt, tmp_path):
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    index = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i"),
                             "--num_lists", "4"])
    assert len(index.centroids) == 4 and index.meta["lists"] == "corpus"
    assert kmer_index.passage_texts(index, np.array([5, 0])) == [TEXTS[5], TEXTS[0]]
    # lists fitted on a sample; every passage (spooled to disk, float16) goes to its nearest list (centred only)
    small = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "j"),
                             "--num_lists", "4", "--fit_sample", "10", "--batch_size", "7", "--whiten", "0",
                             "--lexical", "0"])
    filt = load_pretrained(str(ckpt))
    v = kmer_index.encode_vectors(filt, TEXTS, "passage")
    out = filt.encode(TEXTS, role="passage")  # routes on code space before normalisation, not on unit z_code
    assert np.allclose(v, out["z_code_raw"].numpy()) and not np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    assert np.allclose(v / np.linalg.norm(v, axis=1, keepdims=True), out["z_code"].numpy(), atol=1e-5)
    v = v.astype(np.float16).astype(np.float32)  # as spooled
    assert np.allclose(index.center, v.mean(0), atol=1e-5)  # every passage in the fit: the corpus mean
    assert small.transform is None and small.meta["whiten"] == 0
    assert np.array_equal(small.codes, ((v - small.center) @ small.centroids.T).argmax(1))
    assert not [f for f in os.listdir(tmp_path / "j") if f.startswith(".tmp_")]
    loaded = kmer_index.Index.load(str(tmp_path / "j"))
    assert np.array_equal(loaded.center, small.center) and loaded.meta["centred"]
    # queries are routed after the same subtraction: probe order = lists by cosine to (query - centre)
    want = np.argsort(-((v - loaded.center) @ loaded.centroids.T), axis=1, kind="stable")
    assert [h["codes"] for h in loaded.search(v, n_probe=4)] == want.tolist()
    assert [h["codes"][0] for h in loaded.search(v, n_probe=1)] == small.codes.tolist()  # its own list first
    # the command line encodes queries in the index's space: z_code_raw, or z_code for an index built before it
    ask = lambda: [r["codes"] for r in kmer_index.main(["query", "--index", str(tmp_path / "j"), "--n_probe", "4",
                                                        *[x for t in TEXTS for x in ("--query", t)]])]
    order = lambda q: np.argsort(-((q - loaded.center) @ loaded.centroids.T), axis=1, kind="stable").tolist()
    q = filt.encode(TEXTS, role="query")
    new, old = order(q["z_code_raw"].numpy()), order(q["z_code"].numpy())
    assert new != old  # the two spaces route these queries differently, so the check below can fail
    assert loaded.meta["vectors"] == "z_code_raw" and ask() == new
    meta = json.load(open(tmp_path / "j" / "index.json"))
    del meta["vectors"]
    json.dump(meta, open(tmp_path / "j" / "index.json", "w"))
    assert ask() == old
    plain = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "k"),
                             "--num_lists", "4", "--no_center", "--lexical", "0"])
    assert plain.center is None and np.array_equal(plain.codes, (v @ plain.centroids.T).argmax(1))


def test_whitening_scales_each_principal_axis_and_the_index_routes_through_it(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    sd = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    x = (rng.normal(size=(4000, 6)) * sd) @ axes.T + 3.0  # known variances sd**2 along known axes, off-centre
    mean, w = kmer_index.routing_transform(x, whiten=0.5)
    y = kmer_index.routed(x, mean, w)
    assert np.allclose(y.mean(0), 0, atol=1e-6)
    var = np.linalg.eigvalsh(np.cov(y.T))  # half-whitening: each variance becomes its square root
    assert np.allclose(np.sort(var), np.sort(np.linalg.eigvalsh(np.cov(x.T)) ** 0.5), rtol=1e-3)
    full = kmer_index.routed(x, *kmer_index.routing_transform(x, whiten=1.0))
    assert np.allclose(np.cov(full.T), np.eye(6), atol=1e-3)  # whitening: identity covariance
    assert kmer_index.routing_transform(x, center=True)[1] is None  # no whitening asked: the mean alone
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    index = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i"),
                             "--num_lists", "4", "--lexical", "0"])  # corpus lists: half-whitened unless told otherwise
    loaded = kmer_index.Index.load(str(tmp_path / "i"))
    assert kmer_index.DEFAULT_WHITEN == 0.5 and loaded.meta["whiten"] == 0.5
    assert np.array_equal(loaded.transform, index.transform)
    asked = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "w"),
                             "--num_lists", "4", "--whiten", "0.5", "--lexical", "0"])
    assert np.array_equal(asked.transform, index.transform) and np.array_equal(asked.codes, index.codes)
    for flags in (["--no_center"], ["--lists", "model"]):  # raw vectors, or the model's codes: no transform
        other = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "o"),
                                 "--num_lists", "4", "--overwrite", "--lexical", "0", *flags])
        assert other.transform is None and other.meta["whiten"] == 0
    v = kmer_index.encode_vectors(load_pretrained(str(ckpt)), TEXTS, "passage").astype(np.float16).astype(np.float32)
    routed = (v - loaded.center) @ loaded.transform
    assert np.array_equal(loaded.codes, (routed @ loaded.centroids.T).argmax(1))
    assert [h["codes"][0] for h in loaded.search(v, n_probe=1)] == loaded.codes.tolist()  # queries too
    with pytest.raises(SystemExit):
        kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "m"),
                         "--lists", "model", "--whiten", "0.5"])


def test_foreign_checkpoint_and_bad_lines_are_one_clear_error(ckpt, tmp_path, capsys):
    a = _corpus(tmp_path / "a.jsonl", TEXTS[:8])
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i")])
    other = load_checkpoint(str(ckpt))
    other["base_model_state_dict"]["encoder.embed.weight"] = other["base_model_state_dict"]["encoder.embed.weight"] + 1
    save_checkpoint(other, str(tmp_path / "other.pt"))
    before = {n: open(tmp_path / "i" / n, "rb").read() for n in os.listdir(tmp_path / "i")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        kmer_index.main(["query", "--index", str(tmp_path / "i"), "--checkpoint", str(tmp_path / "other.pt"),
                         "--query", "rivers"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "was built by checkpoint" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"_id": "x1", "text": "fine"}) + "\n" + '{"_id": "x2", "text": ' + "\n")
    with pytest.raises(SystemExit):
        kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", str(bad), "--index", str(tmp_path / "i"),
                         "--append"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and f"{bad}, line 2" in err
    after = {n: open(tmp_path / "i" / n, "rb").read() for n in os.listdir(tmp_path / "i")}
    assert after == before  # nothing already written is lost or changed
    with pytest.raises(SystemExit):  # an existing index is not overwritten silently
        kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i")])
    assert "already holds an index" in capsys.readouterr().err


def test_other_columns_and_unique_texts(ckpt, tmp_path):
    """SQuAD-style rows (id, context repeated per question) index each distinct passage once."""
    rows = [{"id": f"q{i}", "context": TEXTS[i // 3], "question": f"question {i}"} for i in range(12)]
    path = tmp_path / "squad_like.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", str(path), "--index", str(tmp_path / "s"),
                             "--id_field", "id", "--text_field", "context", "--unique_text", "--num_lists", "2"])
    assert index.ids == ["q0", "q3", "q6", "q9"]
    assert kmer_index.passage_texts(kmer_index.Index.load(str(tmp_path / "s")), np.array([1])) == [TEXTS[1]]


def test_eval_ivf_rows_route_passages_and_queries_through_the_same_transform():
    import eval_filter
    rng = np.random.default_rng(1)
    d = (rng.normal(size=(300, 8)) * np.array([6, 3, 1, 1, 1, 0.5, 0.5, 0.2]) + 2).astype(np.float32)
    q = (rng.normal(size=(40, 8)) + 2).astype(np.float32)
    mean, w = kmer_index.routing_transform(d, whiten=0.5)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    by_hand = eval_filter.ivf_on_teacher(unit((d - mean) @ w), unit((q - mean) @ w), 16, 0)
    got = eval_filter.kmeans_lists(d, q, 16, 0, center=True, whiten=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(got[:2], by_hand[:2]))
    plain = eval_filter.kmeans_lists(d, q, 16, 0)
    assert np.array_equal(plain[0], eval_filter.ivf_on_teacher(unit(d), unit(q), 16, 0)[0])
    assert not np.array_equal(plain[1], got[1])  # the transform changes the probe order


def test_default_lists_grow_with_the_corpus(ckpt, tmp_path, capsys):
    """--num_lists 0: the model's codes for a small corpus; the power of two nearest 4 sqrt(N) once that is more."""
    assert kmer_index.default_lists(1_460, 256) == 256  # CISI with the demo's 256 codes: as before
    assert kmer_index.default_lists(1_460, 1024) == 1024
    assert kmer_index.default_lists(51_142, 256) == 1024  # 4 sqrt(N) = 905
    assert kmer_index.default_lists(20_142, 256) == 512  # 568
    assert kmer_index.default_lists(1_000_000, 1024) == 4096  # 4,000
    assert kmer_index.default_lists(0, 8) == 8
    # a build with no --num_lists: the checkpoint's codes (fewer passages here than codes: one list each at most)
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    built = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i")])
    assert len(built.centroids) == min(kmer_index.default_lists(len(TEXTS), load_pretrained(str(ckpt)).model.config.num_codes),
                                       len(TEXTS))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "j"),
                         "--num_lists", "-1"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num_lists -1: give a number of lists >= 1") and len(err.splitlines()) == 1


def test_benchmark_times_list_picking_in_indexes_it_builds(ckpt, tmp_path, teacher_cache_dir):
    """`benchmark.py --index_lists`: the README's command for what picking lists costs a query runs, builds one index
    per number of lists over SQuAD dev + web passages, and reports each; without a checkpoint, or with a bad list, it
    is one error line."""
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmark.py", "--checkpoint", str(ckpt), "--n", "8", "--repeats", "1",
                        "--batch_size", "8", "--index_lists", "8,16", "--index_distractors", "40", "--index_queries",
                        "5", "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(out))["index"]
    assert [x["lists"] for x in rows] == [8, 16]
    assert all(x["passages"] == 2_067 + 40 and x["list_terms"] > 0 for x in rows)
    assert all(x[k] > 0 for x in rows for k in ("score_ms", "search_1pct_ms", "teacher_query_ms", "kmer_query_ms"))
    assert "| 16 |" in r.stdout
    for args, start in ((["--index_lists", "512"], "error: --index_lists needs --checkpoint"),
                        (["--checkpoint", "x.pt", "--index_lists", "512,a"], "error: --index_lists '512,a': give")):
        r = subprocess.run([sys.executable, "benchmark.py", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().startswith(start), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
