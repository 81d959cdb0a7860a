"""Phase 2: query/passage adapters so a query and its passages fall into the same codes.

    python vqvae_phase2_train_adapters.py --preset demo --checkpoint runs/demo/kmer_vqvae_phase1b_lora.pt
    python vqvae_phase2_train_adapters.py --data hub --checkpoint kmer_vqvae_phase1b_lora.pt --preset full
    python vqvae_phase2_train_adapters.py ... --adapter_type shared --sources squad,nq

Steps: (1) load a Phase 1a or 1b checkpoint (its base and codebook stay frozen), (2) pair streams
with a deterministic held-out split, (3) dual (or shared) residual adapters, identity at start,
(4) symmetric InfoNCE on cosine similarity in code space, (5) held-out q2p/p2q accuracy, code
match and positive similarity at a fixed eval batch size, beside the teacher's own numbers.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import train_common as tc
from data_common import parse_data_files, parse_weights
from lora_adapters import QueryPassageAdapters
from teacher import Teacher, TeacherError
from train_common import CommonConfig, LoopState, UserError, opt
from vqvae_phase1_model import (copy_checkpoint, info_nce, load_checkpoint, model_from_checkpoint, save_checkpoint,
                                spherical_kmeans)
from vqvae_phase1a_data_webtext import DEFAULT_WEIGHTS, WEBTEXT_SOURCES, webtext_documents
from vqvae_phase2_data import (HUB_DEFAULT, PAIR_SOURCES, SAMPLE_DEFAULT, PairBatcher, grouped_order, pair_stream,
                               sentence_stream)


@dataclass
class Phase2Config(CommonConfig):
    checkpoint: str = opt("kmer_vqvae_phase1b_lora.pt", "a Phase 1a or 1b checkpoint (detected from the file)")
    sources: str = opt("", f"pair sources and weights (default: {SAMPLE_DEFAULT} for samples, {HUB_DEFAULT} on the Hub)")
    skip_unavailable: bool = opt(False, "skip (loudly) sources that cannot load instead of stopping")
    adapter_type: str = opt("dual", "separate query/passage adapters, or one shared", choices=("dual", "shared"))
    adapter_hidden: int = opt(0, "adapter hidden size (0 = 2 x d_model)", min=0)
    adapter_dropout: float = opt(0.0, "adapter dropout", min=0, max=1)
    temperature: float = opt(0.07, "InfoNCE temperature", gt=0)
    held_out_percent: float = opt(5.0, "share of each source held out (by passage or article hash)", gt=0, max=50)
    eval_batch_size: int = opt(64, "pairs per in-batch eval (accuracy depends on it)", min=2)
    train_pairs: int = opt(0, "distinct training pairs, reshuffled each epoch (0 = the whole stream)", min=0)
    teacher_compare: bool = opt(True, "also report the metrics of the teacher's own embeddings")
    pair_weight: float = opt(1.0, "weight of the symmetric InfoNCE between the pairs' queries and passages", min=0)
    train_passage_adapter: bool = opt(False, "train the passage adapter too (false: it stays the identity, so passages "
                                      "keep the Phase 1 vectors an index was fitted to and only queries move)")
    query_distill_weight: float = opt(1.0, "weight of a second objective: each query, through the query adapter and "
                                      "the frozen decoder, lands where the teacher puts it (centred cosine + InfoNCE; "
                                      "0 = off). Keeps the adapter general beyond the few pair sources", min=0)
    passage_distill_weight: float = opt(0.0, "weight of the same objective for passages: each passage, through the "
                                        "passage adapter and the frozen decoder, lands where the teacher puts it "
                                        "(needs --train_passage_adapter; 0 = off)", min=0)
    rank_distill_weight: float = opt(0.0, "weight of a listwise objective in code space: for each query, KL from the "
                                     "teacher's softmax over a bank of recent training passages to the model's "
                                     "(cosines / --rank_temperature); passages stay frozen, so the query adapter "
                                     "learns to rank the model's passages as the teacher ranks its own (0 = off)",
                                     min=0)
    rank_bank: int = opt(2048, "distinct recent training passages the listwise objective ranks", min=2)
    rank_temperature: float = opt(0.05, "temperature of both softmaxes of the listwise objective", gt=0)
    align_weight: float = opt(0.0, "weight of 1 - cos(query, its passage) in code space: pulls each query onto its "
                              "passage in absolute terms (InfoNCE only ranks it first in the batch)", min=0)
    pair_groups: int = opt(0, "hard in-batch negatives: cluster the --train_pairs pool by the frozen model's passage "
                           "vectors (spherical k-means, this many groups) and draw each batch from one group "
                           "(0 = random batches)", min=0)
    identity_weight: float = opt(0.0, "weight of a penalty on what the query adapter does to text that is not a "
                                 "query: as many web-text sentences as pairs go through it each step, and the mean "
                                 "squared change relative to each input's squared norm is penalised, so the adapter "
                                 "acts on the pair sources' kind of query and leaves other text alone (0 = off)", min=0)
    identity_sources: str = opt(DEFAULT_WEIGHTS, "web-text sources of those sentences (Phase 1a's, e.g. "
                                "'wikitext=0.5,c4=0.5')")
    code_weight: float = opt(0.0, "weight of a cross-entropy that each query's code scores (cosine / --temperature) "
                             "pick its passage's code", min=0)


PRESETS = {
    "tiny": dict(data="sample", batch_size=8, max_steps=12, warmup_steps=2, eval_every=6, eval_size=32, eval_batch_size=8,
                 log_every=3, checkpoint="runs/tiny/kmer_vqvae_phase1b_lora.pt",
                 output="runs/tiny/kmer_vqvae_phase2_aligned.pt"),
    # demo (and the CPU recipe): InfoNCE with hard in-batch negatives (62 groups of ~64 pairs), no query
    # distillation. With query distillation it lowered recall measurably on the recipe at two seeds, and on
    # the demo it was below this objective on SciTLDR, a domain no phase trains on (README "Filter quality")
    # --identity_weight 30 (this round): web sentences through the query adapter must come out as they went in, so
    # it learns what the pairs' questions need and leaves other text alone. On the demo's Phase 1b, against the
    # same objective without it: SciTLDR (no phase trains on it) up in 9 of 10 cells, SQuAD in 8, CISI
    # half-whitened at 5% +0.025; MedQuAD uncentred at 5% -0.033 (README "Adopted: the identity penalty in Phase 2")
    "demo": dict(data="sample", batch_size=64, lr=1e-4, max_steps=300, warmup_steps=20, eval_every=100, eval_size=512,
                 train_pairs=4000, query_distill_weight=0.0, pair_groups=62, identity_weight=30.0,
                 checkpoint="runs/demo/kmer_vqvae_phase1b_lora.pt", output="runs/demo/kmer_vqvae_phase2_aligned.pt"),
    # full: InfoNCE alone at lr 1e-4. The previous full Phase 2 (lr 3e-4 with query distillation) lowered every
    # IVF and exact-search cell measurably on a GPU run of the full preset; on the CPU those two choices cost
    # most. This one, rerun on a GPU, lowered all 18 cells too, 16 measurably (README "GPU"): no Phase 2
    # objective measured so far raises recall at this scale. It streams its pairs, so no --pair_groups (they
    # cluster a fixed --train_pairs pool). The demo's identity penalty too (unmeasured at this scale)
    "full": dict(data="hub", batch_size=256, lr=1e-4, max_steps=5000, warmup_steps=200, eval_every=500, eval_size=4096,
                 eval_batch_size=64, query_distill_weight=0.0, identity_weight=30.0,
                 output="kmer_vqvae_phase2_aligned.pt"),
}
PRESETS["cpu"] = {**PRESETS["demo"], "checkpoint": "runs/cpu/kmer_vqvae_phase1b_lora.pt",
                  "output": "runs/cpu/kmer_vqvae_phase2_aligned.pt"}  # the CPU recipe: the demo's Phase 2


def inbatch_metrics(q: torch.Tensor, p: torch.Tensor, q_codes=None, p_codes=None) -> dict:
    """q2p/p2q accuracy and positive similarity of matched rows (q[i] goes with p[i])."""
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    sim = q @ p.T
    target = torch.arange(len(q), device=q.device)
    out = {"q2p_acc": float((sim.argmax(1) == target).float().mean()),
           "p2q_acc": float((sim.argmax(0) == target).float().mean()),
           "pos_similarity": float(sim.diagonal().mean())}
    if q_codes is not None:
        out["code_match_rate"] = float((q_codes == p_codes).float().mean())
    return out


def distill_loss(decoded: torch.Tensor, target: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Centred cosine + InfoNCE (temperature 0.05) between decoded vectors and the teacher's, both minus
    `center` (the direction every target shares), as in Phase 1a."""
    d, t = decoded.float() - center, target.float() - center
    return (1 - F.cosine_similarity(d, t, dim=-1)).mean() + info_nce(d, t, 0.05)


def rank_distill_loss(zq: torch.Tensor, bank_z: torch.Tensor, tq: torch.Tensor, bank_t: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Listwise distillation: mean over queries of KL(teacher || model) between softmaxes over the bank's
    passages of cosine / temperature (model: code-space query vs frozen code-space passages; teacher: its
    own embeddings). Zero when the model ranks the bank exactly as the teacher does, at the same spread."""
    s_model = F.normalize(zq.float(), dim=-1) @ F.normalize(bank_z.float(), dim=-1).T / temperature
    s_teacher = F.normalize(tq.float(), dim=-1) @ F.normalize(bank_t.float(), dim=-1).T / temperature
    return F.kl_div(F.log_softmax(s_model, 1), F.log_softmax(s_teacher, 1), log_target=True, reduction="batchmean")


class PassageBank:
    """The last `size` distinct training passages: frozen code-space vectors and teacher embeddings."""

    def __init__(self, size: int):
        self.size, self.rows = size, {}

    def add(self, texts, z: torch.Tensor, t: torch.Tensor):
        for text, zi, ti in zip(texts, z, t):
            self.rows.pop(text, None)  # re-added: now the most recent
            self.rows[text] = (zi, ti)
        while len(self.rows) > self.size:
            self.rows.pop(next(iter(self.rows)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        z, t = zip(*self.rows.values())
        return torch.stack(z), torch.stack(t)


def align_loss(zq: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos(query, its passage): 0 when each query sits on its passage."""
    return (1 - F.cosine_similarity(zq, zp, dim=-1)).mean()


def identity_loss(z: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """Mean of |adapted - z|^2 / |z|^2: 0 where the adapter leaves its inputs as they are."""
    return ((adapted.float() - z.float()).pow(2).sum(-1) / z.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


def code_match_loss(quantizer, zq: torch.Tensor, zp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy that each query's code scores (cosine / temperature) pick its passage's nearest
    code; the passage's code is the label (no gradient through it)."""
    with torch.no_grad():
        p_code = quantizer.similarity(zp).argmax(1)
    return F.cross_entropy(quantizer.similarity(zq) / temperature, p_code)


class FrozenEncoder:
    """z_e of the frozen base model, cached by text: with the base frozen, each text is encoded once."""

    def __init__(self, model, device, max_cache: int = 500_000):
        self.model, self.device, self.tok = model.eval(), device, model.tokenizer()
        self.cache: dict[str, torch.Tensor] = {}
        self.max_cache = max_cache

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        b = self.tok(texts)
        with tc.autocast(self.device):
            return self.model.encode_windows(b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                             b["text_index"].to(self.device), b["num_texts"]).float()

    def __call__(self, texts: list[str], cache: bool = True) -> torch.Tensor:
        """`cache=False` for texts seen once (the identity penalty's sentences): they would only push the
        pairs' texts out of the cache."""
        if not cache:
            return self.encode(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            z = self.encode(missing)
            if len(self.cache) + len(missing) > self.max_cache:
                self.cache.clear()
            self.cache.update(zip(missing, z))
        return torch.stack([self.cache[t] for t in texts])


def group_by_passage(enc: FrozenEncoder, groups: int, seed: int):
    """PairBatcher order: the pool's passages clustered once (spherical k-means on their frozen vectors),
    then every epoch one group after another, so a batch's negatives are passages like its own."""
    labels = []

    def order(pool, rng):
        if not labels:
            z = torch.cat([enc([p for _, p in pool[i:i + 256]]) for i in range(0, len(pool), 256)])
            centres, _ = spherical_kmeans(z, min(groups, len(pool)), seed=seed)
            labels.append((F.normalize(z.float(), dim=-1) @ centres.T).argmax(1).cpu().numpy())
        return grouped_order(labels[0], rng)
    return order


def evaluate_pairs(model, adapters, enc: FrozenEncoder, pairs, bs: int, teacher_emb=None) -> dict:
    """Held-out metrics averaged over consecutive eval batches of `bs` pairs."""
    was = adapters.training
    adapters.eval()
    rows, teacher_rows = [], []
    with torch.no_grad():
        for i in range(0, len(pairs) - bs + 1, bs):
            chunk = pairs[i:i + bs]
            zq = model.quantizer(adapters(enc([q for q, _ in chunk]), "query"))
            zp = model.quantizer(adapters(enc([p for _, p in chunk]), "passage"))
            rows.append(inbatch_metrics(zq["z_code"], zp["z_code"], zq["indices"], zp["indices"]))
            if teacher_emb is not None:
                teacher_rows.append(inbatch_metrics(teacher_emb[0][i:i + bs], teacher_emb[1][i:i + bs]))
    adapters.train(was)
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if teacher_rows:
        out.update({f"teacher_{k}": sum(r[k] for r in teacher_rows) / len(teacher_rows) for k in teacher_rows[0]})
    out["eval_batch_size"], out["eval_pairs"] = bs, len(rows) * bs
    return out


def main(cfg: Phase2Config) -> dict:
    # 1. parent checkpoint (1a or 1b), frozen base
    rank, world, device, out_path, best_path, run_dir = tc.start_run(cfg, "kmer_vqvae_phase2_aligned.pt")
    parent = load_checkpoint(cfg.checkpoint, phases=("phase1a", "phase1b"), need_codebook=True)
    model = model_from_checkpoint(parent).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantizer.set_mode("frozen")
    enc = FrozenEncoder(model, device)

    # 2. pairs
    weights = parse_weights(cfg.sources or (HUB_DEFAULT if cfg.data == "hub" else SAMPLE_DEFAULT), PAIR_SOURCES)
    files = parse_data_files(cfg.data_files)
    pairs = lambda split, cycle: pair_stream(cfg.data, split, weights, files, seed=cfg.seed,
                                             held_out_percent=cfg.held_out_percent, cycle=cycle,
                                             rank=rank if split == "train" else 0,
                                             world=world if split == "train" else 1,
                                             skip_unavailable=cfg.skip_unavailable)
    held = []
    for b in PairBatcher(lambda: pairs("validation", False), cfg.eval_batch_size):
        held.extend(b if len(b) == cfg.eval_batch_size else [])
        if len(held) >= cfg.eval_size:
            break
    if len(held) < cfg.eval_batch_size:
        raise UserError(f"only {len(held)} held-out pairs; need at least --eval_batch_size {cfg.eval_batch_size}")
    if cfg.pair_groups and not cfg.train_pairs:
        raise UserError("--pair_groups clusters the pool of --train_pairs: set --train_pairs too")
    batches = PairBatcher(lambda: pairs("train", cfg.train_pairs == 0), cfg.batch_size, seed=cfg.seed,
                          pool_size=cfg.train_pairs,
                          order=group_by_passage(enc, cfg.pair_groups, cfg.seed) if cfg.pair_groups else None)
    if cfg.passage_distill_weight > 0 and not cfg.train_passage_adapter:
        raise UserError("--passage_distill_weight trains the passage adapter: add --train_passage_adapter")
    if cfg.rank_distill_weight > 0 and cfg.train_passage_adapter:
        raise UserError("--rank_distill_weight ranks frozen passages: drop --train_passage_adapter")
    sentences, sentences_drawn = None, [0]
    if cfg.identity_weight > 0:  # web text a query adapter should leave alone
        sentences = sentence_stream(webtext_documents(cfg.data, "train", parse_weights(cfg.identity_sources,
                                                                                       WEBTEXT_SOURCES),
                                                      files, seed=cfg.seed, rank=rank, world=world))
    teacher_emb, teacher, q_center, p_center = None, None, None, None
    bank = PassageBank(cfg.rank_bank)
    if (cfg.teacher_compare and rank == 0) or any(w > 0 for w in (cfg.query_distill_weight, cfg.passage_distill_weight,
                                                                  cfg.rank_distill_weight)):
        try:
            teacher = Teacher.load(cfg.teacher, str(device), cfg.teacher_cache or None, cfg.teacher_batch_size,
                                   cfg.teacher_precision)
        except TeacherError as e:
            raise UserError(str(e)) from None
        teacher_emb = (teacher.embed([q for q, _ in held]), teacher.embed([p for _, p in held]))
        q_center = teacher_emb[0].float().mean(0).to(device)  # the direction every query shares
        p_center = teacher_emb[1].float().mean(0).to(device)  # and every passage
        teacher.flush()
        if not (cfg.teacher_compare and rank == 0):
            teacher_emb = None

    # 3. adapters, optimizer, resume
    adapters = QueryPassageAdapters(d_model=model.config.d_model, adapter_type=cfg.adapter_type,
                                    hidden_dim=cfg.adapter_hidden or None, dropout=cfg.adapter_dropout).to(device)
    for n, p in adapters.named_parameters():  # a frozen passage adapter stays the identity (zero output layer)
        p.requires_grad_(cfg.train_passage_adapter or not n.startswith("passage"))
    params = [p for p in adapters.parameters() if p.requires_grad]
    optimizer = tc.adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = LoopState()
    if cfg.resume and os.path.exists(out_path):
        ckpt = load_checkpoint(out_path, phases=("phase2",))
        adapters.load_state_dict(ckpt["adapter_state_dict"])
        drawn = ckpt["resume"].get("batches_drawn")  # older checkpoints: the pair position only
        state = tc.resume_state(ckpt, optimizer, batches.skip if drawn is None else
                                lambda _: batches.skip_batches(drawn))
        sentences_drawn[0] = ckpt["resume"].get("sentences_drawn", 0)
        if sentences is not None:  # the identity penalty's sentences go on where the killed run stopped
            sentences = itertools.islice(sentences, sentences_drawn[0], None)
    train_adapters = torch.nn.parallel.DistributedDataParallel(adapters) if world > 1 else adapters
    logger = tc.RunLogger(cfg, run_dir, "phase2", rank, resumed_step=state.step)
    before = evaluate_pairs(model, adapters, enc, held, cfg.eval_batch_size, teacher_emb)
    if rank == 0:
        print(f"phase 2: {cfg.adapter_type} adapters, {sum(p.numel() for p in params):,} trainable parameters; "
              f"base and codebook frozen ({parent['phase']} parent)")
        print(tc.format_metrics("before training", before))

    # 4. the step: symmetric InfoNCE in code space
    def train_step(step):
        batch = next(batches)
        texts = {"query": [q for q, _ in batch], "passage": [p for _, p in batch]}
        targets = {}  # the teacher's embeddings of this batch, per role, each computed once

        def target(role):
            if role not in targets:
                targets[role] = teacher.embed(texts[role]).to(device)
            return targets[role]
        zq = model.quantizer.project(train_adapters(enc(texts["query"]), "query"))
        zp = model.quantizer.project(train_adapters(enc(texts["passage"]), "passage"))
        loss = cfg.pair_weight * info_nce(zq, zp, cfg.temperature)
        logs = {}
        for role, z, weight, center in (("query", zq, cfg.query_distill_weight, q_center),
                                        ("passage", zp, cfg.passage_distill_weight, p_center)):
            if weight > 0:  # the frozen decoder maps code space to the teacher's space
                distill = distill_loss(model.decode(z), target(role), center)
                loss = loss + weight * distill
                logs[f"{role}_distill"] = float(distill.detach())
        if cfg.rank_distill_weight > 0:
            bank.add(texts["passage"], zp.detach(), target("passage"))
            bank_z, bank_t = bank.tensors()
            ranking = rank_distill_loss(zq, bank_z, target("query"), bank_t, cfg.rank_temperature)
            loss = loss + cfg.rank_distill_weight * ranking
            logs["rank_distill"] = float(ranking.detach())
        if cfg.align_weight > 0:
            align = align_loss(zq, zp)
            loss = loss + cfg.align_weight * align
            logs["align"] = float(align.detach())
        if sentences is not None:
            z = enc([next(sentences) for _ in batch], cache=False)
            sentences_drawn[0] += len(batch)
            ident = identity_loss(z, train_adapters(z, "query"))
            loss = loss + cfg.identity_weight * ident
            logs["identity"] = float(ident.detach())
        if cfg.code_weight > 0:
            code = code_match_loss(model.quantizer, zq, zp, cfg.temperature)
            loss = loss + cfg.code_weight * code
            logs["code"] = float(code.detach())
        with torch.no_grad():
            acc = float(((zq @ zp.T).argmax(1) == torch.arange(len(batch), device=zq.device)).float().mean())
        return loss, {"train_q2p_acc": acc, **logs}, len(batch) * world

    def save(st, metrics, is_best):
        if teacher is not None:
            teacher.flush()
        st.data_position = batches.position
        ckpt = tc.base_checkpoint("phase2", cfg, parent["base_config"], parent["base_model_state_dict"], st,
                                  {**metrics, "before": before}, tc.parent_record(cfg.checkpoint), optimizer)
        ckpt["resume"]["batches_drawn"] = batches.batches
        ckpt["resume"]["sentences_drawn"] = sentences_drawn[0]
        ckpt["adapter_config"] = dict(adapters.config)
        ckpt["adapter_state_dict"] = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
        for key in ("lora_config", "lora_state_dict"):
            if key in parent:
                ckpt[key] = parent[key]
        save_checkpoint(ckpt, out_path)
        if is_best:
            copy_checkpoint(out_path, best_path)

    # 5. train, eval, checkpoint
    metrics = tc.run_training(cfg, optimizer=optimizer, params=params, train_step=train_step,
                              evaluate=lambda: evaluate_pairs(model, adapters, enc, held, cfg.eval_batch_size,
                                                              teacher_emb),
                              save=save, state=state, logger=logger, total_steps=cfg.max_steps, device=device,
                              best_key="code_match_rate", rank=rank, bar_keys=("train_q2p_acc",),
                              rate_name="pairs_per_s")
    logger.finish()
    tc.finish_distributed(adapters, rank)
    if rank == 0:
        print(f"wrote {out_path}")
    return {"metrics": metrics, "before": before, "output": out_path}


if __name__ == "__main__":
    tc.run_main(main, Phase2Config, PRESETS, __doc__)
