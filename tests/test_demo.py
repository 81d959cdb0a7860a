"""The README's demo, shortened: the same chain (1a -> 1b -> 2 -> CISI filter eval) on the samples."""
import json
import os

import numpy as np

import run_demo


def test_quick_demo_chain(tmp_path, teacher_cache_dir, capsys):
    r = run_demo.main(["--quick", "--run_dir", str(tmp_path), "--teacher_cache", teacher_cache_dir,
                       "--model2vec_cache", os.path.join(teacher_cache_dir, "m2v")])
    for name in ("kmer_vqvae_phase1.pt", "kmer_vqvae_phase1b_lora.pt", "kmer_vqvae_phase2_aligned.pt",
                 "kmer_vqvae_phase2_aligned_cisi_filter_eval.json", "kmer_vqvae_phase2_aligned_cisi_filter_eval.png"):
        assert os.path.isfile(tmp_path / name), name
    report = json.load(open(tmp_path / "kmer_vqvae_phase2_aligned_cisi_filter_eval.json"))
    methods = report["methods"]
    # the anchors bracket the problem: exact teacher >= IVF on teacher > random codes
    assert methods["exact_teacher"]["recall_at_fraction"]["0.05"] >= methods["ivf_teacher"]["recall_at_fraction"]["0.05"]
    assert methods["ivf_teacher"]["recall_at_fraction"]["0.05"] > methods["random"]["recall_at_fraction"]["0.05"]
    out = capsys.readouterr().out
    assert "demo finished" in out and "recall plots:" in out
    # the peer and the diagnostics are in the same report, measured on the same queries
    assert {"model2vec_ivf", "kmer_vqvae_ivf", "diag_exact_own_vectors", "diag_teacher_q_x_own_p"} <= set(methods)
    assert methods["model2vec_ivf"]["codes"] == methods["kmer_vqvae"]["codes"]  # same number of lists
    assert report["passages_per_s"]["model2vec"] > 0 and "Model2Vec" in out
    # Model2Vec is a real encoder: far above random codes on CISI at 5%
    assert methods["model2vec_ivf"]["recall_at_fraction"]["0.05"] > 2 * methods["random"]["recall_at_fraction"]["0.05"]
    assert r["p2"]["metrics"]["eval_batch_size"] == 64
    # Phase 1a reports codebook health at each eval after the k-means init (steps 20 and 40 here)
    assert [h[0] for h in r["p1"]["health"]] == [20, 40]
    assert "lowest perplexity / utilisation over its 2 evals after the k-means init" in out
    # the general-codebook ceiling row: the teacher's vectors through a codebook fitted on web text
    import eval_filter
    g = eval_filter.main(["--checkpoint", str(tmp_path / "kmer_vqvae_phase2_aligned.pt"), "--dataset", "cisi",
                          "--teacher_cache", teacher_cache_dir, "--no_model2vec", "--general_windows", "40",
                          "--output_dir", str(tmp_path / "general")])["methods"]["diag_teacher_general_codes"]
    assert g["windows"] == 40 and g["codes"] == min(40, methods["kmer_vqvae"]["codes"])
    kept, recall = [r["fraction_kept"] for r in g["n_probe"]], [r["recall"] for r in g["n_probe"]]
    assert kept == sorted(kept) and recall == sorted(recall) and 0 < kept[-1] <= 1  # more probes keep more
    assert 0 <= g["recall_at_fraction"]["0.01"] <= g["recall_at_fraction"]["0.05"] <= 1
    # --num_lists: every corpus-fitted IVF (and the random codes) at another list count; own codes keep the codebook
    rep = eval_filter.main(["--checkpoint", str(tmp_path / "kmer_vqvae_phase2_aligned.pt"), "--dataset", "cisi",
                            "--teacher_cache", teacher_cache_dir, "--no_model2vec", "--num_lists", "8",
                            "--output_dir", str(tmp_path / "lists")])
    m = rep["methods"]
    assert rep["lists"] == 8 and rep["json"].endswith("kmer_vqvae_phase2_aligned_lists8_cisi_filter_eval.json")
    assert m["kmer_vqvae"]["codes"] == methods["kmer_vqvae"]["codes"] != 8
    assert {m[k]["codes"] for k in ("ivf_teacher", "kmer_vqvae_ivf", "kmer_vqvae_ivf_centred", "random")} == {8}
    # --list_seeds 2: each corpus IVF row is the mean of the --seed 0 and --seed 1 draws, query by query
    common = ["--checkpoint", str(tmp_path / "kmer_vqvae_phase2_aligned.pt"), "--dataset", "cisi",
              "--teacher_cache", teacher_cache_dir, "--no_model2vec", "--num_lists", "8"]
    one = eval_filter.main(common + ["--seed", "1", "--output_dir", str(tmp_path / "seed1")])["methods"]
    two = eval_filter.main(common + ["--list_seeds", "2", "--output_dir", str(tmp_path / "seeds")])
    assert two["list_seeds"] == 2 and two["json"].endswith("_lists8_seeds2_cisi_filter_eval.json")
    moved = 0
    for k in ("ivf_teacher", "kmer_vqvae_ivf", "kmer_vqvae_ivf_centred", "kmer_vqvae_ivf_whitened"):
        a, b, ab = m[k], one[k], two["methods"][k]
        assert ab["per_seed"] == [a["recall_at_fraction"], b["recall_at_fraction"]]
        for f in ("0.01", "0.05"):
            assert abs(ab["recall_at_fraction"][f] - (a["recall_at_fraction"][f] + b["recall_at_fraction"][f]) / 2) < 1e-9
            assert np.allclose(ab["per_query"][f], (np.array(a["per_query"][f]) + np.array(b["per_query"][f])) / 2,
                               atol=1e-4)
            moved += a["recall_at_fraction"][f] != b["recall_at_fraction"][f]
    assert moved  # the two draws differ somewhere, so the mean is not one of them
    assert two["methods"]["kmer_vqvae"] == m["kmer_vqvae"]  # the model's own codes take no draw
    # --distractors N: the same queries against the corpus plus N passages of the bundled web text
    big = eval_filter.main(common + ["--distractors", "30", "--output_dir", str(tmp_path / "web")])
    assert big["distractors"] == 30 and big["passages"] == 1460 + 30 and big["queries"] == two["queries"]
    assert big["query_set"] == two["query_set"] and big["json"].endswith("_lists8_cisi+web30_filter_eval.json")
    assert big["methods"]["kmer_vqvae_ivf_lexical"]["codes"] == 8
    # --distractor_files: the distractors come from the user's corpus file instead (here, 30 of its 40 lines)
    own = tmp_path / "mine.txt"
    own.write_text("".join(f"a distractor passage about subject number {i}\n" for i in range(40)))
    mine = eval_filter.main(common + ["--distractors", "30", "--distractor_files", str(own),
                                      "--output_dir", str(tmp_path / "files")])
    assert mine["distractors"] == 30 and mine["passages"] == 1460 + 30 and mine["query_set"] == two["query_set"]
    assert mine["distractor_files"] == [str(own)] and mine["json"].endswith("_lists8_cisi+files30_filter_eval.json")
    assert mine["methods"]["random"] != big["methods"]["random"] or mine["methods"]["kmer_vqvae_ivf"] != \
        big["methods"]["kmer_vqvae_ivf"]  # another corpus, other lists
