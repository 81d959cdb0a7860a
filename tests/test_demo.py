"""The README's demo, shortened: the same chain (1a -> 1b -> 2 -> CISI filter eval) on the samples."""
import json
import os

import run_demo


def test_quick_demo_chain(tmp_path, teacher_cache_dir, capsys):
    r = run_demo.main(["--quick", "--run_dir", str(tmp_path), "--teacher_cache", teacher_cache_dir])
    for name in ("kmer_vqvae_phase1.pt", "kmer_vqvae_phase1b_lora.pt", "kmer_vqvae_phase2_aligned.pt",
                 "cisi_filter_eval.json", "cisi_filter_eval.png"):
        assert os.path.isfile(tmp_path / name), name
    report = json.load(open(tmp_path / "cisi_filter_eval.json"))
    methods = report["methods"]
    # the anchors bracket the problem: exact teacher >= IVF on teacher > random codes
    assert methods["exact_teacher"]["recall_at_fraction"]["0.05"] >= methods["ivf_teacher"]["recall_at_fraction"]["0.05"]
    assert methods["ivf_teacher"]["recall_at_fraction"]["0.05"] > methods["random"]["recall_at_fraction"]["0.05"]
    out = capsys.readouterr().out
    assert "demo finished" in out and "recall plot:" in out
    assert r["p2"]["metrics"]["eval_batch_size"] == 64
    # Phase 1a reports codebook health at each eval after the k-means init (steps 20 and 40 here)
    assert [h[0] for h in r["p1"]["health"]] == [20, 40]
    assert "lowest perplexity / utilisation over its 2 evals after the k-means init" in out
