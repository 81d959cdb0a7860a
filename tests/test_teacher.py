"""The teacher's precision: bf16 where the hardware has it, its own cache folder, the same embeddings to ~1e-3."""
import os

import pytest
import torch

from teacher import Teacher, TeacherError, native_bf16, resolve_precision

TEXTS = ["the cat sat on the mat", "Normandy is a region in France.", "what causes the tides?",
         "Gradient descent minimises a loss by small steps against its gradient.", "x", "hello there, world"]


def test_precision_resolution():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    with pytest.raises(TeacherError, match="use one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(TeacherError, match="fp8"):
        Teacher.load(device="cpu", cache_dir=None, precision="fp8")  # before any model loads


def test_bf16_teacher_agrees_with_fp32_and_keeps_its_own_cache(tmp_path):
    fp32 = Teacher.load(device="cpu", cache_dir=str(tmp_path), precision="fp32")
    bf16 = Teacher(fp32.model, fp32.fingerprint, str(tmp_path), precision="bf16")
    a, b = fp32.embed(TEXTS).float(), bf16.embed(TEXTS).float()
    assert torch.allclose(a.norm(dim=1), torch.ones(len(TEXTS)), atol=2e-3)
    assert torch.allclose(b.norm(dim=1), torch.ones(len(TEXTS)), atol=2e-3)
    cos = (a * b).sum(1)
    assert cos.min() > 0.995, cos  # the same teacher ...
    assert (fp32.encode_uncached(TEXTS) != bf16.encode_uncached(TEXTS)).any()  # ... but autocast did run
    bf16.flush()
    fp32.flush()
    assert sorted(os.listdir(tmp_path)) == sorted([f"{fp32.fingerprint}_len{fp32.max_seq_length}",
                                                   f"{fp32.fingerprint}_len{fp32.max_seq_length}_bf16"])
    again = Teacher(fp32.model, fp32.fingerprint, str(tmp_path), precision="bf16")
    assert torch.equal(again.embed(TEXTS), bf16.embed(TEXTS)) and again.calls == 0  # served by its own cache
