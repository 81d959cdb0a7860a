import copy

import pytest
import torch
import torch.nn as nn

from lora_adapters import (LoRALinear, QueryPassageAdapters, inject_lora, lora_parameters, lora_state_dict,
                           merged_state_dict, set_lora_merged)
from vqvae_phase1_model import KmerVQVAE, SelfAttention


def _batch(model):
    return model.tokenizer()(["lora keeps the base frozen", "only q and v move", "x" * 300])


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_fresh_lora_is_identity(tiny_model):
    tiny_model.eval()
    b = _batch(tiny_model)
    before = tiny_model.encode(b["input_ids"], b["attention_mask"])["z_e"]
    inject_lora(tiny_model, rank=4, alpha=8)
    after = tiny_model.encode(b["input_ids"], b["attention_mask"])["z_e"]
    assert torch.equal(before, after)


def test_merged_equals_unmerged(tiny_model, tiny_config):
    tiny_model.eval()
    inject_lora(tiny_model, rank=4, alpha=8)
    _perturb(tiny_model)
    b = _batch(tiny_model)
    unmerged = tiny_model.encode(b["input_ids"], b["attention_mask"])["z_e"]
    plain = KmerVQVAE(**tiny_config).eval()
    plain.load_state_dict(merged_state_dict(tiny_model))
    assert torch.allclose(plain.encode(b["input_ids"], b["attention_mask"])["z_e"], unmerged, atol=1e-5)
    set_lora_merged(tiny_model, True)
    assert torch.allclose(tiny_model.encode(b["input_ids"], b["attention_mask"])["z_e"], unmerged, atol=1e-5)
    set_lora_merged(tiny_model, False)
    assert torch.allclose(tiny_model.encode(b["input_ids"], b["attention_mask"])["z_e"], unmerged, atol=1e-6)


def test_merge_refuses_non_finite():
    layer = LoRALinear(nn.Linear(4, 4), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()


def test_only_lora_parameters_train(tiny_model):
    n = inject_lora(tiny_model, rank=4, alpha=8)
    trainable = [name for name, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in t for t in trainable)
    assert all(".q_proj." in t or ".v_proj." in t for t in trainable)
    assert sum(p.numel() for p in lora_parameters(tiny_model)) == n
    assert set(lora_state_dict(tiny_model)) == {t for t in trainable}


def test_default_config_has_49152_lora_parameters():
    model = KmerVQVAE()
    assert inject_lora(model.encoder, rank=8, alpha=16) == 49_152


def test_matches_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 0.0).eval()
    ref = peft.get_peft_model(copy.deepcopy(attn), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            getattr(ref.base_model.model, name).lora_B["default"].weight.normal_()
    ours = copy.deepcopy(attn)
    inject_lora(ours, rank=4, alpha=8)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            r, o = getattr(ref.base_model.model, name), getattr(ours, name)
            o.lora_A.copy_(r.lora_A["default"].weight)
            o.lora_B.copy_(r.lora_B["default"].weight)
    x, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    assert torch.allclose(ours(x, mask), ref(x, mask), atol=1e-5)


def test_fresh_adapters_leave_codes_unchanged(tiny_model):
    tiny_model.eval()
    b = _batch(tiny_model)
    base = tiny_model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"])
    for kind in ("dual", "shared"):
        adapters = QueryPassageAdapters(d_model=32, adapter_type=kind)
        for role in ("query", "passage"):
            out = tiny_model.encode(b["input_ids"], b["attention_mask"], b["text_index"], b["num_texts"],
                                    adapter=adapters, role=role)
            assert torch.equal(out["indices"], base["indices"])
            assert torch.allclose(out["z_e"], base["z_e"])


def test_adapters_constructible_with_d_model_alone():
    a = QueryPassageAdapters(d_model=384)
    assert a.config["adapter_type"] == "dual" and a.passage is not None
    assert QueryPassageAdapters(d_model=8, adapter_type="shared").passage is None
    with pytest.raises(ValueError):
        QueryPassageAdapters(d_model=8, adapter_type="triple")
