"""CUDA paths (marked `gpu`, skipped by default; `pytest -m gpu` on a GPU machine): each phase for a few
steps on CUDA with bf16 autocast, then the checkpoint reloads on the CPU and encodes the same codes."""
import os

import pytest
import torch

import vqvae_phase1_train as p1
import vqvae_phase1b_train_lora as p1b
import vqvae_phase2_train_adapters as p2
from train_common import parse_config
from vqvae_phase1_model import load_pretrained

pytestmark = pytest.mark.gpu
TEACHER = os.environ.get("KMER_TEACHER", "")  # a local teacher copy where the PyPI package is absent


def _cfg(module, cls, **over):
    args = ["--preset", "tiny", "--device", "cuda", "--teacher", TEACHER]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return parse_config(cls, module.PRESETS, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_three_phases_on_cuda_reload_on_cpu(tmp_path, teacher_cache_dir):
    r1 = p1.main(_cfg(p1, p1.Phase1Config, output=tmp_path / "p1.pt", teacher_cache=teacher_cache_dir))
    assert r1["step"] == 30 and r1["metrics"]["cos_e"] == r1["metrics"]["cos_e"]  # finite
    p1b.main(_cfg(p1b, p1b.Phase1bConfig, phase1a_checkpoint=tmp_path / "p1.pt", output=tmp_path / "p1b.pt",
                  teacher_cache=teacher_cache_dir))
    r2 = p2.main(_cfg(p2, p2.Phase2Config, checkpoint=tmp_path / "p1b.pt", output=tmp_path / "p2.pt",
                      teacher_cache=teacher_cache_dir))
    assert 0.0 <= r2["metrics"]["q2p_acc"] <= 1.0
    texts = ["what is a coarse quantiser?", "a passage about rivers and the sea, long enough for two positions"]
    cpu = load_pretrained(str(tmp_path / "p2.pt"))
    gpu = load_pretrained(str(tmp_path / "p2.pt"), map_location="cuda")
    gpu.model.cuda()
    gpu.adapters.cuda()
    a, b = cpu.encode(texts, role="passage"), gpu.encode(texts, role="passage")
    assert torch.allclose(a["z_code"], b["z_code"], atol=1e-3)
    assert torch.equal(a["indices"], b["indices"])
