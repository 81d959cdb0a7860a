"""Phase 1a: distil all-MiniLM-L6-v2 into the k-mer encoder through a 1024-code VQ bottleneck.

    python vqvae_phase1_train.py --preset demo                        # bundled samples, CPU, minutes
    python vqvae_phase1_train.py --data hub --preset full             # WikiText-103 + C4, GPU
    python vqvae_phase1_train.py --data files --data_files "c4=c4.json.gz;wikitext=wiki.txt"
    torchrun --nproc_per_node 4 vqvae_phase1_train.py --data hub --preset full
    python vqvae_phase1_train.py --preset demo --resume               # continue a killed run

Steps: (1) config + seed, (2) data streams and teacher, (3) model and optimizer (or resume),
(4) continuous warm-up, k-means codebook init, VQ training with EMA codebook, diversity loss and
dead-code restarts, (5) eval + checkpoint at a fixed cadence.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import train_common as tc
from data_common import parse_data_files, parse_weights
from kmer_index import routing_transform
from teacher import Teacher, TeacherError
from train_common import CommonConfig, LoopState, UserError, opt
from vqvae_phase1_model import (KmerTokenizer, KmerVQVAE, KmerVQVAEConfig, codebook_health, copy_checkpoint,
                                load_checkpoint, save_checkpoint)
from vqvae_phase1a_data_webtext import DEFAULT_WEIGHTS, WEBTEXT_SOURCES, WindowStream, eval_windows, webtext_documents


@dataclass
class Phase1Config(CommonConfig):
    sources: str = opt(DEFAULT_WEIGHTS, "sources and weights, e.g. 'wikitext=0.5,c4=0.5' (also: wikipedia)")
    c4_docs: int = opt(200_000, "C4 documents streamed from the Hub", min=1)
    max_tokens_total: int = opt(200_000_000, "k-mers consumed before the run stops (0 = steps only)", min=0)
    # model (the architecture; later phases read it from the checkpoint)
    d_model: int = opt(384, "encoder width", min=8)
    n_layers: int = opt(4, "transformer blocks", min=1)
    n_heads: int = opt(4, "attention heads", min=1)
    num_codes: int = opt(1024, "codebook size K", min=2)
    code_dim: int = opt(0, "code space dim (0 = d_model)", min=0)
    kmer_len: int = opt(4, "bytes per k-mer", min=1, max=8)
    kmer_stride: int = opt(1, "bytes between k-mers", min=1)
    kmer_buckets: int = opt(32768, "hash buckets", min=2)
    num_hashes: int = opt(2, "hash functions per k-mer (embeddings summed)", min=1, max=4)
    word_hashes: int = opt(0, "hashes of each k-mer's whole word that it also looks up (0 = k-mers only; README "
                           "\"Filter quality\")", min=0, max=2)
    word_buckets: int = opt(65536, "rows of the word table (with --word_hashes)", min=2)
    window_size: int = opt(64, "encoder positions per window", min=1)
    kmer_pool: int = opt(4, "k-mers mean-pooled per position", min=1)
    bag_path: bool = opt(True, "the text vector is a learned-weight mean of all k-mer embeddings (before pooling) "
                         "plus what the blocks add; false: the mean of the blocks' outputs (README)")
    # losses and codebook
    commitment_weight: float = opt(0.25, "commitment loss weight", min=0)
    diversity_weight: float = opt(0.2, "diversity loss weight", min=0)
    continuous_weight: float = opt(1.0, "weight of the cosine loss on the continuous path", min=0)
    relational_weight: float = opt(0.0, "weight of an MSE between the batch's cosine matrices of decoded and "
                                        "target vectors, both minus the centre, in every stage (10 measured, not "
                                        "adopted: README)", min=0)
    ema_decay: float = opt(0.99, "codebook EMA decay", gt=0, max=1)
    vq_warmup_steps: int = opt(200, "continuous-only distillation steps before k-means init", min=0)
    kmeans_samples: int = opt(40_000, "encoder outputs for the k-means codebook init", min=2)
    dead_code_threshold: float = opt(0.1, "restart codes used < this x expected share B/K (0 = off)", min=0)
    dead_code_every: int = opt(50, "steps between dead-code checks", min=1)
    shuffle_buffer: int = opt(4096, "windows in the shuffle buffer", min=1)
    train_windows: int = opt(0, "distinct training windows, cycled as epochs (0 = the whole stream)", min=0)
    codebook_windows: int = opt(0, "unlabelled windows per step that train the codebook (EMA, k-means, restarts) "
                                "instead of the teacher-labelled batch (0 = the batch); see README", min=0)
    health_size: int = opt(50_000, "held-out windows for codebook health (student only, no teacher)", min=1)
    # word knowledge and the distillation objective (README "Filter quality")
    lexicon_size: int = opt(40_000, "most frequent training-text words that, with the teacher's whole-word vocabulary, "
                            "get teacher embeddings for the word stage and the static targets (0 = off)", min=0)
    lexicon_teacher_words: bool = opt(True, "add the teacher tokenizer's ~21.7k whole words to the lexicon")
    static_wordpieces: bool = opt(False, "static targets also count words outside the lexicon (names, technical "
                                  "terms), through the teacher tokenizer's pieces of them, instead of dropping "
                                  "them (README \"Filter quality\")")
    lexicon_domain_words: int = opt(0, "the most frequent words of Phase 1b's training text (its default academic and "
                                    "chat sources for --data sample/hub; the ones --data_files names for files) "
                                    "also join the lexicon (0 = none; README \"Filter quality\")", min=0)
    lexicon_steps: int = opt(300, "word-stage steps first: each k-mer window is one word, its target the teacher's "
                             "embedding of that word (0 = none; needs --lexicon_size)", min=0)
    bag_steps: int = opt(0, "steps after the word stage during which the transformer blocks (zero-initialised, so "
                         "each is the identity) are skipped and do not train: the encoder is the bag of its k-mer "
                         "embeddings, which learns word meaning ~4x faster per CPU second; README", min=0)
    lexicon_batch_size: int = opt(256, "words per word-stage step", min=2)
    word_rehearsal: int = opt(0, "words per step after the word stage whose teacher vectors keep training the encoder "
                              "beside the windows (continuous loss only), so window training does not wear the word "
                              "knowledge away (0 = off; needs --lexicon_size; README \"Filter quality\")", min=0)
    static_windows: int = opt(32, "extra unlabelled windows per step whose target is the SIF-weighted bag of their "
                              "words' teacher vectors (no teacher call; 0 = off; needs --lexicon_size)", min=0)
    center_targets: bool = opt(True, "cosine losses compare decoded and target minus the targets' mean direction")
    short_windows: float = opt(0.0, "share of the teacher-labelled windows cut to a shorter prefix (at a space; a fixed "
                               "length per window text, so the teacher cache still holds them): queries are short, "
                               "the windows are not (0 = off; README)", min=0, max=1)
    target_whiten: float = opt(0.0, "window losses compare decoded and target (centred) after scaling each principal "
                               "axis of the held-out targets by variance^(-P/2), as half-whitened lists do (P; "
                               "0 = off; README)", min=0, max=1)
    contrastive_weight: float = opt(1.0, "weight of the in-batch InfoNCE between decoded vectors and targets", min=0)
    contrastive_temperature: float = opt(0.1, "InfoNCE temperature (0.1, not 0.05: README \"Adopted: InfoNCE at "
                                              "temperature 0.1\")", gt=0)
    contrastive_soft: float = opt(0.0, "InfoNCE labels: 0 one-hot; T > 0 the targets' own in-batch softmax at "
                                       "temperature T (0.1 and 0.2 measured, not adopted: README)", min=0)
    contrastive_bank: int = opt(0, "targets of earlier batches (of the same stage) that each decoded vector must also "
                                "rank its own target above in the InfoNCE: harder negatives than a batch holds "
                                "(0 = the batch alone; not kept in checkpoints: a resumed run refills it)", min=0)
    table_lr_scale: float = opt(1.0, "the k-mer tables' learning rate as a multiple of --lr (each row is looked up "
                                "by few steps, so it moves slowly at the lr that suits the layers; a resumed run "
                                "keeps the scale it started with; README \"Filter quality\")", gt=0)
    sparse_embeddings: bool = opt(False, "the k-mer tables get sparse gradients and a lazy AdamW that updates only the "
                                  "rows a step looked up: a step's cost no longer grows with --kmer_buckets (CPU; "
                                  "README \"Sparse table updates\")")
    weight_average: float = opt(0.98, "decay of the running average of the weights that trains the codebook and is "
                                "evaluated and saved as the model (0 = off, the live weights); see README", min=0,
                                max=0.9999)


PRESETS = {
    "tiny": dict(data="sample", d_model=32, n_layers=1, n_heads=2, num_codes=16, kmer_buckets=1024, window_size=16,
                 word_hashes=2, word_buckets=1024,
                 batch_size=16, max_steps=30, warmup_steps=5, vq_warmup_steps=10, kmeans_samples=128,
                 eval_every=10, eval_size=64, log_every=5, dead_code_every=5, shuffle_buffer=64,
                 max_tokens_total=0, health_size=64, lexicon_size=300, lexicon_teacher_words=False, lexicon_steps=5,
                 lexicon_batch_size=32, static_windows=8, sparse_embeddings=True,
                 output="runs/tiny/kmer_vqvae_phase1.pt"),
    # demo: the bundled samples' three web-text sources; 12,000 teacher-labelled windows train the
    # encoder and the rest of the stream (unlabelled) trains the codebook (README "Codebook health"). 256
    # codes: 64 codebook windows a step then reach each code as often as full's 256 windows reach
    # 1,024 (README "Keeping the codebook healthy after the k-means init")
    # demo: README "Filter quality". Word stage (1,000 steps of 256 words), then the bag stage (the
    # block skipped) on 32 teacher-labelled + 32 static-target windows a step, then 200 steps with the
    # transformer block training too. 256 codes (README "Keeping the codebook healthy"). 262,144 hash
    # buckets with sparse table updates: fewer k-mers share a row, and a step costs the same as with
    # 32,768 (README "Sparse table updates"). d_model 256: +0.01 at 1% on SQuAD for +2 minutes
    # (README "Filter quality"). The lexicon also holds Phase 1b's text's 20,000 most frequent words (+7,123
    # words): over two seeds, SciTLDR (no phase trains on it) rose with centred IVF and nothing fell measurably.
    # The k-mer tables learn at 10x the lr (1e-2): a row is looked up by few of the steps (README "Filter quality").
    # Each k-mer also looks up its word in a 65,536-row table that starts at zero (2 hashes): over two seeds, exact
    # search and the lists rose on SQuAD, SciTLDR and MedQuAD, for ~20% more Phase 1a time (README "Filter quality").
    # 1,200 bag steps (1,600 the round before, 3,000 before that): the held-out cosine peaks ~400 steps after the
    # k-means init and then falls while the training loss still falls, so the init comes at step 1,800 (800
    # steps of vq warmup), 400 bag steps follow it, then the block's 200 (README "Adopted: a shorter bag stage").
    # The InfoNCE at weight 2 (1 until 2026-12-06): README "Adopted: the InfoNCE at twice the weight".
    # Weight 4 measured level with 2 over two seeds (3 cells up, 2 down): README "Measured, not adopted: weight 4".
    # 12,000 labelled windows (8,000 until this round): with this schedule, over two seeds against 8,000 windows
    # and 2,800 steps, 12 recall cells up measurably and 3 down (all own codes); no half-whitened cell falls
    # measurably (README "Adopted: 12,000 windows, 2,400 steps").
    "demo": dict(data="sample", d_model=256, n_layers=1, n_heads=4, num_codes=256, kmer_buckets=262144, word_hashes=2,
                 batch_size=32, static_windows=32, lr=1e-3, table_lr_scale=10.0, sparse_embeddings=True,
                 lexicon_domain_words=20_000, contrastive_weight=2.0,
                 max_steps=2400, warmup_steps=50, lexicon_steps=1000, bag_steps=1200, vq_warmup_steps=800,
                 kmeans_samples=6000, eval_every=800, eval_size=500, health_size=12_000, log_every=50,
                 train_windows=12000, codebook_windows=64, sources="wikitext=0.15,c4=0.25,wikipedia=0.6",
                 shuffle_buffer=2048, max_tokens_total=0, output="runs/demo/kmer_vqvae_phase1.pt"),
    # full: the demo's recipe at scale (README "Filter quality"; run on a GPU on the bundled data only, README
    # "GPU"): 2,000 word steps, 500 bag steps, then the 4 blocks train; 128 static-target windows beside
    # every 256 labelled ones. The 200M k-mer budget ends the run at step 4,072 (measured) and the lr
    # schedule ends with it.
    # 262,144 hash buckets, as the demo; dense table updates (cheap on a GPU; sparse ones unmeasured there).
    "full": dict(data="hub", kmer_buckets=262144, word_hashes=2, batch_size=256, static_windows=128, max_steps=6000,
                 warmup_steps=200, lexicon_steps=2000, bag_steps=500, vq_warmup_steps=800, eval_every=500,
                 eval_size=50_000, lexicon_size=100_000, lexicon_domain_words=20_000, output="kmer_vqvae_phase1.pt"),
}


# cpu: the demo's recipe, longer, for a 2-core CPU in well under 2 hours (README "The CPU recipe"):
# 30,000 teacher-labelled windows (most of the bundled web text) on the demo's schedule shape, stretched:
# 1,000 word steps, the k-means init at step 3,600, 400 more bag steps, then the block's 400 (4,400 steps).
# Until this session 16,000 windows over 8,000 steps: the held-out cosine fell from 0.655 (step 2,000) to
# 0.604, and over three k-means draws the lists rose on SQuAD and SciTLDR, fell on MedQuAD (README "Adopted:
# 30,000 windows on the demo's schedule"); 30,000 windows over 8,000 steps fell below this on SQuAD, above it
# on MedQuAD. The demo's d_model 256 (384 measured level on SQuAD, lower on CISI at 5%, 1.6x slower) and 262,144 sparse buckets.
# The recipe keeps the InfoNCE at weight 1: weight 2 (the demo's since 2026-12-06) measured mixed on it, one seed
# (5 cells up, 3 down, Phase 2's code match 0.208 -> 0.146; README "Rerun on an fp32-only CPU").
PRESETS["cpu"] = {**PRESETS["demo"], "contrastive_weight": 1.0, "max_steps": 4400, "bag_steps": 3000,
                  "vq_warmup_steps": 2600, "eval_every": 800, "log_every": 100, "train_windows": 30000,
                  "output": "runs/cpu/kmer_vqvae_phase1.pt"}


def shorten(window: str, share: float, min_chars: int = 24) -> str:
    """With probability `share` (fixed per text), the window's prefix of a length drawn uniformly from
    [min_chars, len), cut back to the last space; otherwise the window itself."""
    h = zlib.crc32(window.encode("utf-8"))
    if len(window) <= min_chars or (h % 10_000) >= share * 10_000:
        return window
    end = min_chars + (h // 10_000) % (len(window) - min_chars)
    cut = window.rfind(" ", min_chars // 2, end + 1)
    return window[:cut if cut > 0 else end]


def model_config(cfg) -> dict:
    names = {f.name for f in dataclasses.fields(KmerVQVAEConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def check_architecture(ckpt_config: dict, requested: dict, path: str):
    diff = [f"{k}={ckpt_config.get(k)!r} (asked {v!r})" for k, v in requested.items()
            if k in ckpt_config and ckpt_config[k] != v]
    if diff:
        raise UserError(f"{path} was trained with {', '.join(diff[:4])}: drop those flags to resume it, "
                        f"or choose a new --output")


# the loss settings a resumed run takes from its command line (the optimizer state keeps the lr groups)
OBJECTIVE_FLAGS = ("contrastive_temperature", "contrastive_soft", "contrastive_weight", "relational_weight",
                   "continuous_weight", "center_targets", "diversity_weight", "commitment_weight", "static_wordpieces",
                   "target_whiten")


def objective_changes(started: dict, cfg) -> list[str]:
    """The loss settings of this command line that differ from those the checkpoint's run started with
    (e.g. a default changed between the two versions of this script)."""
    return [f"--{k} {getattr(cfg, k)!r} (it started with {started[k]!r})" for k in OBJECTIVE_FLAGS
            if k in started and started[k] != getattr(cfg, k)]


@torch.no_grad()
def embed_windows(model, tok, windows, device, batch_size=256) -> torch.Tensor:
    """z_e for many windows (no grad, eval mode), for k-means and evaluation."""
    out = []
    for i in range(0, len(windows), batch_size):
        b = tok.encode_windows(windows[i:i + batch_size])
        with tc.autocast(device):
            out.append(model.encode_windows(b["input_ids"].to(device), b["attention_mask"].to(device)).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_distillation(model, tok, windows, targets, device, health_windows=(), batch_size=256) -> dict:
    """Teacher cosine on both paths, the mean-embedding baseline, and codebook health (on
    `health_windows` when given: health needs no teacher, so it can use many more windows; when
    they start with `windows`, as the phase scripts' do, those are not encoded a second time)."""
    was = model.training
    model.eval()
    cos_q, cos_e, idx = [], [], []
    for i in range(0, len(windows), batch_size):
        b = tok.encode_windows(windows[i:i + batch_size])
        t = targets[i:i + batch_size].to(device).float()
        with tc.autocast(device):
            out = model(b["input_ids"].to(device), b["attention_mask"].to(device), teacher=t)
            zq = model.quantizer.decode_indices(out["indices"])
            dec_q = model.decode(zq)
        cos_q.append(F.cosine_similarity(dec_q.float(), t, dim=-1))
        cos_e.append(F.cosine_similarity(out["decoded_e"].float(), t, dim=-1))
        idx.append(out["indices"].cpu())
    indices = torch.cat(idx)
    initialized = bool(model.quantizer.initialized)
    if initialized and len(health_windows) > len(windows):
        health_windows = list(health_windows)
        known = len(windows) if health_windows[:len(windows)] == list(windows) else 0
        rest = model.quantizer(embed_windows(model, tok, health_windows[known:], device))["indices"].cpu()
        indices = torch.cat([indices[:known], rest])
    model.train(was)
    t = targets.float()
    baseline = F.cosine_similarity(t, F.normalize(t.mean(0), dim=0)[None], dim=-1).mean()
    m = {"cos_q": float(torch.cat(cos_q).mean()), "cos_e": float(torch.cat(cos_e).mean()),
         "cos_mean_baseline": float(baseline), "initialized": initialized}
    if not initialized:  # before k-means the codebook is random: no quantised or health numbers
        m["cos_q"] = 0.0
        return m
    m.update(codebook_health(indices, model.config.num_codes))
    m["_code_usage"] = torch.bincount(indices, minlength=model.config.num_codes).tolist()
    return m


class TargetBank:
    """The last `size` training targets (minus their centre) of the current stage, as extra InfoNCE negatives
    (--contrastive_bank). A new stage (words -> windows) empties it: their centres and kinds differ."""

    def __init__(self, size: int):
        self.size, self.stage, self.rows = size, None, None

    def get(self, stage):
        if stage != self.stage:
            self.stage, self.rows = stage, None
        return self.rows

    def add(self, targets: torch.Tensor):
        if self.size:
            rows = targets if self.rows is None else torch.cat([targets, self.rows])
            self.rows = rows[:self.size]  # newest first


class CodebookUpkeep:
    """After each step: update the weight average; then, with the averaged weights applied, the
    codebook statistics (unless the training forward keeps them), the k-means init at the end of
    warm-up, and dead-code restarts."""

    def __init__(self, cfg, model, tok, stream, device, world, average: tc.WeightAverage):
        # stream: windows for k-means; without teacher work it can be the whole train stream, wider
        # than the (teacher-limited) training pool, so the codes cover text the encoder never fit
        self.cfg, self.model, self.tok, self.stream, self.device = cfg, model, tok, stream, device
        self.average = average
        self.recent = collections.deque(maxlen=max(1, 4096 // cfg.batch_size))
        self.global_batch = (cfg.codebook_windows or cfg.batch_size) * world  # windows per EMA update
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.restarted = 0
        self.batch_windows: list[str] = []  # the step's training windows (when they train the codebook)
        self.init_step = cfg.lexicon_steps + cfg.vq_warmup_steps  # the k-means init: after words and warm-up

    def __call__(self, step, logs):
        self.average.update()
        if not bool(self.model.quantizer.initialized) and step < self.init_step:
            return logs  # nothing reads the averaged weights before the k-means init: no swap
        with self.average.applied():
            return self._upkeep(step, logs)

    def _observe(self):
        """The codebook statistics from this step's windows, encoded by the averaged weights: the
        unlabelled --codebook_windows, or else the training batch once more."""
        q = self.model.quantizer
        if q.track_batch or not bool(q.initialized):
            return
        windows = self.stream.take(self.cfg.codebook_windows) if self.cfg.codebook_windows else self.batch_windows
        z = embed_windows(self.model, self.tok, windows, self.device)
        q.observe(z)
        self.recent.append(z)

    def _upkeep(self, step, logs):
        q, cfg = self.model.quantizer, self.cfg
        self._observe()
        if not bool(q.initialized) and step >= self.init_step:
            windows = self.stream.take(cfg.kmeans_samples)
            z = embed_windows(self.model, self.tok, windows, self.device)
            q.init_from_samples(z, self.global_batch, seed=cfg.seed)
            logs["kmeans_samples"] = z.shape[0]
        elif bool(q.initialized) and cfg.dead_code_threshold > 0 and step % cfg.dead_code_every == 0 and self.recent:
            n = q.restart_dead_codes(torch.cat(list(self.recent)), self.global_batch, cfg.dead_code_threshold,
                                     generator=self.gen)
            self.restarted += n
            logs["restarted"] = n
        if bool(q.initialized):
            expected = self.global_batch / q.K
            logs["run_ppl"] = q.running_perplexity()
            logs["active_pct"] = 100.0 * float((q.ema_count >= cfg.dead_code_threshold * expected).float().mean())
        return logs


def domain_lexicon_documents(cfg):
    """Phase 1b's training documents (cycled once), for the lexicon's domain words."""
    from vqvae_phase1b_data_domains import DOMAIN_SOURCES, HUB_DEFAULT, SAMPLE_DEFAULT, domain_documents
    files = parse_data_files(cfg.data_files)
    if cfg.data == "files":
        weights = {n: 1.0 for n in files if n in DOMAIN_SOURCES}
        if not weights:
            raise UserError(f"--lexicon_domain_words needs Phase 1b's files in --data_files (any of "
                            f"{', '.join(DOMAIN_SOURCES)}), or --lexicon_domain_words 0")
    else:
        weights = parse_weights(HUB_DEFAULT if cfg.data == "hub" else SAMPLE_DEFAULT, DOMAIN_SOURCES)
    return domain_documents(cfg.data, "train", weights, files=files, seed=cfg.seed, cycle=False,
                            skip_unavailable=cfg.data == "hub")


def build_lexicon(cfg, docs, teacher, rank):
    """The word list and its teacher embeddings (cached like any teacher target), or None when off."""
    if not cfg.lexicon_size or not (cfg.lexicon_steps or cfg.static_windows):
        return None
    from lexicon import Lexicon
    import time
    t0 = time.time()
    more = ((domain_lexicon_documents(cfg), cfg.lexicon_domain_words),) if cfg.lexicon_domain_words else ()
    lex = Lexicon.build(docs("train", False), teacher, cfg.lexicon_size, teacher_vocab=cfg.lexicon_teacher_words,
                        more=more, pieces=cfg.static_wordpieces and bool(cfg.static_windows))
    teacher.flush()
    if rank == 0:
        print(f"lexicon: {len(lex.vocab):,} words with teacher embeddings ({time.time() - t0:.0f} s)")
    return lex


def main(cfg: Phase1Config) -> dict:
    # 1. config, ranks, seed
    rank, world, device, out_path, best_path, run_dir = tc.start_run(cfg, "kmer_vqvae_phase1.pt")
    mcfg = model_config(cfg)
    weights = parse_weights(cfg.sources, WEBTEXT_SOURCES)
    files = parse_data_files(cfg.data_files)

    # 2. data and teacher
    tok = KmerTokenizer.from_config(mcfg)
    docs = lambda split, cycle: webtext_documents(cfg.data, split, weights, files, seed=cfg.seed,
                                                  c4_docs=cfg.c4_docs, rank=rank if split == "train" else 0,
                                                  world=world if split == "train" else 1, cycle=cycle)
    health_windows = eval_windows(docs("validation", False), tok, max(cfg.eval_size, cfg.health_size))
    held_out = health_windows[:cfg.eval_size]
    if not held_out:
        raise UserError("no held-out windows: the validation files are empty")
    stream = WindowStream(lambda: docs("train", cfg.train_windows == 0), tok, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer, pool_size=cfg.train_windows)
    try:
        teacher = Teacher.load(cfg.teacher, str(device), cfg.teacher_cache or None, cfg.teacher_batch_size,
                               cfg.teacher_precision)
    except TeacherError as e:
        raise UserError(str(e)) from None
    held_targets = teacher.embed(held_out)
    lex = build_lexicon(cfg, docs, teacher, rank)
    win_center = held_targets.float().mean(0).to(device) if cfg.center_targets else None
    static_center = lex.static_targets(held_out).mean(0).to(device) if lex is not None and cfg.center_targets \
        else None
    word_center = lex.center.to(device) if lex is not None and cfg.center_targets else None
    win_transform = torch.from_numpy(routing_transform(
        held_targets.float().numpy(), True, cfg.target_whiten)[1]).to(device) if cfg.target_whiten else None

    # 3. model, optimizer, resume
    model = KmerVQVAE(**mcfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    blocks = {id(p) for p in model.encoder.blocks.parameters()}
    tables = {id(t.weight) for t in model.encoder.kmer_tables()} if cfg.table_lr_scale != 1 else set()
    optimizer = tc.adamw([{"params": [p for p in params if id(p) in tables], "lr_base": cfg.table_lr_scale},
                          {"params": [p for p in params if id(p) not in blocks | tables]},
                          {"params": [p for p in params if id(p) in blocks], "blocks": True}],
                         sparse_tables=model.encoder.kmer_tables() if cfg.sparse_embeddings else (),
                         lr=cfg.lr, weight_decay=cfg.weight_decay)
    bag_end = cfg.lexicon_steps + cfg.bag_steps if (cfg.lexicon_steps or cfg.bag_steps) else 0
    if bag_end and mcfg.get("residual_init", "zero") != "zero":
        raise UserError("--lexicon_steps/--bag_steps skip the transformer blocks, which is exact only with "
                        "residual_init 'zero'; set both to 0 to train the blocks from the start")
    state = LoopState()
    live, static_skip = None, 0
    if cfg.resume and os.path.exists(out_path):
        ckpt = load_checkpoint(out_path, phases=("phase1a",))
        check_architecture(ckpt["base_config"], mcfg, out_path)
        model.load_state_dict(ckpt["base_model_state_dict"])  # the averaged weights
        live = ckpt["resume"].get("live_weights")
        static_skip = ckpt["resume"].get("static_position", 0)
        state = tc.resume_state(ckpt, optimizer, stream.skip)
        if rank == 0:
            print(f"resuming {out_path} at step {state.step} ({state.tokens_seen:,} k-mers seen)")
            changed = objective_changes(ckpt.get("train_args", {}), cfg)
            if changed:
                print(f"note: the resumed run trains with {', '.join(changed)}; pass the values it started "
                      f"with to keep its objective")
    average = tc.WeightAverage(model, cfg.weight_average)
    if live is not None:
        average.load_live_state(live, state.step)
    train_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                            find_unused_parameters=bag_end > 0) if world > 1 else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    logger = tc.RunLogger(cfg, run_dir, "phase1a", rank, resumed_step=state.step)
    # The codebook's own stream: with --codebook_windows it leaves out the teacher-labelled windows,
    # whose encoder outputs are fitted (overfit, on a small pool) and so unlike held-out text's.
    labelled = set(eval_windows(docs("train", False), tok, cfg.train_windows)) \
        if cfg.codebook_windows and cfg.train_windows else set()
    kmeans_stream = WindowStream(lambda: docs("train", True), tok, seed=cfg.seed + 1, shuffle_buffer=cfg.shuffle_buffer,
                                 exclude=labelled)
    upkeep = CodebookUpkeep(cfg, model, tok, kmeans_stream, device, world, average)
    static_stream = WindowStream(lambda: docs("train", True), tok, seed=cfg.seed + 2,
                                 shuffle_buffer=cfg.shuffle_buffer, exclude=labelled)
    static_stream.skip(static_skip)  # a resumed run continues where the killed one stopped
    # the training forward may update the codebook itself only when it runs the weights evaluated
    model.quantizer.track_batch = cfg.codebook_windows == 0 and not cfg.weight_average
    if rank == 0:
        print(f"phase 1a: {sum(p.numel() for p in model.parameters()):,} parameters, {len(held_out)} held-out "
              f"windows, teacher on {device}, data={cfg.data}")

    # 4. the step
    loss_args = dict(continuous_weight=cfg.continuous_weight, relational_weight=cfg.relational_weight,
                     contrastive_weight=cfg.contrastive_weight, contrastive_temperature=cfg.contrastive_temperature,
                     contrastive_soft=cfg.contrastive_soft)
    bank = TargetBank(cfg.contrastive_bank)

    def forward(step, ids, mask, targets, center, transform=None):
        """The training forward, with the earlier targets of this stage (words, or windows) as more negatives."""
        out = train_model(ids, mask, teacher=targets, target_center=center, target_transform=transform,
                          contrastive_bank=bank.get(step < cfg.lexicon_steps), **loss_args)
        bank.add(out["targets_c"])
        return out

    def word_batch(step, size):
        """`size` vocabulary words (a fresh order every epoch), each its own window, and their teacher vectors."""
        per_epoch = max(1, len(lex.vocab) // size)
        order = torch.randperm(len(lex.vocab), generator=torch.Generator().manual_seed(cfg.seed + step // per_epoch))
        ids = order[(step % per_epoch) * size:][:size]
        b = tok.encode_windows([lex.vocab[i] for i in ids])
        return b["input_ids"].to(device), b["attention_mask"].to(device), lex.embeddings[ids].to(device)

    def word_step(step):
        """The word stage: a batch of vocabulary words, each its own window, against its teacher vector."""
        ids, mask, targets = word_batch(step, cfg.lexicon_batch_size)
        out = forward(step, ids, mask, targets, word_center)
        return out["loss"], {"cos_e": float(out["cos_e"])}, int(mask.sum()) * world

    def rehearse(step):
        """Words beside the windows after the word stage: their continuous loss, and their cosine for the log."""
        ids, mask, targets = word_batch(step, cfg.word_rehearsal)
        out = train_model(ids, mask, teacher=targets, target_center=word_center, quantize=False, **loss_args)
        return out["loss"], float(out["cos_e"])

    def stage(step):
        """Before each step's learning rates are set: in the bag stage the blocks are the identity and
        their group's rate is 0; the tables' group keeps its multiple of --lr throughout."""
        bag = step < bag_end
        model.encoder.bypass_blocks = bag
        for g in optimizer.param_groups:
            g["lr_scale"] = 0.0 if (bag and g.get("blocks")) else g.get("lr_base", 1.0)

    def train_step(step):
        if step < cfg.lexicon_steps and lex is not None:
            return word_step(step)
        windows = stream.take(cfg.batch_size)
        if len(windows) < cfg.batch_size:
            raise UserError("the training stream ran dry; check the data files")
        if cfg.short_windows:
            windows = [shorten(w, cfg.short_windows) for w in windows]
        targets = teacher.embed(windows).to(device).float()
        center = win_center.expand_as(targets) if win_center is not None else None
        if lex is not None and cfg.static_windows:  # unlabelled windows, static targets: no teacher call
            extra = static_stream.take(cfg.static_windows)
            windows = windows + extra
            targets = torch.cat([targets, lex.static_targets(extra).to(device)])
            if center is not None:
                center = torch.cat([center, static_center.expand(len(extra), -1)])
        b = tok.encode_windows(windows)
        mask = b["attention_mask"].to(device)
        out = forward(step, b["input_ids"].to(device), mask, targets, center, win_transform)
        loss = out["loss"]
        logs = {"cos_e": float(out["cos_e"])}
        if "cos_q" in out:
            loss = loss + cfg.diversity_weight * out["diversity_term"]
            logs.update(cos_q=float(out["cos_q"]), commit=float(out["commit"]), diversity=float(out["diversity"]))
        if lex is not None and cfg.word_rehearsal:
            word_loss, logs["cos_w"] = rehearse(step)
            loss = loss + word_loss
        if model.quantizer.track_batch:
            upkeep.recent.append(out["z_e"].detach().float())
        else:  # the upkeep after the optimizer step feeds the codebook (CodebookUpkeep._observe)
            upkeep.batch_windows = windows
        return loss, logs, int(mask.sum()) * world

    def save(st, metrics, is_best):
        teacher.flush()
        st.data_position = stream.position
        live = average.live_state()
        with average.applied():  # the checkpoint's model is the averaged weights
            ckpt = tc.base_checkpoint("phase1a", cfg, model.config_dict(), model.state_dict(), st, metrics,
                                      None, optimizer)
            ckpt["resume"]["live_weights"] = live
            ckpt["resume"]["static_position"] = static_stream.position
            save_checkpoint(ckpt, out_path)
            if is_best:
                copy_checkpoint(out_path, best_path)

    health = []  # (step, perplexity, utilisation) of every eval after the k-means init, this process

    def evaluate():
        with average.applied():
            m = evaluate_distillation(model, tok, held_out, held_targets, device, health_windows)
        if "perplexity" in m:
            health.append((state.step, m["perplexity"], m["utilisation"]))
        return m

    # 5. train, eval, checkpoint
    metrics = tc.run_training(
        cfg, optimizer=optimizer, params=params, train_step=train_step, state=state, logger=logger,
        evaluate=evaluate,
        save=save, total_steps=cfg.max_steps, max_tokens=cfg.max_tokens_total, device=device,
        after_step=upkeep, before_step=stage, best_key="cos_q", rank=rank,
        bar_keys=("cos_q", "cos_e", "run_ppl", "active_pct"))
    teacher.flush()
    logger.finish()
    tc.finish_distributed(model, rank)
    if rank == 0:
        print(f"wrote {out_path} (teacher texts encoded this run: {teacher.calls:,})")
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on "
                  f"{torch.cuda.get_device_name(device)}")
    return {"metrics": metrics, "output": out_path, "teacher_calls": teacher.calls, "step": state.step,
            "tokens_seen": state.tokens_seen, "health": health}


if __name__ == "__main__":
    tc.run_main(main, Phase1Config, PRESETS, __doc__)
