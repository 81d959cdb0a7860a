"""Phase 1b: adapt a Phase 1a model to academic and conversational text with LoRA on Q and V.

    python vqvae_phase1b_train_lora.py --preset demo --phase1a_checkpoint runs/demo/kmer_vqvae_phase1.pt
    python vqvae_phase1b_train_lora.py --data hub --phase1a_checkpoint kmer_vqvae_phase1.pt --preset full
    python vqvae_phase1b_train_lora.py ... --sources arxiv,pubmed,ultrachat --skip_unavailable
    python vqvae_phase1b_train_lora.py ... --codebook grad --codebook_lr 1e-5   # fine-tune the codebook

Steps: (1) load the Phase 1a checkpoint (it decides the architecture), (2) inject LoRA into every
q_proj/v_proj and freeze the rest, (3) evaluate on held-out domain and web-text windows before
training, (4) train with the Phase 1a losses, (5) eval + checkpoint (LoRA merged into the base
weights, LoRA tensors kept beside them) at a fixed cadence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import train_common as tc
from data_common import parse_data_files, parse_weights
from lora_adapters import inject_lora, lora_parameters, lora_state_dict, merged_state_dict
from teacher import Teacher, TeacherError
from train_common import CommonConfig, LoopState, UserError, opt
from vqvae_phase1_model import copy_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from vqvae_phase1_train import evaluate_distillation
from vqvae_phase1a_data_webtext import WEBTEXT_SOURCES, WindowStream, eval_windows, webtext_documents
from vqvae_phase1b_data_domains import DOMAIN_SOURCES, HUB_DEFAULT, SAMPLE_DEFAULT, domain_documents


@dataclass
class Phase1bConfig(CommonConfig):
    phase1a_checkpoint: str = opt("kmer_vqvae_phase1.pt", "the Phase 1a checkpoint to adapt")
    sources: str = opt("", f"sources and weights (default: {SAMPLE_DEFAULT} for samples, {HUB_DEFAULT} on the Hub)")
    domain_weights: str = opt("academic=0.5,conversational=0.5", "weight of each domain in the mix")
    skip_unavailable: bool = opt(False, "skip (loudly) sources that cannot load instead of stopping")
    web_sources: str = opt("wikitext=0.5,c4=0.5", "web-text sources for the forgetting eval")
    lr: float = opt(1e-4, "peak LoRA learning rate", gt=0)
    lora_rank: int = opt(8, "LoRA rank", min=1)
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)", gt=0)
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch", min=0, max=1)
    codebook: str = opt("frozen", "codebook during 1b: frozen, or grad (fine-tuned at --codebook_lr)",
                        choices=("frozen", "grad"))
    codebook_lr: float = opt(1e-5, "codebook learning rate when --codebook grad", gt=0)
    diversity_weight: float = opt(0.2, "diversity loss weight", min=0)
    continuous_weight: float = opt(1.0, "cosine loss weight on the continuous path", min=0)
    relational_weight: float = opt(0.0, "in-batch similarity-matrix loss weight", min=0)
    center_targets: bool = opt(True, "cosine losses compare decoded and target minus the held-out domain targets' "
                               "mean (Phase 1a's objective; README 'Filter quality')")
    contrastive_weight: float = opt(1.0, "weight of the in-batch InfoNCE between decoded vectors and targets", min=0)
    contrastive_temperature: float = opt(0.05, "InfoNCE temperature", gt=0)
    train_windows: int = opt(0, "distinct training windows, cycled (0 = the whole stream)", min=0)
    shuffle_buffer: int = opt(4096, "windows in the shuffle buffer", min=1)
    health_size: int = opt(20_000, "held-out windows (each of domain and web text) for codebook health; "
                           "student only, no teacher", min=1)


PRESETS = {
    "tiny": dict(data="sample", batch_size=16, max_steps=12, warmup_steps=2, eval_every=6, eval_size=48, log_every=3,
                 health_size=96, shuffle_buffer=64, phase1a_checkpoint="runs/tiny/kmer_vqvae_phase1.pt",
                 output="runs/tiny/kmer_vqvae_phase1b_lora.pt"),
    "demo": dict(data="sample", batch_size=32, lr=1e-4, max_steps=200, warmup_steps=20, eval_every=100, eval_size=400,
                 health_size=5000, train_windows=1600, shuffle_buffer=1024,
                 phase1a_checkpoint="runs/demo/kmer_vqvae_phase1.pt", output="runs/demo/kmer_vqvae_phase1b_lora.pt"),
    "full": dict(data="hub", batch_size=256, lr=1e-4, max_steps=3000, warmup_steps=100, eval_every=500, eval_size=20_000,
                 output="kmer_vqvae_phase1b_lora.pt"),
}
PRESETS["cpu"] = {**PRESETS["demo"], "phase1a_checkpoint": "runs/cpu/kmer_vqvae_phase1.pt",
                  "output": "runs/cpu/kmer_vqvae_phase1b_lora.pt"}  # the CPU recipe: the demo's Phase 1b


def build_model(cfg, parent: dict, device):
    """Parent's model + LoRA on Q/V, base frozen, codebook frozen or trainable."""
    model = model_from_checkpoint(parent)
    n_lora = inject_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    model.quantizer.set_mode(cfg.codebook)
    return model.to(device), n_lora


def main(cfg: Phase1bConfig) -> dict:
    # 1. parent checkpoint, ranks, data
    rank, world, device, out_path, best_path, run_dir = tc.start_run(cfg, "kmer_vqvae_phase1b_lora.pt")
    parent = load_checkpoint(cfg.phase1a_checkpoint, phases=("phase1a",), need_codebook=True)
    parent_rec = tc.parent_record(cfg.phase1a_checkpoint)
    source_weights = parse_weights(cfg.sources or (HUB_DEFAULT if cfg.data == "hub" else SAMPLE_DEFAULT),
                                   DOMAIN_SOURCES)
    domain_weights = parse_weights(cfg.domain_weights, ("academic", "conversational"), "domain")
    files = parse_data_files(cfg.data_files)
    docs = lambda split, cycle: domain_documents(
        cfg.data, split, source_weights, domain_weights, files, seed=cfg.seed, cycle=cycle,
        rank=rank if split == "train" else 0, world=world if split == "train" else 1,
        skip_unavailable=cfg.skip_unavailable)

    # 2. model with LoRA, teacher
    model, n_lora = build_model(cfg, parent, device)
    tok = model.tokenizer()
    trainable, total = tc.count_params(model)
    try:
        teacher = Teacher.load(cfg.teacher, str(device), cfg.teacher_cache or None, cfg.teacher_batch_size,
                               cfg.teacher_precision)
    except TeacherError as e:
        raise UserError(str(e)) from None
    n_eval = max(cfg.eval_size, cfg.health_size)
    domain_health = eval_windows(docs("validation", False), tok, n_eval)
    web_weights = parse_weights(cfg.web_sources, WEBTEXT_SOURCES)
    web_health = eval_windows(webtext_documents(cfg.data, "validation", web_weights, files, cycle=False), tok,
                              n_eval)
    domain_eval, web_eval = domain_health[:cfg.eval_size], web_health[:cfg.eval_size]
    if not domain_eval or not web_eval:
        raise UserError("no held-out windows for the domain or web-text eval: check the validation files")
    domain_t, web_t = teacher.embed(domain_eval), teacher.embed(web_eval)
    center = domain_t.float().mean(0).to(device) if cfg.center_targets else None
    stream = WindowStream(lambda: docs("train", cfg.train_windows == 0), tok, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer, pool_size=cfg.train_windows)

    def evaluate():
        d = evaluate_distillation(model, tok, domain_eval, domain_t, device, domain_health)
        w = evaluate_distillation(model, tok, web_eval, web_t, device, web_health)
        out = {f"domain_{k}": v for k, v in d.items() if not k.startswith("_")}
        out.update({f"web_{k}": v for k, v in w.items() if not k.startswith("_")})
        out["_code_usage"] = d["_code_usage"]
        return out

    # 3. before training, optimizer, resume
    before = evaluate()
    before.pop("_code_usage")
    groups = [{"params": lora_parameters(model), "lr_scale": 1.0}]
    if cfg.codebook == "grad":
        groups.append({"params": [model.quantizer.codebook], "lr_scale": cfg.codebook_lr / cfg.lr, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    optimizer = tc.adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = LoopState()
    if cfg.resume and os.path.exists(out_path):
        ckpt = load_checkpoint(out_path, phases=("phase1b",))
        quantizer = {k: v for k, v in ckpt["base_model_state_dict"].items() if k.startswith("quantizer.")}
        model.load_state_dict({**model.state_dict(), **ckpt["lora_state_dict"], **quantizer})  # with --codebook
        # grad the centring mean and usage move too: all the quantiser's state comes back, not only the codebook
        state = tc.resume_state(ckpt, optimizer, stream.skip)
        before = ckpt["metrics"].get("before", before)
    train_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    logger = tc.RunLogger(cfg, run_dir, "phase1b", rank, resumed_step=state.step)
    if rank == 0:
        print(f"phase 1b: LoRA rank {cfg.lora_rank} on q_proj/v_proj: {n_lora:,} LoRA parameters; trainable "
              f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%), codebook {cfg.codebook}")
        print(tc.format_metrics("before training", before))
        logger.log("eval", state.step, {**before, "trainable_params": trainable, "total_params": total})

    # 4. the step
    def train_step(step):
        windows = stream.take(cfg.batch_size)
        targets = teacher.embed(windows).to(device)
        b = tok.encode_windows(windows)
        mask = b["attention_mask"].to(device)
        out = train_model(b["input_ids"].to(device), mask, teacher=targets,
                          continuous_weight=cfg.continuous_weight, relational_weight=cfg.relational_weight,
                          target_center=center, contrastive_weight=cfg.contrastive_weight,
                          contrastive_temperature=cfg.contrastive_temperature)
        loss = out["loss"] + cfg.diversity_weight * out["diversity_term"]
        return loss, {"cos_q": float(out["cos_q"]), "cos_e": float(out["cos_e"])}, int(mask.sum()) * world

    def save(st, metrics, is_best):
        teacher.flush()
        st.data_position = stream.position
        gains = {"before": before, "domain_gain": metrics["domain_cos_q"] - before["domain_cos_q"],
                 "web_forgetting": before["web_cos_q"] - metrics["web_cos_q"],
                 "trainable_params": trainable, "total_params": total}
        ckpt = tc.base_checkpoint("phase1b", cfg, model.config_dict(), merged_state_dict(model), st,
                                  {**metrics, **gains}, parent_rec, optimizer)
        ckpt["lora_config"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                               "targets": ["q_proj", "v_proj"]}
        ckpt["lora_state_dict"] = lora_state_dict(model)
        save_checkpoint(ckpt, out_path)
        if is_best:
            copy_checkpoint(out_path, best_path)

    # 5. train, eval, checkpoint
    model.train()
    metrics = tc.run_training(cfg, optimizer=optimizer, params=params, train_step=train_step, evaluate=evaluate,
                              save=save, state=state, logger=logger, total_steps=cfg.max_steps, device=device,
                              best_key="domain_cos_q", rank=rank, bar_keys=("cos_q", "cos_e"))
    teacher.flush()
    logger.finish()
    tc.finish_distributed(model, rank)
    summary = {"domain_cos_q": (before["domain_cos_q"], metrics.get("domain_cos_q")),
               "web_cos_q": (before["web_cos_q"], metrics.get("web_cos_q"))}
    if rank == 0:
        print(f"wrote {out_path}; before -> after: " + ", ".join(f"{k} {a:.4f} -> {b:.4f}" for k, (a, b) in summary.items()))
    return {"metrics": metrics, "before": before, "output": out_path, "lora_params": n_lora,
            "trainable_params": trainable, "total_params": total, "teacher_calls": teacher.calls}


if __name__ == "__main__":
    tc.run_main(main, Phase1bConfig, PRESETS, __doc__)
