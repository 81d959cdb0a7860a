"""DDP on CPU: two gloo processes under torchrun must end with identical tensors on every rank."""
import os
import subprocess
import sys

import torch

from vqvae_phase1_model import load_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(script, args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           script, "--preset", "tiny", "--device", "cpu", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _same_on_every_rank(folder):
    a, b = (torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path, teacher_cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KMER_DDP_BACKEND": "gloo",
           "OMP_NUM_THREADS": "1"}
    common = ["--teacher_cache", teacher_cache_dir]
    p1 = str(tmp_path / "p1.pt")
    _torchrun("vqvae_phase1_train.py", [*common, "--output", p1],
              {**env, "KMER_DUMP_RANK_STATE": str(tmp_path / "ranks1a")})
    _same_on_every_rank(tmp_path / "ranks1a")  # EMA codebook all-reduced, k-means and restarts broadcast
    f = load_pretrained(p1)  # the checkpoint loads in a single process
    assert f.checkpoint["step"] == 30 and bool(f.model.quantizer.initialized)
    _torchrun("vqvae_phase2_train_adapters.py", [*common, "--checkpoint", p1, "--output", str(tmp_path / "p2.pt")],
              {**env, "KMER_DUMP_RANK_STATE": str(tmp_path / "ranks2")})
    _same_on_every_rank(tmp_path / "ranks2")
    assert load_pretrained(str(tmp_path / "p2.pt")).adapters is not None


def test_a_user_error_under_torchrun_is_printed_once(tmp_path):
    """Every rank meets the same mistake; only rank 0 says it, and every rank exits with code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KMER_DDP_BACKEND": "gloo",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "vqvae_phase1_train.py", "--preset", "tiny", "--device", "cpu", "--data", "hub",
           "--output", str(tmp_path / "p1.pt")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    ours = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1 and "--data sample --preset demo" in ours[0]
    assert "exitcode  : 2" in r.stderr or "exit code 2" in r.stderr.lower() or r.returncode == 2


NAN_SCRIPT = r'''
import os, sys, dataclasses
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {repo!r})
import train_common as tc

def work(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = dataclasses.make_dataclass("C", [("grad_clip", float, 1.0), ("skip_nonfinite", int, 5)])()
    state = tc.LoopState()
    for step in range(4):
        loss = model(torch.ones(2, 4)).sum()
        if rank == 1 and step == 1:
            loss = loss * float("nan")  # only this rank sees it
        tc._apply_step(cfg, loss, list(model.parameters()), opt, state)
    torch.save({{"w": model.module.weight.detach(), "skipped": state.skipped_nonfinite}}, f"{{out}}/rank{{rank}}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    dist.destroy_process_group()
    # gloo can still hold a joinable thread when the interpreter's C++ destructors run, which aborts the
    # process ("terminate called without an active exception") after all work is done and saved; the
    # results are on disk, so leave without running those destructors
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1],), nprocs=2)
'''


def test_a_nan_on_one_rank_is_skipped_by_all_ranks(tmp_path):
    """One rank's NaN loss: every rank skips that step together (no rank waits alone in the all-reduce)."""
    script = tmp_path / "nan_one_rank.py"
    script.write_text(NAN_SCRIPT.format(repo=REPO))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["skipped"] == b["skipped"] == 1
    assert torch.equal(a["w"], b["w"])
