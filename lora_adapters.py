"""LoRA for the encoder's attention (Phase 1b) and query/passage adapters (Phase 2).

    from lora_adapters import inject_lora, merge_lora, QueryPassageAdapters
    n = inject_lora(model.encoder, rank=8, alpha=16)      # LoRA on every q_proj and v_proj
    adapters = QueryPassageAdapters(d_model=384)          # identity at init: codes unchanged

LoRA follows Hu et al. 2021 (https://arxiv.org/abs/2106.09685) with PEFT's conventions:
kaiming-uniform A, zero B (so a fresh adapter is the identity), scale alpha / rank, dropout on
the LoRA branch only. Pure module: no devices, no prints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / rank; merge() folds it into base."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype)) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        new = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        if not torch.isfinite(new).all():
            raise ValueError("LoRA merge produced non-finite weights; the adapter is broken")
        self.base.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False


def inject_lora(module: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    """Wrap every nn.Linear named in `targets`; freeze everything else. Returns LoRA parameter count."""
    for p in module.parameters():
        p.requires_grad_(False)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    layers = lora_layers(module)
    if not layers:
        raise ValueError(f"no nn.Linear named {targets} found to inject LoRA into")
    return sum(p.numel() for layer in layers for p in (layer.lora_A, layer.lora_B))


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    """LoRA layers found by type, not by name."""
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(module) for p in (layer.lora_A, layer.lora_B)]


def lora_state_dict(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}


def merged_state_dict(module: nn.Module) -> dict:
    """State dict of `module` with LoRA merged and unwrapped: the plain model's keys."""
    out = {}
    for k, v in module.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base.", ".")] = v.detach().clone()
    for name, layer in ((n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)):
        w = layer.base.weight if layer.merged else layer.base.weight + layer.delta_weight()
        if not torch.isfinite(w).all():
            raise ValueError(f"LoRA merge of {name} produced non-finite weights")
        out[f"{name}.weight"] = w.detach().clone()
    return out


def set_lora_merged(module: nn.Module, merged: bool):
    for layer in lora_layers(module):
        layer.merge() if merged else layer.unmerge()


class ResidualAdapter(nn.Module):
    """z + W2 gelu(W1 LN(z)), with W2 zero-initialised so a fresh adapter is the identity."""

    def __init__(self, d_model: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, hidden_dim)
        self.down = nn.Linear(hidden_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z):
        return z + self.down(self.dropout(F.gelu(self.up(self.norm(z)))))


class QueryAdapter(ResidualAdapter):
    """Maps query encodings towards the passages they should retrieve."""


class PassageAdapter(ResidualAdapter):
    """Maps passage encodings; separate from the query side in the "dual" setting."""


class QueryPassageAdapters(nn.Module):
    """`adapter_type="dual"`: separate query and passage adapters; `"shared"`: one for both."""

    def __init__(self, d_model: int = 384, adapter_type: str = "dual", hidden_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if adapter_type not in ("dual", "shared"):
            raise ValueError(f"adapter_type must be 'dual' or 'shared', got {adapter_type!r}")
        hidden_dim = hidden_dim or 2 * d_model
        self.config = {"d_model": d_model, "adapter_type": adapter_type, "hidden_dim": hidden_dim,
                       "dropout": dropout}
        self.query = QueryAdapter(d_model, hidden_dim, dropout)
        self.passage = PassageAdapter(d_model, hidden_dim, dropout) if adapter_type == "dual" else None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "QueryPassageAdapters":
        """The adapters a Phase 2 checkpoint holds, built from its own config and loaded."""
        adapters = cls(**ckpt["adapter_config"])
        adapters.load_state_dict(ckpt["adapter_state_dict"])
        return adapters

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but adapters built with another size or type are one clear line."""
        mine = self.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        if strict and (set(shapes) != set(mine) or any(shapes[k] != tuple(mine[k].shape) for k in mine)):
            width = next((v[-1] for k, v in shapes.items() if k.endswith("weight")), "?")
            raise ValueError(f"these adapter weights were saved for another adapter config (e.g. width {width}), "
                             f"not {self.config}: build them with QueryPassageAdapters(**ckpt['adapter_config']) "
                             f"or QueryPassageAdapters.from_checkpoint(ckpt)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, z: torch.Tensor, role: str) -> torch.Tensor:
        if role == "query" or self.passage is None:
            return self.query(z)
        if role == "passage":
            return self.passage(z)
        raise ValueError(f"role must be 'query' or 'passage', got {role!r}")
