import os

import pytest
import torch

from train_common import LoopState, base_checkpoint
from vqvae_phase1_model import (CheckpointError, KmerVQVAE, load_checkpoint, load_pretrained, model_from_checkpoint,
                                save_checkpoint)


class _Cfg:  # the smallest thing base_checkpoint can asdict()
    pass


def _ckpt(model, phase="phase1a"):
    from dataclasses import make_dataclass
    cfg = make_dataclass("Cfg", [("seed", int, 0)])()
    return base_checkpoint(phase, cfg, model.config_dict(), model.state_dict(), LoopState(step=3), {"m": 1.0}, None)


def _outputs(model):
    model.eval()
    b = model.tokenizer()(["checkpoint round trip", "second text " * 20])
    return model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])


def test_save_load_gives_identical_outputs(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    tiny_model.quantizer.initialized.fill_(True)
    save_checkpoint(_ckpt(tiny_model), path)
    loaded = model_from_checkpoint(load_checkpoint(path))
    a, b = _outputs(tiny_model), _outputs(loaded)
    assert torch.equal(a["z_e"], b["z_e"]) and torch.equal(a["indices"], b["indices"])
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["phase"] == "phase1a" and raw["step"] == 3


def test_seed_inference_snippet_runs_verbatim(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(_ckpt(tiny_model), path)
    ckpt = torch.load(path, weights_only=True)
    b = KmerVQVAE(**ckpt["base_config"]).tokenizer()(["a query about codes"])
    input_ids, attention_mask = b["input_ids"], b["attention_mask"]
    model = KmerVQVAE(**ckpt["base_config"]); model.load_state_dict(ckpt["base_model_state_dict"])  # noqa: E702
    out = model.encode(input_ids, attention_mask)   # dict: z_e, z_q, indices, ...
    assert out["indices"].shape == (1,)
    assert {"z_e", "z_q", "indices"} <= set(out)
    # values, not shapes: the code is the nearest one, z_q is its vector, and the saved model gives the same
    assert torch.equal(out["indices"], model.quantizer.similarity(out["z_code"]).argmax(1))
    assert torch.allclose(out["z_q"], model.quantizer.decode_indices(out["indices"]))
    assert torch.equal(out["indices"], tiny_model.eval().encode(input_ids, attention_mask)["indices"])


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_truncated_garbage_foreign_and_wrong_phase(tiny_model, tmp_path):
    good = str(tmp_path / "good.pt")
    save_checkpoint(_ckpt(tiny_model), good)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "nope.pt"))
    assert "not found" in _one_line(e)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(trunc))
    assert "truncated" in _one_line(e)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(garbage))
    _one_line(e)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(foreign)
    assert "not a k-mer VQ-VAE checkpoint" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(good, phases=("phase1b",))
    assert "phase1a checkpoint" in _one_line(e)
    with pytest.raises(CheckpointError) as e:  # tiny_model's codebook was never initialised
        load_checkpoint(good, need_codebook=True)
    assert "before its codebook's k-means init" in _one_line(e)
    tiny_model.quantizer.initialized.fill_(True)
    save_checkpoint(_ckpt(tiny_model), good)
    assert load_checkpoint(good, need_codebook=True)["phase"] == "phase1a"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_carrying_pickle_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = str(tmp_path / "evil.pt")
    torch.save({"format": "kmer-vqvae/1", "payload": _Evil(marker)}, evil)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    assert "run code" in _one_line(e)
    assert not os.path.exists(marker)


def test_mismatched_config_is_one_line(tiny_model, tmp_path):
    ck = _ckpt(tiny_model)
    ck["base_config"]["d_model"] = 64
    path = str(tmp_path / "bad.pt")
    save_checkpoint(ck, path)
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(load_checkpoint(path))
    assert "do not match" in _one_line(e)


@pytest.mark.parametrize("error", [RuntimeError("crash mid-save"), OSError(28, "No space left on device")])
def test_failed_save_keeps_previous_checkpoint(tiny_model, tmp_path, monkeypatch, error):
    path = str(tmp_path / "m.pt")
    save_checkpoint(_ckpt(tiny_model), path)
    before = open(path, "rb").read()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial bytes")  # some bytes reach the disk, then the failure
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        save_checkpoint(_ckpt(tiny_model), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind
    load_checkpoint(path)


def test_load_pretrained_returns_filter(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(_ckpt(tiny_model), path)
    f = load_pretrained(path)
    out = f.encode(["one", "two"], top_n=3)
    assert out["top_indices"].shape == (2, 3) and f.adapters is None
