import gzip
import itertools
import json
import os

import numpy as np
import pytest
import torch

from data_common import parse_data_files, parse_weights
from train_common import REPO, UserError
from vqvae_phase1a_data_webtext import webtext_documents, wikitext_articles
from vqvae_phase1b_data_domains import (DOMAIN_SOURCES, domain_documents, fmt_alpaca, fmt_arxiv, fmt_hh_rlhf,
                                        fmt_lmsys, fmt_oasst, fmt_pubmed, fmt_sharegpt, fmt_ultrachat)
from vqvae_phase2_data import PAIR_SOURCES, PairBatcher, grouped_order, pair_stream, squad_eval_article
from vqvae_phase2_train_adapters import inbatch_metrics, info_nce


def test_wikitext_lines_become_articles():
    rows = [{"text": t} for t in ["", " = Alpha = \n", "", " Alpha is a letter . \n", " = = History = = \n",
                                  " It is old . \n", " = Beta = \n", " Beta follows . \n"]]
    assert list(wikitext_articles(rows)) == ["Alpha\nAlpha is a letter .\nHistory\nIt is old .",
                                             "Beta\nBeta follows ."]


FORMATTERS = [
    (fmt_arxiv, {"title": "A  Title", "abstract": " Some\nabstract. "}, "A Title. Some abstract."),
    (fmt_pubmed, {"article": "long", "abstract": "Background: x.  Results: y."}, "Background: x. Results: y."),
    (fmt_oasst, {"text": "Hi there", "role": "prompter", "lang": "en"}, "User: Hi there"),
    (fmt_oasst, {"text": "Hallo", "role": "assistant", "lang": "de"}, ""),
    (fmt_ultrachat, {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
     "User: Q?\nAssistant: A."),
    (fmt_alpaca, {"instruction": "Add.", "input": "2 and 3", "output": "5"}, "User: Add.\n2 and 3\nAssistant: 5"),
    (fmt_alpaca, {"instruction": "Say hi.", "input": "", "output": "Hi"}, "User: Say hi.\nAssistant: Hi"),
    (fmt_hh_rlhf, {"chosen": "\n\nHuman: How are you?\n\nAssistant: Fine.\n\nHuman: Good.\n\nAssistant: Yes."},
     "User: How are you?\nAssistant: Fine.\nUser: Good.\nAssistant: Yes."),
    (fmt_sharegpt, {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hello!"}]},
     "User: Hey\nAssistant: Hello!"),
    (fmt_lmsys, {"conversation": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]},
     "User: Why?\nAssistant: Because."),
]


@pytest.mark.parametrize("fmt,record,expected", FORMATTERS)
def test_domain_formatters(fmt, record, expected):
    assert fmt(record) == expected


def _jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_every_domain_source_loads_local_hub_schema(tmp_path):
    records = {"arxiv": {"title": "T", "abstract": "An abstract about physics."},
               "pubmed": {"article": "", "abstract": "A clinical abstract."},
               "oasst": {"text": "Hello", "role": "prompter", "lang": "en"},
               "ultrachat": {"messages": [{"role": "user", "content": "Hi"}]},
               "alpaca": {"instruction": "Do it", "input": "", "output": "Done"},
               "hh_rlhf": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": ""},
               "sharegpt": {"conversations": [{"from": "human", "value": "Yo"}]},
               "lmsys": {"conversation": [{"role": "user", "content": "Hey"}]}}
    assert set(records) == set(DOMAIN_SOURCES)
    for name, rec in records.items():
        path = _jsonl(tmp_path / f"{name}.jsonl.gz", [rec] * 3)
        docs = list(domain_documents("files", "train", {name: 1.0}, files={name: [path]}, cycle=False))
        assert docs == [DOMAIN_SOURCES[name][2](rec)] * 3


def test_raw_release_formats_convert(tmp_path):
    pq = tmp_path / "ori_pqal.json"
    pq.write_text(json.dumps({"1": {"QUESTION": "q?", "CONTEXTS": ["Part one.", "Part two."]}}))
    tc = tmp_path / "valid_freq.json"
    tc.write_text(json.dumps({"c1": {"content": [{"message": "hi", "agent": "agent_1"},
                                                 {"message": "hello", "agent": "agent_2"}]}}))
    dd = tmp_path / "dialogues.txt"
    dd.write_text("Hi there . __eou__ Hello . __eou__\n")
    assert list(domain_documents("files", "train", {"pubmed": 1}, files={"pubmed": [str(pq)]},
                                 cycle=False)) == ["Part one. Part two."]
    for path in (tc, dd):
        docs = list(domain_documents("files", "train", {"ultrachat": 1}, files={"ultrachat": [str(path)]}, cycle=False))
        assert len(docs) == 1 and docs[0].startswith("User: ") and "\nAssistant: " in docs[0]


def test_bundled_samples_load_for_every_phase():
    assert len(list(itertools.islice(webtext_documents("sample", "train", {"wikitext": 1, "c4": 1, "wikipedia": 1}), 20))) == 20
    assert len(list(itertools.islice(domain_documents("sample", "validation", {"arxiv": 1, "hh_rlhf": 1}, cycle=False), 20))) == 20
    pairs = list(itertools.islice(pair_stream("sample", "train", {"squad": 1, "medquad": 1, "pubmedqa": 1}), 50))
    assert len(pairs) == 50 and all(q and p for q, p in pairs)
    # arXiv title -> abstract: the passage is the abstract alone, not the "title. abstract" text Phase 1b reads
    abstracts = {r["title"].strip(): r["abstract"].strip()
                 for r in map(json.loads, gzip.open("data/academic/arxiv_train.jsonl.gz", "rt"))}
    titles = list(itertools.islice(pair_stream("sample", "train", {"arxiv": 1}, cycle=False), 200))
    assert len(titles) == 200 and all(q and p == abstracts[q] for q, p in titles)


def test_pair_sources_local_hub_schema(tmp_path):
    cols = {"msmarco": ("query", "positive"), "nq": ("query", "answer"), "squad": ("question", "answer"),
            "hotpotqa": ("anchor", "positive"), "triviaqa": ("query", "answer"), "eli5": ("question", "answer"),
            "medquad": ("question", "answer"), "pubmedqa": ("question", "abstract"), "arxiv": ("title", "abstract")}
    assert set(cols) == set(PAIR_SOURCES)
    for name, (qc, pc) in cols.items():
        rows = [{qc: f"question {i}?", pc: f"passage number {i}."} for i in range(40)]
        path = _jsonl(tmp_path / f"{name}.jsonl.gz", rows)
        train = list(pair_stream("files", "train", {name: 1}, files={name: [path]}, cycle=False, held_out_percent=20))
        held = list(pair_stream("files", "validation", {name: 1}, files={name: [path]}, cycle=False, held_out_percent=20))
        assert len(train) + len(held) == 40 and held and train
        assert not {p for _, p in train} & {p for _, p in held}
        assert train[0] in [(r[qc], r[pc]) for r in rows]


def test_squad_eval_articles_never_reach_phase2():
    pairs = list(pair_stream("sample", "train", {"squad": 1}, cycle=False)) + \
        list(pair_stream("sample", "validation", {"squad": 1}, cycle=False))
    rows = [json.loads(l) for l in gzip.open("data/pairs/squad_dev.jsonl.gz", "rt")]
    eval_contexts = {r["context"] for r in rows if squad_eval_article(r["title"])}
    assert eval_contexts and pairs
    assert not {p for _, p in pairs} & eval_contexts


def test_batches_have_no_duplicate_passages_or_queries():
    pairs = [(f"q{i % 7}", f"p{i % 5}") for i in range(200)]
    for batch in itertools.islice(PairBatcher(lambda: iter(pairs), batch_size=4), 20):
        assert len({q for q, _ in batch}) == len(batch) and len({p for _, p in batch}) == len(batch)


def test_grouped_batches_draw_each_batch_from_one_group():
    """Phase 2's hard negatives (--pair_groups): with a grouped order, every batch holds pairs of one
    group, and every epoch still visits each pair of the pool once, in a new order."""
    groups = np.repeat([2, 0, 1], 8)  # 24 pairs, three groups of 8, one batch each
    pairs = [(f"q{i}", f"p{i}") for i in range(24)]
    batcher = PairBatcher(lambda: iter(pairs), batch_size=8, pool_size=24,
                          order=lambda pool, rng: grouped_order(groups, rng))
    epochs = [[next(batcher) for _ in range(3)] for _ in range(2)]
    for epoch in epochs:
        assert sorted(int(q[1:]) for b in epoch for q, _ in b) == list(range(24))
        for batch in epoch:
            assert len({groups[int(q[1:])] for q, _ in batch}) == 1
    assert epochs[0] != epochs[1]


def test_inbatch_metrics_on_hand_made_vectors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    m = inbatch_metrics(q, p, torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    # row 2 (q=[1,.1]) is nearest to p0, not p2; column 2 (p=[0,1]) ties p1 -> argmax picks q1
    assert m["q2p_acc"] == pytest.approx(2 / 3) and m["p2q_acc"] == pytest.approx(2 / 3)
    assert m["code_match_rate"] == pytest.approx(2 / 3)
    assert m["pos_similarity"] == pytest.approx((1 + 1 + 0.1 / (1.01 ** 0.5)) / 3, abs=1e-5)
    perfect = info_nce(torch.eye(4) * 5, torch.eye(4) * 5, 0.07)
    shuffled = info_nce(torch.eye(4), torch.eye(4)[[1, 0, 3, 2]], 0.07)
    assert perfect < 0.01 < shuffled


def test_user_mistakes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown source 'c5'"):
        parse_weights("c4,c5", ["c4", "wikitext"])
    with pytest.raises(UserError, match="NAME=PATH"):
        parse_data_files("just_a_path.json")
    with pytest.raises(UserError, match=r"source 'c4' \(allenai/c4 \(en\)\) could not be loaded from the Hub.*--data sample"):
        list(itertools.islice(webtext_documents("hub", "train", {"c4": 1}), 1))
    with pytest.raises(UserError, match="gated.*HF_TOKEN.*WildChat"):
        list(domain_documents("hub", "train", {"lmsys": 1}, cycle=False))
    bad = _jsonl(tmp_path / "bad.jsonl.gz", [{"body": "no text column"}])
    with pytest.raises(UserError, match=r"lacks column\(s\) \['text'\].*Hub schema"):
        list(itertools.islice(webtext_documents("files", "train", {"c4": 1}, files={"c4": [bad]}), 1))


def test_mixtures_are_identical_across_hash_seeds():
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, itertools, hashlib; sys.path.insert(0, %r); "
            "from vqvae_phase1b_data_domains import domain_documents; "
            "d = domain_documents('sample', 'validation', {'arxiv': 1, 'pubmed': 1, 'ultrachat': 1, 'hh_rlhf': 1}, cycle=False); "
            "print(hashlib.sha1(''.join(itertools.islice(d, 40)).encode()).hexdigest())" % repo)
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1


def test_skip_unavailable_drops_a_source_loudly(capsys):
    weights = {"arxiv": 1.0, "oasst": 1.0}  # oasst has no bundled sample
    with pytest.raises(UserError, match="source 'oasst' has no bundled"):
        list(itertools.islice(domain_documents("sample", "train", weights), 1))
    docs = list(itertools.islice(domain_documents("sample", "train", weights, skip_unavailable=True), 5))
    assert len(docs) == 5
    assert "skipping unavailable source 'oasst'" in capsys.readouterr().err


def test_window_stream_skips_empty_documents_and_excluded_windows():
    from vqvae_phase1_model import KmerTokenizer
    from vqvae_phase1a_data_webtext import WindowStream
    tok = KmerTokenizer(window_size=8, kmer_pool=1)
    docs = ["short", "alpha beta gamma delta epsilon", "zeta eta theta iota kappa lambda"]
    windows = [w for d in docs for w in tok.split_windows(d, max_windows=0) if len(w) >= 8]
    s = WindowStream(lambda: iter(docs), tok, shuffle_buffer=1, min_chars=8, exclude={windows[0]})
    got = s.take(100)
    assert sorted(got) == sorted(windows[1:])  # a first document with no window does not end the stream


def test_pair_batcher_resume_keeps_the_deferred_pairs():
    """A resumed Phase 2 replays its batches: pairs deferred as in-batch duplicates are not lost."""
    pairs = [(f"q{i}", f"p{i // 3}") for i in range(60)]  # each passage 3 times in a row: pairs wait
    a = PairBatcher(lambda: iter(pairs), batch_size=4)
    first = [next(a) for _ in range(5)]
    assert a.waiting  # something is waiting at the kill
    rest = list(a)
    b = PairBatcher(lambda: iter(pairs), batch_size=4)
    b.skip_batches(5)
    assert list(b) == rest
    old = PairBatcher(lambda: iter(pairs), batch_size=4)
    old.skip(sum(len(x) for x in first))  # the pair position alone: the waiting pairs are gone
    assert list(old) != rest


def test_web_distractors_are_fixed_nested_and_leave_out_the_named_pages():
    import eval_filter
    from train_common import UserError
    few, more = eval_filter.web_distractors(50), eval_filter.web_distractors(400)
    assert len(few) == 50 and len(more) == 400 and set(few) <= set(more)  # a larger N holds the smaller
    assert few == eval_filter.web_distractors(50)  # the same passages every run
    assert all(150 <= len(p) <= 800 for p in more)
    with gzip.open(os.path.join(REPO, "data", "webtext", "wikipedia_validation.jsonl.gz"), "rt") as f:
        page = json.loads(f.readline())
    first = page["text"].strip().split("\n")[0][:120]  # its first paragraph starts a passage
    with pytest.raises(UserError, match="--distractors 10000000: the bundled web text holds") as e:
        eval_filter.web_distractors(10_000_000)
    total = int(str(e.value).split("holds ")[1].split(" ")[0].replace(",", ""))
    everything = eval_filter.web_distractors(total)
    assert any(p.startswith(first) for p in everything)
    left = eval_filter.web_distractors(total - 100, [page["title"]])  # that page left out, and only that page
    assert not any(p.startswith(first) for p in left) and len(set(everything) - set(left)) < 100 + 20



def test_file_distractors_read_both_corpus_formats_leave_out_the_set_and_repeats(tmp_path):
    import eval_filter
    from train_common import UserError
    rows = [{"_id": f"w{i}", "title": f"Page {i}" if i % 2 else "", "text": f"paragraph {i} of a page"} for i in range(30)]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = tmp_path / "b.txt"
    b.write_text("one passage per line\n\nparagraph 3 of a page\nthe set's own passage\none passage per line\n")
    got = eval_filter.file_distractors([str(a), str(b)], 0, known=["the set's own passage"])
    want = {f"Page {i}. paragraph {i} of a page" if i % 2 else f"paragraph {i} of a page" for i in range(30)}
    assert set(got) == want | {"one passage per line", "paragraph 3 of a page"} and len(got) == 32  # no repeats
    few = eval_filter.file_distractors([str(a), str(b)], 10, known=["the set's own passage"])
    assert len(few) == 10 and set(few) <= set(got)
    assert few == eval_filter.file_distractors([str(a), str(b)], 10, known=["the set's own passage"])  # fixed
    assert [p for p in got if p in few] == few  # in file order, as the bundled distractors are
    with pytest.raises(UserError, match="--distractors 40: .* hold 32 passages not in the set"):
        eval_filter.file_distractors([str(a), str(b)], 40, known=["the set's own passage"])

def test_bundled_retrieval_sets_load_with_their_judgements():
    import eval_filter
    sets = {}
    for name, n_docs, n_queries in (("cisi", 1460, 76), ("scitldr", 3229, 3229), ("medquad", 2000, 2000),
                                    ("pubmedqa", 1000, 1000), ("arxiv_titles", 2000, 2000)):
        doc_ids, docs, qids, queries, qrels = sets[name] = eval_filter.load_beir(os.path.join(REPO, "data", "retrieval", name))
        assert len(docs) == len(set(doc_ids)) == n_docs and len(queries) == len(qids) == n_queries
        assert all(qrels[q] and qrels[q] <= set(doc_ids) for q in qids)
    # SciTLDR: each query (a paper's TLDR) is judged against exactly its own paper
    doc_ids, docs, qids, queries, qrels = sets["scitldr"]
    assert all(qrels[q] == {q[:-2]} for q in qids)
    # MedQuAD: each question judged against its own answer alone, and none of the Phase 2 pairs' text in it
    doc_ids, docs, qids, queries, qrels = sets["medquad"]
    assert all(qrels[q] == {q.rsplit("_q", 1)[0]} for q in qids)
    with gzip.open(os.path.join(REPO, "data", "pairs", "medquad.jsonl.gz"), "rt") as f:
        trained = [json.loads(line) for line in f]
    seen = {r["question"].strip() for r in trained} | {r["answer"].strip() for r in trained}
    assert not seen & (set(docs) | set(queries))
    # PubMedQA and arXiv titles: one question (title) per abstract, judged against that abstract alone
    for name in ("pubmedqa", "arxiv_titles"):
        doc_ids, docs, qids, queries, qrels = sets[name]
        assert all(qrels[q] == {"d" + q[1:]} for q in qids) and len(set(queries)) > 0.99 * len(queries)


def test_lexicon_domain_words_read_phase1b_text_or_say_what_is_missing(tmp_path):
    import vqvae_phase1_train as p1
    from train_common import parse_config
    web = _jsonl(tmp_path / "c4.jsonl.gz", [{"text": "web text"}])
    arxiv = _jsonl(tmp_path / "arxiv.jsonl.gz", [{"title": "On lemmas", "abstract": "A lemma."}])
    cfg = lambda *a: parse_config(p1.Phase1Config, p1.PRESETS, ["--preset", "tiny", "--lexicon_domain_words", "5", *a])
    with pytest.raises(UserError, match="needs Phase 1b's files in --data_files"):
        p1.domain_lexicon_documents(cfg("--data", "files", "--data_files", f"c4={web}"))
    files = cfg("--data", "files", "--data_files", f"c4={web};arxiv={arxiv}")
    assert list(p1.domain_lexicon_documents(files)) == ["On lemmas. A lemma."]  # Phase 1b's format, web left out
    sample = list(itertools.islice(p1.domain_lexicon_documents(cfg()), 400))  # the bundled academic and chat text
    assert any(d.startswith("User:") for d in sample) and not all(d.startswith("User:") for d in sample)
