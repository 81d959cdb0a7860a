"""Loading data sources from the Hub, local files of the same schema, or the bundled samples.

A `Source` names a Hub dataset (id, config, splits, columns) and a formatter that turns one
record into what the phase trains on. The same formatter runs whatever the origin:
    --data hub                       the Hugging Face Hub (streaming)
    --data files --data_files "c4=a.json.gz;wikitext=w.raw;c4.validation=v.json.gz"
    --data sample                    the files under data/ (see data/README.md)
No silent fallback: a source that cannot load stops the run with one line saying which and how
to run offline (or, where a phase allows it, is skipped loudly with --skip_unavailable).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from train_common import REPO, UserError

SAMPLE_DIR = os.path.join(REPO, "data")


@dataclass
class Source:
    name: str
    hub_id: str
    config: str | None = None
    splits: dict = field(default_factory=lambda: {"train": "train", "validation": "validation"})
    columns: tuple = ("text",)
    hub_kwargs: dict = field(default_factory=dict)  # e.g. data_dir / data_files on the Hub
    gated: bool = False
    alternative: str = ""  # ungated alternative to name in the gated message
    sample: dict = field(default_factory=dict)  # split -> path under data/
    local_reader: Callable | None = None  # path -> Hub-schema records for a raw local format, else None

    def describe(self) -> str:
        return f"{self.hub_id}" + (f" ({self.config})" if self.config else "")


def parse_data_files(spec: str) -> dict[str, list[str]]:
    """'a=x.json,y.json;a.validation=z.json' -> {'a': [...], 'a.validation': [...]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            raise UserError(f"--data_files entry {part!r} must look like NAME=PATH[,PATH] (entries separated by ';')")
        name, paths = part.split("=", 1)
        out[name.strip()] = [p.strip() for p in paths.split(",") if p.strip()]
    return out


def _builder(path: str) -> str:
    p = path.lower().removesuffix(".gz").removesuffix(".zst")
    for ext, b in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"),
                   (".tsv", "csv"), (".txt", "text"), (".raw", "text"), (".tokens", "text")):
        if p.endswith(ext):
            return b
    raise UserError(f"cannot tell the format of {path}: use .jsonl/.json(.gz), .parquet, .csv or .txt/.raw")


def _hub_error(src: Source, err: Exception | str | None) -> UserError:
    why = err if isinstance(err, str) else f"{type(err).__name__}" if err is not None \
        else "offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) is set"
    return UserError(f"source '{src.name}' ({src.describe()}) could not be loaded from the Hub: {why}. "
                     f"Offline, run with --data sample --preset demo (the bundled samples), or --data files "
                     f"--data_files {src.name}=PATH "
                     f"(a local file with columns {list(src.columns)})")


_HUB_REACHABLE: dict[str, str | None] = {}


def _hub_unreachable() -> str | None:
    """One quick connection to the Hub's endpoint (3 s, once per process) before streaming: without the
    offline variables the datasets client retries for ~25 s, printing a line each time, before failing.
    -> why it is unreachable, or None."""
    if "why" not in _HUB_REACHABLE:
        import socket
        from urllib.parse import urlparse
        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=3).close()
            _HUB_REACHABLE["why"] = None
        except OSError as e:
            _HUB_REACHABLE["why"] = f"{host}:{port} is unreachable ({type(e).__name__})"
    return _HUB_REACHABLE["why"]


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_records(src: Source, split: str, mode: str, files: dict[str, list[str]] | None = None,
                 streaming: bool = True) -> Iterable[dict]:
    """Records of one source and split ('train' or 'validation') in the Hub schema."""
    import datasets
    datasets.logging.set_verbosity_error()
    if mode == "hub":
        if src.gated and not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
            raise UserError(f"source '{src.name}' ({src.hub_id}) is gated: accept its licence on the Hub and set "
                            f"HF_TOKEN, or use the ungated alternative {src.alternative}")
        if _offline():
            raise _hub_error(src, None)
        why = _hub_unreachable()
        if why:
            raise _hub_error(src, why)
        try:
            ds = datasets.load_dataset(src.hub_id, src.config, split=src.splits[split], streaming=streaming,
                                       **src.hub_kwargs)
        except Exception as e:  # network, missing repo, schema drift: one line, no traceback
            raise _hub_error(src, e) from None
        return ds
    if mode == "sample":
        rel = src.sample.get(split)
        if rel is None:
            raise UserError(f"source '{src.name}' has no bundled {split} sample; use --data files or --data hub")
        paths = [os.path.join(SAMPLE_DIR, rel)]
    else:
        files = files or {}
        key = src.name if split == "train" else f"{src.name}.validation"
        paths = files.get(key) or []
        if not paths:
            raise UserError(f"--data files needs {key}=PATH in --data_files for source '{src.name}' "
                            f"(Hub schema: columns {list(src.columns)})")
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"data file not found: {p} (source '{src.name}')")
    if src.local_reader is not None:  # raw local formats (e.g. the original release files)
        raw = [src.local_reader(p) for p in paths]
        if all(r is not None for r in raw):
            return [rec for r in raw for rec in r]
    builder = _builder(paths[0])
    ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=streaming)
    cols = set(ds.column_names or []) if ds.column_names is not None else set(next(iter(ds)).keys())
    missing = [c for c in src.columns if c not in cols]
    if missing:
        raise UserError(f"{paths[0]} lacks column(s) {missing} for source '{src.name}': it must have the Hub "
                        f"schema of {src.describe()} (columns {list(src.columns)}); found {sorted(cols)}")
    return ds


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def held_out(key: str, percent: float) -> bool:
    """Deterministic split: the same key is always on the same side, on every machine."""
    return stable_hash(key) % 10_000 < percent * 100


def mix(streams: dict[str, Callable[[], Iterator]], weights: dict[str, float], seed: int,
        cycle: bool = True) -> Iterator[tuple[str, object]]:
    """Weighted, seeded interleave of restartable streams; a finished stream restarts (cycle) or drops."""
    rng = np.random.default_rng(seed)
    names = sorted(n for n in streams if weights.get(n, 0) > 0)  # fixed order: same draws in every process
    iters = {n: iter(streams[n]()) for n in names}
    while names:
        w = np.array([weights[n] for n in names], dtype=np.float64)
        name = names[rng.choice(len(names), p=w / w.sum())]
        try:
            yield name, next(iters[name])
        except StopIteration:
            if cycle:
                iters[name] = iter(streams[name]())
                try:
                    yield name, next(iters[name])
                    continue
                except StopIteration:
                    pass
            names.remove(name)


def parse_weights(spec: str, known: Iterable[str], what: str = "source") -> dict[str, float]:
    """'c4=0.7,wikitext=0.3' or 'c4,wikitext' (equal) -> weights; misspelt names get one line."""
    known = list(known)
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in known:
            raise UserError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"weight of {what} {name!r} must be a number, got {w!r}") from None
        if out[name] < 0:
            raise UserError(f"weight of {what} {name!r} must be >= 0")
    if not out or sum(out.values()) <= 0:
        raise UserError(f"no {what} selected: give at least one of {', '.join(known)}")
    return out


def open_sources(sources: dict[str, Source], weights: dict[str, float], split: str, mode: str,
                 files: dict, skip_unavailable: bool = False) -> dict[str, Callable[[], Iterable]]:
    """Open every weighted source (fail fast); with skip_unavailable drop failures loudly."""
    opened = {}
    for name, w in weights.items():
        if w <= 0:
            continue
        try:
            ds = load_records(sources[name], split, mode, files)
            opened[name] = (lambda d=ds: d)
        except UserError as e:
            if not skip_unavailable:
                raise
            print(f"WARNING: skipping unavailable source '{name}' (--skip_unavailable): {e}", file=sys.stderr)
    if not opened:
        raise UserError("no source could be loaded; see the messages above")
    return opened


def iter_shard(it: Iterable, rank: int, world: int) -> Iterator:
    """Every world-th item, starting at rank: ranks never see the same example."""
    for i, x in enumerate(it):
        if i % world == rank:
            yield x
