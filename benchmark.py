"""Speed against the teacher, measured in one run on the same texts and threads. Not a test.

    python benchmark.py                                   # CPU, default config (untrained weights)
    python benchmark.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt
    python benchmark.py --device cuda --compile           # bf16 autocast on CUDA, optionally compiled
    python benchmark.py --checkpoint runs/demo/kmer_vqvae_phase2_aligned.pt --index_lists 512,1024,4096

Prints a markdown table: tokenizer (k-mer vs the teacher's WordPiece), encoding of ~40-character
queries and ~400-character passages (vs SentenceTransformer.encode; also with int8 dynamic
quantisation on CPU and, for bag-path models, with the weighted bag alone), and training k-mers/s and
peak memory for one step shape of each phase. Speed does not depend on trained weights, so an
untrained default-config model measures the same as a trained one.

With --index_lists (and a checkpoint): builds an index (`kmer_index.py build`) over SQuAD dev's passages and
--index_distractors bundled web passages at each number of lists, in a temporary folder, and times what a
query costs once its vector is known (scoring every list, a whole 1% search, its words alone), one query at a
time and in a batch, against the teacher and the k-mer model embedding one query at a time in the same run.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import sys
import time

import torch

import train_common as tc
from lora_adapters import QueryPassageAdapters, inject_lora
from teacher import PRECISIONS, Teacher, native_bf16
from vqvae_phase1_model import KmerFilter, KmerVQVAE, load_pretrained


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def squad_rows() -> list[dict]:
    """The bundled SQuAD dev rows (title, context, question)."""
    return [json.loads(l) for l in gzip.open(os.path.join(tc.REPO, "data", "pairs", "squad_dev.jsonl.gz"), "rt")]


def texts(n: int):
    rows = squad_rows()
    queries = [r["question"] for r in rows][:n]
    passages = []
    for c in dict.fromkeys(r["context"] for r in rows):
        if len(c) >= 400:
            passages.append(c[:c.rfind(" ", 0, 400)])
        if len(passages) == n:
            break
    return queries, passages


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def train_step_rate(model, params, step, batch, device, repeats, after=None, sparse_tables=()) -> tuple[float, float]:
    """k-mers/s of one phase's training step shape (plus `after()`, run after the optimizer step),
    and peak memory after it."""
    opt = tc.adamw(params, sparse_tables=sparse_tables, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run():
        with tc.autocast(device):
            loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()
    sec = timed(run, repeats)
    return int(batch["attention_mask"].sum()) / sec, peak_memory_mb(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="measure this model (default: default config, untrained)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--n", type=int, default=256, help="texts per measurement")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the k-mer encoder")
    ap.add_argument("--output", default="", help="also write the numbers as JSON here")
    ap.add_argument("--teacher", default="", help="teacher path or Hub name (default: as the training scripts)")
    ap.add_argument("--teacher_precision", default="auto", choices=PRECISIONS,
                    help="as the scripts: auto = bf16 where the hardware has it (README 'Adopted: a bf16 teacher')")
    ap.add_argument("--index_lists", default="", help="comma-separated numbers of lists: also time a query's list "
                    "picking in indexes built with each (needs --checkpoint; README 'Index a corpus and query it')")
    ap.add_argument("--index_distractors", type=int, default=19000,
                    help="bundled web passages added to SQuAD dev's 2,067 passages for --index_lists")
    ap.add_argument("--index_encoder", default="bag", choices=("full", "bag"),
                    help="the index's passage encoder (`build --encoder`); list picking costs the same either way")
    ap.add_argument("--index_queries", type=int, default=100, help="queries timed one at a time for --index_lists")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        lists = parse_lists(args.index_lists)
        if lists and not args.checkpoint:
            raise tc.UserError("--index_lists needs --checkpoint: an index is built by a trained model's checkpoint")
        device = tc.pick_device(args.device)
    except tc.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    f = load_pretrained(args.checkpoint) if args.checkpoint else KmerFilter(KmerVQVAE())
    f.model.to(device)
    if args.compile:
        f.model.encoder = torch.compile(f.model.encoder)
    teacher = Teacher.load(args.teacher, device=str(device), cache_dir=None, batch_size=args.batch_size,
                           precision=args.teacher_precision)
    queries, passages = texts(args.n)
    rows = []

    # 1. tokenizers
    tok = f.tokenizer
    n_kmers = int(tok(passages)["attention_mask"].sum())
    t_k = timed(lambda: tok(passages), args.repeats)
    t_w = timed(lambda: teacher.model.tokenizer(passages, truncation=True, max_length=256, padding=True), args.repeats)
    rows.append(("tokenizer, ~400-char passages", len(passages) / t_k, len(passages) / t_w, f"{n_kmers / t_k:,.0f} k-mers/s"))

    # 2. encoding, and the inference variants (int8 dynamic quantisation on CPU, the bag alone)
    variants = [("", f)]
    if device.type == "cpu":
        variants.append((", int8 Linear layers", f.inference_variant(int8=True)))
        if native_bf16("cpu"):  # the student under the same bf16 autocast as the teacher (speed only)
            variants.append((", bf16 autocast", f.inference_variant(bf16=True)))
    if f.model.config.bag_path:
        variants.append((", bag only (no blocks)", f.inference_variant(bag_only=True)))
        if device.type == "cpu":
            variants.append((", bag only + int8", f.inference_variant(int8=True, bag_only=True)))
            if native_bf16("cpu"):  # what `kmer_index.py build --encoder bag` does here by default
                variants.append((", bag only + bf16 autocast", f.inference_variant(bag_only=True, bf16=True)))
    for name, items in (("encode ~40-char queries", queries), ("encode ~400-char passages", passages)):
        t_t = timed(lambda: teacher.encode_uncached(items), args.repeats)
        for suffix, g in variants:
            t_s = timed(lambda: g.encode(items, batch_size=args.batch_size), args.repeats)
            rows.append((name + suffix, len(items) / t_s, len(items) / t_t, ""))

    # 3. training step shapes (k-mers/s, peak memory), default config unless a checkpoint is given
    cfg = f.model.config_dict()
    b = tok.encode_windows([w for p in passages for w in tok.split_windows(p)][:args.batch_size])
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    target = torch.nn.functional.normalize(torch.randn(ids.shape[0], cfg["teacher_dim"], device=device), dim=-1)
    m1 = KmerVQVAE(**cfg).to(device).train()
    m1.quantizer.initialized.fill_(True)
    rate, mem = train_step_rate(m1, list(m1.parameters()), lambda: m1(ids, mask, teacher=target)["loss"], b, device,
                                args.repeats)
    train = [("phase 1a (full model)", rate, mem)]
    # what vqvae_phase1_train.py does by default after each step: update the weight average, then
    # feed the codebook the batch encoded by the averaged weights (--weight_average, README)
    avg = tc.WeightAverage(m1, 0.98)
    m1.quantizer.track_batch = False

    def codebook_pass():
        avg.update()
        with avg.applied(), torch.no_grad(), tc.autocast(device):
            m1.quantizer.observe(m1.encode_windows(ids, mask).float())
    rate, mem = train_step_rate(m1, list(m1.parameters()), lambda: m1(ids, mask, teacher=target)["loss"], b, device,
                                args.repeats, after=codebook_pass)
    train.append(("phase 1a + weight average and codebook pass (script default)", rate, mem))
    # the same with the k-mer tables' sparse gradients and lazy AdamW (--sparse_embeddings; CPU presets)
    m1s = KmerVQVAE(**cfg).to(device).train()
    m1s.quantizer.initialized.fill_(True)
    rate, mem = train_step_rate(m1s, list(m1s.parameters()), lambda: m1s(ids, mask, teacher=target)["loss"], b,
                                device, args.repeats, sparse_tables=m1s.encoder.kmer_tables())
    train.append(("phase 1a (full model), sparse k-mer tables (--sparse_embeddings)", rate, mem))
    m1.quantizer.track_batch = True
    inject_lora(m1, rank=8, alpha=16)
    m1.quantizer.set_mode("frozen")
    rate, mem = train_step_rate(m1, [p for p in m1.parameters() if p.requires_grad],
                                lambda: m1(ids, mask, teacher=target)["loss"], b, device, args.repeats)
    train.append(("phase 1b (LoRA)", rate, mem))
    m2 = KmerVQVAE(**cfg).to(device).eval()
    ad = QueryPassageAdapters(d_model=cfg["d_model"]).to(device)

    def p2_step():
        with torch.no_grad():
            z = m2.encode_windows(ids, mask)
        return -torch.nn.functional.cosine_similarity(ad(z, "query"), ad(z, "passage")).mean()
    rate, mem = train_step_rate(m2, list(ad.parameters()), p2_step, b, device, args.repeats)
    train.append(("phase 2 (adapters, base frozen)", rate, mem))

    # 4. report
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\nbenchmark on {dev}; teacher {teacher.precision}; {len(passages)} passages, {len(queries)} queries; "
          f"batch {args.batch_size}; "
          f"model d_model={cfg['d_model']} layers={cfg['n_layers']} kmer_pool={cfg['kmer_pool']}")
    print("\n| what | k-mer VQ-VAE texts/s | teacher texts/s | ratio | note |\n|---|---|---|---|---|")
    for name, s, t, note in rows:
        print(f"| {name} | {s:,.0f} | {t:,.0f} | {s / t:.1f}x | {note} |")
    print("\n| training step | k-mers/s | peak memory (MB) |\n|---|---|---|")
    for name, rate, mem in train:
        print(f"| {name} | {rate:,.0f} | {mem:,.0f} |")
    rate_1a = train[0][1]
    print(f"\nprojection: Phase 1a at 200M k-mers takes {200e6 / rate_1a / 3600:.1f} h at {rate_1a:,.0f} k-mers/s "
          f"on this device (teacher targets cached; batch {args.batch_size})")
    index_rows = index_costs(args, lists, f, teacher) if lists else []
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"device": dev, "teacher_precision": teacher.precision, "encode": rows, "train": train,
                       "index": index_rows}, fh, indent=2)


def parse_lists(spec: str) -> list[int]:
    """"512,1024" -> [512, 1024]; one error line for anything else."""
    try:
        lists = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        lists = [0]
    if any(k < 2 for k in lists):
        raise tc.UserError(f"--index_lists {spec!r}: give numbers of lists of at least 2, comma-separated (512,1024)")
    return lists


def per_query_ms(fn, items: list, n: int) -> float:
    """Median over `n` items of fn(one item), in ms, after one warm-up call."""
    fn(items[:1])
    times = []
    for i in range(min(n, len(items))):
        t0 = time.perf_counter()
        fn(items[i:i + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def index_costs(args, lists: list[int], f, teacher) -> list[dict]:
    """Build an index over SQuAD dev's passages + bundled web passages at each number of lists (temporary
    folder) and time a query's list picking once its vector is known, beside the teacher and the k-mer model
    embedding one query, all in this run."""
    import tempfile

    import eval_filter
    import kmer_index
    rows = squad_rows()
    docs = list(dict.fromkeys(r["context"] for r in rows))
    docs += eval_filter.web_distractors(args.index_distractors, {r["title"] for r in rows})
    queries = [r["question"] for r in rows][:max(args.index_queries, args.n)]
    n = args.index_queries
    teacher_ms = per_query_ms(teacher.encode_uncached, queries, n)
    kmer_ms = per_query_ms(lambda q: kmer_index.encode_vectors(f, q, "query"), queries, n)
    qv = kmer_index.encode_vectors(f, queries, "query")
    out = []
    with tempfile.TemporaryDirectory(prefix="kmer_bench_") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w") as fh:
            for i, t in enumerate(docs):
                fh.write(json.dumps({"_id": str(i), "text": t}) + "\n")
        for K in lists:
            folder = os.path.join(tmp, f"index{K}")
            t0 = time.perf_counter()
            kmer_index.main(["build", "--checkpoint", args.checkpoint, "--corpus", corpus, "--index", folder,
                             "--num_lists", str(K), "--encoder", args.index_encoder])
            build_s = time.perf_counter() - t0
            index = kmer_index.Index.load(folder)
            words = index.word_lists[1] if index.word_lists is not None else None
            t0 = time.perf_counter()
            index.list_scores(qv[:1], queries[:1], query=True)  # the first query transposes the lists' words
            first_ms = (time.perf_counter() - t0) * 1e3
            score_ms = per_query_ms(lambda i: index.list_scores(qv[i], [queries[j] for j in i], query=True),
                                    list(range(len(queries))), n)
            search_ms = per_query_ms(lambda i: index.search(qv[i], budget=0.01, texts=[queries[j] for j in i]),
                                     list(range(len(queries))), n)
            t0 = time.perf_counter()
            index.list_scores(qv, queries, query=True)
            batch_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
            words_ms = per_query_ms(index.lexical.encode_sparse, queries, n) if index.lexical is not None else 0.0
            out.append({"lists": K, "passages": len(docs), "build_s": build_s,
                        "list_terms": int(words.nnz) if words is not None else 0,
                        "first_query_ms": first_ms, "score_ms": score_ms, "search_1pct_ms": search_ms,
                        "batch_score_ms": batch_ms, "query_words_ms": words_ms})
    print(f"\nindex: {len(docs):,} passages (SQuAD dev + {args.index_distractors:,} web), `build --encoder "
          f"{args.index_encoder}`; per query, one at a time (median of {n}), the query's vector given; "
          f"embedding one query: teacher {teacher_ms:.2f} ms, k-mer model {kmer_ms:.2f} ms")
    print("\n| lists | build (s) | list terms | score every list (ms) | 1% search (ms) | batched, per query (ms) "
          "| the query's words (ms) | first query (ms) | 1% search / teacher query |\n|---|---|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['lists']:,} | {r['build_s']:.0f} | {r['list_terms'] / 1e6:.1f} M | {r['score_ms']:.2f} | "
              f"{r['search_1pct_ms']:.2f} | {r['batch_score_ms']:.2f} | {r['query_words_ms']:.3f} | "
              f"{r['first_query_ms']:.0f} | {r['search_1pct_ms'] / teacher_ms:.3f}x |")
    for r in out:
        r.update(teacher_query_ms=teacher_ms, kmer_query_ms=kmer_ms)
    return out


if __name__ == "__main__":
    main()
