"""Rebuild the bundled samples in data/ from the original files (../shared/data by default).

    python data/build_samples.py [--src ../shared/data]

Only sets whose licence allows redistribution are used (see data/README.md). Every output is in
the Hub schema of the source it stands in for, gzipped JSON lines (or BEIR for retrieval), so the
training scripts read it with exactly the code that reads the Hub. Deterministic: re-running
gives byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import json
import os
import re
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def held_out(key: str, percent: float) -> bool:
    return int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16) % 10_000 < percent * 100


def write_jsonl(path: str, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    print(f"{os.path.relpath(path, HERE)}: {n} rows, {os.path.getsize(path) / 1e6:.2f} MB")


def write_text(path: str, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write("".join(lines).encode("utf-8"))
    print(f"{os.path.relpath(path, HERE)}: {len(lines)} lines, {os.path.getsize(path) / 1e6:.2f} MB")


def webtext(src: str, wikipedia_chars: int = 7_000_000):
    # WikiText-2 raw (Salesforce/wikitext schema: one row per line), split by article. Web text keeps
    # 25% for validation so codebook health is measured on enough windows (~1024 codes).
    lines = open(os.path.join(src, "webtext/wikitext2_raw/wiki.test.raw"), encoding="utf-8").read().splitlines()
    train, val, title = [], [], ""
    for line in lines:
        if re.fullmatch(r" = [^=].* = ", line):
            title = line
        (val if held_out(title, 25) else train).append(line + "\n")
    write_text(os.path.join(HERE, "webtext/wikitext_train.txt.gz"), train)
    write_text(os.path.join(HERE, "webtext/wikitext_validation.txt.gz"), val)
    # C4 realnewslike (allenai/c4 schema: text, timestamp, url).
    docs = json.load(open(os.path.join(src, "webtext/c4_realnewslike/c4_ref_520.json"), encoding="utf-8"))
    rows = [{"text": d["input"] + " " + d["output"], "timestamp": "", "url": f"c4_ref_520#{i}"}
            for i, d in enumerate(docs)]
    write_jsonl(os.path.join(HERE, "webtext/c4_train.jsonl.gz"), [r for r in rows if not held_out(r["url"], 25)])
    write_jsonl(os.path.join(HERE, "webtext/c4_validation.jsonl.gz"), [r for r in rows if held_out(r["url"], 25)])
    # Wikipedia (wikimedia/wikipedia schema: id, url, title, text), pages with a body only.
    pages, budget = [], wikipedia_chars
    for path in sorted(glob.glob(os.path.join(src, "webtext/wikipedia_en/wiki_*.gz"))):
        text = gzip.open(path, "rt", encoding="utf-8").read()
        for m in re.finditer(r'<doc id="(\d+)" url="([^"]*)" title="([^"]*)">\n(.*?)</doc>', text, re.S):
            body = m.group(4).split("\n", 1)[1].strip() if "\n" in m.group(4) else ""
            if len(body) >= 500:
                pages.append({"id": m.group(1), "url": "https://en.wikipedia.org/wiki/" + m.group(2),
                              "title": m.group(3), "text": body})
                budget -= len(body)
        if budget <= 0:
            break
    write_jsonl(os.path.join(HERE, "webtext/wikipedia_train.jsonl.gz"), [p for p in pages if not held_out(p["id"], 25)])
    write_jsonl(os.path.join(HERE, "webtext/wikipedia_validation.jsonl.gz"), [p for p in pages if held_out(p["id"], 25)])


def arxiv_rows(src: str) -> list[dict]:
    """The 2,000 arXiv abstracts: id, title, abstract, whitespace runs made single spaces."""
    with open(os.path.join(src, "academic/arxiv/arxiv_metadata_first2000.csv"), encoding="utf-8", newline="") as f:
        return [{"id": r["id"], "title": " ".join(r["title"].split()), "abstract": " ".join(r["abstract"].split())}
                for r in csv.DictReader(f)]


def pubmedqa_rows(src: str) -> list[dict]:
    """The 1,000 expert-labelled PubMedQA abstracts (joined CONTEXTS) with their question, in the
    ccdv/pubmed-summarization schema (article, abstract); the question rides along for Phase 2."""
    pq = json.load(open(os.path.join(src, "academic/pubmedqa/ori_pqal.json"), encoding="utf-8"))
    return [{"article": "", "abstract": " ".join(v["CONTEXTS"]), "pmid": k, "question": v["QUESTION"]}
            for k, v in pq.items()]


def academic(src: str):
    rows = arxiv_rows(src)
    write_jsonl(os.path.join(HERE, "academic/arxiv_train.jsonl.gz"), [r for r in rows if not held_out(r["id"], 10)])
    write_jsonl(os.path.join(HERE, "academic/arxiv_validation.jsonl.gz"), [r for r in rows if held_out(r["id"], 10)])
    rows = pubmedqa_rows(src)
    write_jsonl(os.path.join(HERE, "academic/pubmed_train.jsonl.gz"), [r for r in rows if not held_out(r["pmid"], 10)])
    write_jsonl(os.path.join(HERE, "academic/pubmed_validation.jsonl.gz"), [r for r in rows if held_out(r["pmid"], 10)])


def conversational(src: str):
    rows = [json.loads(l) for l in gzip.open(os.path.join(src, "conversational/hh_rlhf/harmless-base_test.jsonl.gz"), "rt")]
    write_jsonl(os.path.join(HERE, "conversational/hh_rlhf_train.jsonl.gz"),
                [r for i, r in enumerate(rows) if not held_out(f"hh{i}", 10)])
    write_jsonl(os.path.join(HERE, "conversational/hh_rlhf_validation.jsonl.gz"),
                [r for i, r in enumerate(rows) if held_out(f"hh{i}", 10)])
    # Topical-Chat -> HuggingFaceH4/ultrachat_200k schema (prompt, prompt_id, messages).
    convs = json.load(open(os.path.join(src, "conversational/topical_chat/valid_freq.json"), encoding="utf-8"))
    rows = []
    for cid, c in convs.items():
        msgs = [{"role": "user" if t["agent"] == "agent_1" else "assistant", "content": t["message"].strip()}
                for t in c["content"]]
        rows.append({"prompt": msgs[0]["content"], "prompt_id": cid, "messages": msgs})
    write_jsonl(os.path.join(HERE, "conversational/topical_chat_train.jsonl.gz"),
                [r for r in rows if not held_out(r["prompt_id"], 10)])
    write_jsonl(os.path.join(HERE, "conversational/topical_chat_validation.jsonl.gz"),
                [r for r in rows if held_out(r["prompt_id"], 10)])


def pairs(src: str):
    with zipfile.ZipFile(os.path.join(src, "pairs/squad_v1.1/dev-v1.1.json.zip")) as z:
        name = [n for n in z.namelist() if n.endswith(".json")][0]
        squad = json.loads(z.read(name))
    # rajpurkar/squad plain_text schema (id, title, context, question, answers): one row per question.
    rows = [{"id": qa["id"], "title": art["title"], "context": p["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for art in squad["data"] for p in art["paragraphs"] for qa in p["qas"]]
    write_jsonl(os.path.join(HERE, "pairs/squad_dev.jsonl.gz"), rows)
    med = [json.loads(l) for l in gzip.open(os.path.join(src, "pairs/medquad/medquad_qa_pairs.jsonl.gz"), "rt")]
    med = [{"question": r["question"], "answer": r["answer"], "focus": r["focus"], "source": r["source"]}
           for r in med if held_out(r["qid"], 30) and 100 <= len(r["answer"]) <= 2000]
    write_jsonl(os.path.join(HERE, "pairs/medquad.jsonl.gz"), med)


def retrieval(src: str):
    base = os.path.join(src, "retrieval/cisi/beir_format_derived")
    out = os.path.join(HERE, "retrieval/cisi")
    for name in ("corpus", "queries"):
        write_jsonl(os.path.join(out, f"{name}.jsonl.gz"),
                    [json.loads(l) for l in open(os.path.join(base, f"{name}.jsonl"), encoding="utf-8")])
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(base, "qrels/test.tsv"), encoding="utf-8") as f, \
            open(os.path.join(out, "qrels/test.tsv"), "w", encoding="utf-8") as g:
        g.write(f.read())
    # SciTLDR (CS papers): each paper's first TLDR is a query, its title + abstract the one relevant passage
    docs, queries = {}, {}
    for split in ("train", "dev", "test"):
        for line in open(os.path.join(src, f"academic/scitldr/SciTLDR-A_{split}.jsonl"), encoding="utf-8"):
            r = json.loads(line)
            if r["paper_id"] in docs or not r["target"]:
                continue
            docs[r["paper_id"]] = {"_id": r["paper_id"], "title": r.get("title", ""), "text": " ".join(r["source"])}
            queries[r["paper_id"]] = {"_id": r["paper_id"] + "_q", "text": r["target"][0]}
    write_beir(os.path.join(HERE, "retrieval/scitldr"), docs.values(), queries.values(),
               [(q["_id"], d) for d, q in queries.items()])
    # MedQuAD pairs outside the Phase 2 sample (pairs/medquad.jsonl.gz): no question or answer text of that
    # sample, answers of 100-2000 characters; 2,000 distinct answers (lowest hash) as passages, each of their
    # questions a query judged against that answer alone
    med = [json.loads(l) for l in gzip.open(os.path.join(src, "pairs/medquad/medquad_qa_pairs.jsonl.gz"), "rt")]
    used = {r[k].strip() for r in med if held_out(r["qid"], 30) for k in ("question", "answer")}
    by_answer: dict[str, list] = {}
    for r in med:
        a, q = r["answer"].strip(), r["question"].strip()
        if not held_out(r["qid"], 30) and 100 <= len(a) <= 2000 and a not in used and q not in used:
            by_answer.setdefault(a, []).append(q)
    key = lambda a: hashlib.blake2b(a.encode(), digest_size=8).hexdigest()
    answers = sorted(by_answer, key=key)[:2000]
    docs = [{"_id": f"m{key(a)}", "text": a} for a in answers]
    queries, qrels = [], []
    for d, a in zip(docs, answers):
        for j, q in enumerate(sorted(set(by_answer[a]))):
            queries.append({"_id": f"{d['_id']}_q{j}", "text": q})
            qrels.append((queries[-1]["_id"], d["_id"]))
    write_beir(os.path.join(HERE, "retrieval/medquad"), docs, queries, qrels)
    # Two check sets over academic/'s texts, which Phase 1b trains on (and Phase 2 on ~90% of PubMedQA's
    # question-abstract pairs: not held out): each PubMedQA expert question against the 1,000 abstracts, each
    # arXiv title against the 2,000 abstracts
    pq = pubmedqa_rows(src)
    write_beir(os.path.join(HERE, "retrieval/pubmedqa"),
               [{"_id": f"d{r['pmid']}", "title": "", "text": r["abstract"]} for r in pq],
               [{"_id": f"q{r['pmid']}", "text": r["question"]} for r in pq],
               [(f"q{r['pmid']}", f"d{r['pmid']}") for r in pq])
    rows = arxiv_rows(src)
    write_beir(os.path.join(HERE, "retrieval/arxiv_titles"),
               [{"_id": f"d{i}", "title": "", "text": r["abstract"]} for i, r in enumerate(rows)],
               [{"_id": f"q{i}", "text": r["title"]} for i, r in enumerate(rows)],
               [(f"q{i}", f"d{i}") for i in range(len(rows))])


def write_beir(out: str, docs, queries, qrels):
    write_jsonl(os.path.join(out, "corpus.jsonl.gz"), docs)
    write_jsonl(os.path.join(out, "queries.jsonl.gz"), queries)
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(out, "qrels/test.tsv"), "w", encoding="utf-8") as g:
        g.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--wikipedia_chars", type=int, default=7_000_000,
                    help="Wikipedia page text to read before the split (the bundle: 7,000,000 characters; 21,000,000 "
                         "gave the README's \"Measured, not adopted: three times the Wikipedia\")")
    args = ap.parse_args()
    if not os.path.isdir(args.src):
        raise SystemExit(f"error: source folder {args.src} not found; pass --src PATH_TO/shared/data")
    webtext(args.src, args.wikipedia_chars)
    for step in (academic, conversational, pairs, retrieval):
        step(args.src)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(HERE) for f in fs)
    print(f"data/ total: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
