"""The whole pipeline on the bundled samples, on CPU, offline: Phase 1a -> 1b -> 2 -> filter eval.

    python run_demo.py                      # writes runs/demo/, ~12 minutes cold on a 2-core CPU
    python run_demo.py --preset cpu         # the longer CPU recipe: writes runs/cpu/ (README "The CPU recipe")
    python run_demo.py --run_dir runs/x --quick     # a shortened chain (what the tests run)

Ends with a summary table of each phase's key metrics and the path of the recall plot.
A second run reuses the teacher-embedding cache and is much faster.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import eval_filter  # noqa: E402
import vqvae_phase1_train as p1  # noqa: E402
import vqvae_phase1b_train_lora as p1b  # noqa: E402
import vqvae_phase2_train_adapters as p2  # noqa: E402
from train_common import parse_config  # noqa: E402

QUICK = {"p1": ["--max_steps", "40", "--vq_warmup_steps", "10", "--eval_every", "20", "--train_windows", "400",
                "--kmeans_samples", "600", "--eval_size", "100", "--health_size", "400", "--lexicon_size", "500",
                "--lexicon_teacher_words", "false", "--lexicon_domain_words", "200", "--lexicon_steps", "10",
                "--bag_steps", "20"],
         "p1b": ["--max_steps", "10", "--eval_every", "10", "--train_windows", "160", "--eval_size", "64",
                 "--health_size", "400"],
         "p2": ["--max_steps", "20", "--eval_every", "10", "--train_pairs", "400", "--eval_size", "128",
                "--pair_groups", "6"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=("demo", "cpu"),
                    help="demo: minutes; cpu: the longer CPU recipe (README 'The CPU recipe')")
    ap.add_argument("--run_dir", default="", help="default: runs/<preset>")
    ap.add_argument("--quick", action="store_true", help="shortened chain, for tests")
    ap.add_argument("--teacher_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae", "teacher"))
    ap.add_argument("--model2vec_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae"),
                    help="where the distilled Model2Vec peer is kept (distilled once, ~15-80 s)")
    args = ap.parse_args(argv)
    d, t0 = args.run_dir or os.path.join("runs", args.preset), time.time()
    common = ["--teacher_cache", args.teacher_cache, "--wandb_mode", "disabled", "--overwrite"]  # says so when it does
    ck1, ck1b, ck2 = (os.path.join(d, n) for n in ("kmer_vqvae_phase1.pt", "kmer_vqvae_phase1b_lora.pt",
                                                   "kmer_vqvae_phase2_aligned.pt"))
    extra = QUICK if args.quick else {"p1": [], "p1b": [], "p2": []}

    print("== Phase 1a: distil the teacher through a vector-quantised bottleneck (web text)", flush=True)
    r1 = p1.main(parse_config(p1.Phase1Config, p1.PRESETS,
                              ["--preset", args.preset, "--output", ck1, *common, *extra["p1"]]))
    print("== Phase 1b: LoRA on Q,V for academic + conversational text", flush=True)
    r1b = p1b.main(parse_config(p1b.Phase1bConfig, p1b.PRESETS, ["--preset", args.preset, "--phase1a_checkpoint", ck1,
                                                                  "--output", ck1b, *common, *extra["p1b"]]))
    print("== Phase 2: query/passage adapters (InfoNCE)", flush=True)
    r2 = p2.main(parse_config(p2.Phase2Config, p2.PRESETS, ["--preset", args.preset, "--checkpoint", ck1b,
                                                             "--output", ck2, *common, *extra["p2"]]))
    evals = {}
    for name in ("cisi",) if args.quick else ("squad", "cisi"):
        print(f"== Filter evaluation on {'the SQuAD dev evaluation half' if name == 'squad' else 'CISI (BEIR)'}",
              flush=True)
        evals[name] = eval_filter.main(["--checkpoint", ck2, "--dataset", name, "--teacher_cache", args.teacher_cache,
                                        "--model2vec_cache", args.model2vec_cache])
    minutes = (time.time() - t0) / 60
    print(summary(r1, r1b, r2, evals, minutes, "demo" if args.preset == "demo" else "CPU recipe"))
    return {"p1": r1, "p1b": r1b, "p2": r2, "eval": evals, "minutes": minutes}


FILTER_ROWS = (("kmer_vqvae", "k-mer VQ-VAE, the model's own codes"),
               ("kmer_vqvae_ivf", "k-mer VQ-VAE vectors + IVF fitted to the corpus"),
               ("model2vec_ivf", "Model2Vec (same teacher) + IVF"),
               ("kmer_vqvae_ivf_centred", "k-mer VQ-VAE vectors + IVF, corpus mean subtracted"),
               ("model2vec_ivf_centred", "Model2Vec + IVF, corpus mean subtracted"),
               ("kmer_vqvae_ivf_whitened", "k-mer VQ-VAE vectors + IVF, centred and half-whitened"),
               ("model2vec_ivf_whitened", "Model2Vec + IVF, centred and half-whitened"),
               ("kmer_vqvae_ivf_lexical", "k-mer VQ-VAE vectors, half-whitened, + lexical part, IVF (kmer_index.py)"),
               ("model2vec_ivf_lexical", "Model2Vec, half-whitened, + the same lexical part, IVF"),
               ("lexical_ivf", "the lexical part alone + IVF"),
               ("ivf_teacher", "IVF on the teacher"),
               ("exact_teacher", "exact teacher top-k"), ("random", "random codes"))


def filter_table(evals: dict) -> list[str]:
    """Recall at 1% / 5% of each corpus, one row per method, the same lists count for all."""
    names = list(evals)
    lines = ["| method | " + " | ".join(f"{n} R@1% / R@5%" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in FILTER_ROWS:
        cells = []
        for n in names:
            r = evals[n]["methods"].get(key)
            cells.append(f"{r['recall_at_fraction']['0.01']:.3f} / {r['recall_at_fraction']['0.05']:.3f}" if r else "-")
        k = evals[names[0]]["methods"].get(key, {}).get("codes")
        lines.append(f"| {label}{f' ({k} lists)' if k and key not in ('random',) else ''} | " + " | ".join(cells) + " |")
    for n in names:
        sp = evals[n]["passages_per_s"]
        lines.append(f"{n}: passages/s k-mer {sp['kmer_vqvae']:.0f}, teacher {sp['teacher']:.0f}"
                     f"{' (' + sp['teacher_precision'] + ')' if 'teacher_precision' in sp else ''} "
                     f"({sp['ratio']:.1f}x the teacher)" + (f", Model2Vec {sp['model2vec']:.0f} "
                                                             f"({sp['ratio_vs_model2vec']:.2f}x Model2Vec)"
                                                             if "model2vec" in sp else ""))
    return lines


def summary(r1, r1b, r2, evals, minutes, name: str = "demo") -> str:
    m1, m1b, m2 = r1["metrics"], r1b["metrics"], r2["metrics"]
    h1 = r1.get("health", [])
    b1b = r1b["before"]
    lines = [
        "", "=" * 78, f"{name} finished in {minutes:.1f} min", "",
        "| phase | metric | value |", "|---|---|---|",
        f"| 1a | held-out teacher cosine, quantised / continuous | {m1['cos_q']:.3f} / {m1['cos_e']:.3f} |",
        f"| 1a | mean-embedding baseline cosine | {m1['cos_mean_baseline']:.3f} |",
        f"| 1a | code perplexity / utilisation / dead ({m1['n']} held-out windows) | "
        f"{m1['perplexity']:.0f} / {m1['utilisation']:.1%} / {m1['dead_codes']} |",
        f"| 1a | lowest perplexity / utilisation over its {len(h1)} eval{'s' if len(h1) != 1 else ''} after the "
        "k-means init | "
        + (f"{min(h[1] for h in h1):.0f} / {min(h[2] for h in h1):.1%} |" if h1 else "none |"),
        f"| 1b | domain cosine (q) before -> after | {b1b['domain_cos_q']:.3f} -> {m1b['domain_cos_q']:.3f} |",
        f"| 1b | web cosine (q) before -> after | {b1b['web_cos_q']:.3f} -> {m1b['web_cos_q']:.3f} |",
        f"| 1b | domain code perplexity / utilisation before -> after ({m1b['domain_n']} windows) | "
        f"{b1b['domain_perplexity']:.0f} / {b1b['domain_utilisation']:.1%} -> "
        f"{m1b['domain_perplexity']:.0f} / {m1b['domain_utilisation']:.1%} |",
        f"| 1b | web code perplexity / utilisation before -> after ({m1b['web_n']} windows) | "
        f"{b1b['web_perplexity']:.0f} / {b1b['web_utilisation']:.1%} -> "
        f"{m1b['web_perplexity']:.0f} / {m1b['web_utilisation']:.1%} |",
        f"| 1b | LoRA parameters / share of total | {r1b['trainable_params']:,} / "
        f"{r1b['trainable_params'] / r1b['total_params']:.2%} |",
        f"| 2 | q2p / p2q accuracy (eval batch {m2['eval_batch_size']}) | {m2['q2p_acc']:.3f} / {m2['p2q_acc']:.3f} |",
        f"| 2 | teacher q2p / p2q on the same batches | {m2['teacher_q2p_acc']:.3f} / {m2['teacher_p2q_acc']:.3f} |",
        f"| 2 | code match rate / positive similarity | {m2['code_match_rate']:.3f} / {m2['pos_similarity']:.3f} |",
        "", "Filter: recall of the relevant passages at 1% / 5% of the corpus kept", "", *filter_table(evals),
        "", f"checkpoints: {r1['output']}, {r1b['output']}, {r2['output']}",
        "recall plots: " + ", ".join(ev["png"] for ev in evals.values()), "=" * 78]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
