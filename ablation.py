"""Tokenizer/encoder geometry ablation through the pipeline (Phase 1a -> Phase 2 -> filter eval).

    python ablation.py                          # three geometries, demo presets, CISI + SQuAD, ~30 min CPU
    python ablation.py --variants s1_pool4,s4_nopool --datasets cisi

Every variant gets the same encoder compute: the same steps, batch and 64 transformer positions
per window; what differs is how much text a window covers and how many k-mers it hashes. Phase
1b is skipped to keep the CPU budget (it does not change geometry). Prints a table of filter recall
at 1% and 5% of the corpus and passage-encoding throughput relative to the teacher (measured in
the same eval run), and writes runs/ablation/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import eval_filter  # noqa: E402
import vqvae_phase1_train as p1  # noqa: E402
import vqvae_phase2_train_adapters as p2  # noqa: E402
from train_common import parse_config  # noqa: E402

VARIANTS = {
    "s1_pool4": ["--kmer_stride", "1", "--kmer_pool", "4"],   # 256 k-mers -> 64 positions, ~259 characters
    "s1_nopool": ["--kmer_stride", "1", "--kmer_pool", "1"],  # 64 k-mers, ~67 characters
    "s4_nopool": ["--kmer_stride", "4", "--kmer_pool", "1"],  # 64 non-overlapping k-mers, ~259 characters
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--datasets", default="cisi,squad")
    ap.add_argument("--run_dir", default="runs/ablation")
    ap.add_argument("--teacher_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae", "teacher"))
    args = ap.parse_args(argv)
    common = ["--teacher_cache", args.teacher_cache, "--overwrite"]  # a rerun replaces its own runs, saying so
    results = {}
    for name in args.variants.split(","):
        d = os.path.join(args.run_dir, name)
        ck1, ck2 = os.path.join(d, "kmer_vqvae_phase1.pt"), os.path.join(d, "kmer_vqvae_phase2_aligned.pt")
        r1 = p1.main(parse_config(p1.Phase1Config, p1.PRESETS, ["--preset", "demo", "--output", ck1, *common,
                                                                 *VARIANTS[name]]))
        r2 = p2.main(parse_config(p2.Phase2Config, p2.PRESETS, ["--preset", "demo", "--checkpoint", ck1,
                                                                 "--output", ck2, *common]))
        row = {"phase1a": {k: r1["metrics"][k] for k in ("cos_q", "cos_e", "perplexity", "utilisation")},
               "phase2": {k: r2["metrics"][k] for k in ("q2p_acc", "code_match_rate", "pos_similarity")}}
        for ds in args.datasets.split(","):
            ev = eval_filter.main(["--checkpoint", ck2, "--dataset", ds, "--teacher_cache", args.teacher_cache])
            rk = ev["methods"]["kmer_vqvae"]["recall_at_fraction"]
            row[ds] = {"recall@1%": rk["0.01"], "recall@5%": rk["0.05"],
                       "ivf_teacher@1%": ev["methods"]["ivf_teacher"]["recall_at_fraction"]["0.01"],
                       "ivf_teacher@5%": ev["methods"]["ivf_teacher"]["recall_at_fraction"]["0.05"],
                       "passages_per_s_ratio": ev["passages_per_s"]["ratio"]}
        results[name] = row
    os.makedirs(args.run_dir, exist_ok=True)
    with open(os.path.join(args.run_dir, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))


def table(results: dict) -> str:
    datasets = [k for k in next(iter(results.values())) if k not in ("phase1a", "phase2")]
    head = "| geometry | 1a cos (q/e) | 1a ppl | " + " | ".join(
        f"{d} R@1% | {d} R@5% | {d} passages/s vs teacher" for d in datasets) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(datasets))]
    for name, r in results.items():
        cells = [f"{r['phase1a']['cos_q']:.3f}/{r['phase1a']['cos_e']:.3f}", f"{r['phase1a']['perplexity']:.0f}"]
        for d in datasets:
            cells += [f"{r[d]['recall@1%']:.3f}", f"{r[d]['recall@5%']:.3f}", f"{r[d]['passages_per_s_ratio']:.1f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    anchors = next(iter(results.values()))
    lines.append("IVF on teacher (same runs): " + ", ".join(
        f"{d} R@1% {anchors[d]['ivf_teacher@1%']:.3f}, R@5% {anchors[d]['ivf_teacher@5%']:.3f}" for d in datasets))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
