"""Phase 1b data: academic and conversational text, one formatter per source, mixed by weights.

    from vqvae_phase1b_data_domains import domain_documents, DOMAIN_SOURCES
    docs = domain_documents("sample", "train", source_weights={"arxiv": 1, "hh_rlhf": 1})

Chat turns keep their order and get light, consistent role markers ("User: " / "Assistant: ").
Local files may be in the Hub schema or in the original release formats found in the wild
(PubMedQA `ori_pqal.json`, Topical-Chat JSON, DailyDialog text, SciTLDR JSONL): the reader
converts those into the Hub schema, so the same formatter runs on both.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Callable, Iterator

from data_common import Source, held_out, iter_shard, mix, open_sources

USER, ASSISTANT = "User: ", "Assistant: "
_ROLE = {"user": USER, "human": USER, "prompter": USER, "assistant": ASSISTANT, "gpt": ASSISTANT,
         "chatgpt": ASSISTANT, "bing": ASSISTANT, "bard": ASSISTANT, "system": "System: "}


def _turns(turns, role_key: str, text_key: str) -> str:
    lines = []
    for t in turns or []:
        text = (t.get(text_key) or "").strip()
        if text:
            lines.append(_ROLE.get(str(t.get(role_key, "")).lower(), USER) + text)
    return "\n".join(lines)


def fmt_arxiv(r):
    title, abstract = " ".join((r.get("title") or "").split()), " ".join((r.get("abstract") or "").split())
    return f"{title}. {abstract}" if title else abstract


def fmt_pubmed(r):
    return " ".join((r.get("abstract") or "").split())


def fmt_oasst(r):
    if r.get("lang", "en") != "en":
        return ""
    return _ROLE.get(r.get("role", ""), USER) + (r.get("text") or "").strip()


def fmt_ultrachat(r):
    return _turns(r.get("messages"), "role", "content")


def fmt_alpaca(r):
    prompt = "\n".join(x.strip() for x in (r.get("instruction"), r.get("input")) if x and x.strip())
    return f"{USER}{prompt}\n{ASSISTANT}{(r.get('output') or '').strip()}"


_HH = re.compile(r"\n\n(Human|Assistant):")


def fmt_hh_rlhf(r):
    parts = _HH.split("\n\n" + (r.get("chosen") or "").lstrip("\n"))
    # parts: ['', 'Human', ' text', 'Assistant', ' text', ...]
    return "\n".join(_ROLE[parts[i].lower()] + parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)
                     if parts[i + 1].strip())


def fmt_sharegpt(r):
    return _turns(r.get("conversations"), "from", "value")


def fmt_lmsys(r):
    return _turns(r.get("conversation"), "role", "content")


# ---- readers for original release formats of local files (Hub-schema files need none) ----

def read_pubmed_local(path: str):
    """PubMedQA ori_pqal.json (pmid -> {QUESTION, CONTEXTS}) -> pubmed-summarization rows."""
    if not path.endswith(".json"):
        return None
    data = json.load(open(path, encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "CONTEXTS" in v for v in data.values()):
        return None
    return [{"article": "", "abstract": " ".join(_as_list(v["CONTEXTS"])), "question": v.get("QUESTION", "")}
            for v in data.values()]


def _as_list(x):
    return ast.literal_eval(x) if isinstance(x, str) and x.startswith("[") else list(x)


def read_arxiv_local(path: str):
    """SciTLDR JSONL ({source: [sentences], title}) -> arXiv-abstract rows."""
    if not path.endswith(".jsonl"):
        return None
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if not rows or "source" not in rows[0]:
        return None
    return [{"title": r.get("title", ""), "abstract": " ".join(r["source"])} for r in rows]


def read_chat_local(path: str):
    """Topical-Chat JSON or DailyDialog text -> UltraChat rows ({messages: [{role, content}]})."""
    if path.endswith(".txt") and "__eou__" in open(path, encoding="utf-8").read(4096):
        rows = []
        for line in open(path, encoding="utf-8"):
            turns = [t.strip() for t in line.split("__eou__") if t.strip()]
            rows.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)]})
        return rows
    if path.endswith(".json"):
        data = json.load(open(path, encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, dict) and "content" in v for v in data.values()):
            return [{"prompt_id": k, "messages": [{"role": "user" if t.get("agent") == "agent_1" else "assistant",
                                                   "content": t.get("message", "")} for t in v["content"]]}
                    for k, v in data.items()]
    return None


TRAIN_ONLY = {"train": "train", "validation": None}  # held-out carved from train by hash
DOMAIN_SOURCES: dict[str, tuple[str, Source, Callable]] = {
    "arxiv": ("academic", Source("arxiv", "gfissore/arxiv-abstracts-2021", splits=TRAIN_ONLY,
                                 columns=("abstract",), local_reader=read_arxiv_local,
                                 sample={"train": "academic/arxiv_train.jsonl.gz",
                                         "validation": "academic/arxiv_validation.jsonl.gz"}), fmt_arxiv),
    "pubmed": ("academic", Source("pubmed", "ccdv/pubmed-summarization", "document", columns=("abstract",),
                                  local_reader=read_pubmed_local,
                                  sample={"train": "academic/pubmed_train.jsonl.gz",
                                          "validation": "academic/pubmed_validation.jsonl.gz"}), fmt_pubmed),
    "oasst": ("conversational", Source("oasst", "OpenAssistant/oasst1", columns=("text", "role")), fmt_oasst),
    "ultrachat": ("conversational", Source("ultrachat", "HuggingFaceH4/ultrachat_200k",
                                           splits={"train": "train_sft", "validation": "test_sft"},
                                           columns=("messages",), local_reader=read_chat_local,
                                           sample={"train": "conversational/topical_chat_train.jsonl.gz",
                                                   "validation": "conversational/topical_chat_validation.jsonl.gz"}),
                  fmt_ultrachat),
    "alpaca": ("conversational", Source("alpaca", "tatsu-lab/alpaca", splits=TRAIN_ONLY,
                                        columns=("instruction", "input", "output")), fmt_alpaca),
    "hh_rlhf": ("conversational", Source("hh_rlhf", "Anthropic/hh-rlhf", splits={"train": "train", "validation": "test"},
                                         columns=("chosen",), hub_kwargs={"data_dir": "helpful-base"},
                                         sample={"train": "conversational/hh_rlhf_train.jsonl.gz",
                                                 "validation": "conversational/hh_rlhf_validation.jsonl.gz"}),
                fmt_hh_rlhf),
    "sharegpt": ("conversational", Source("sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", splits=TRAIN_ONLY,
                                          columns=("conversations",)), fmt_sharegpt),
    "lmsys": ("conversational", Source("lmsys", "lmsys/lmsys-chat-1m", splits=TRAIN_ONLY, columns=("conversation",),
                                       gated=True, alternative="allenai/WildChat-1M (--data files with its "
                                       "'conversation' column under the name lmsys)"), fmt_lmsys),
}
HUB_DEFAULT = "arxiv=0.25,pubmed=0.25,ultrachat=0.15,oasst=0.1,alpaca=0.05,hh_rlhf=0.1,sharegpt=0.1"
SAMPLE_DEFAULT = "arxiv=0.25,pubmed=0.25,ultrachat=0.25,hh_rlhf=0.25"


def effective_weights(source_weights: dict[str, float], domain_weights: dict[str, float]) -> dict[str, float]:
    """Source weights normalised within each domain, times the domain's weight."""
    totals: dict[str, float] = {}
    for name, w in source_weights.items():
        totals[DOMAIN_SOURCES[name][0]] = totals.get(DOMAIN_SOURCES[name][0], 0) + w
    return {n: w / totals[DOMAIN_SOURCES[n][0]] * domain_weights.get(DOMAIN_SOURCES[n][0], 0)
            for n, w in source_weights.items() if totals[DOMAIN_SOURCES[n][0]] > 0}


def _formatted(ds, fmt, want_held_out: bool | None, percent: float) -> Callable[[], Iterator[str]]:
    def gen():
        for r in ds:
            text = fmt(r)
            if text and (want_held_out is None or held_out(text, percent) == want_held_out):
                yield text
    return gen


def domain_documents(mode: str, split: str, source_weights: dict[str, float],
                     domain_weights: dict[str, float] | None = None, files: dict | None = None, seed: int = 0,
                     rank: int = 0, world: int = 1, cycle: bool = True, skip_unavailable: bool = False,
                     held_out_percent: float = 2.0) -> Iterator[str]:
    """Formatted, mixed documents of the selected sources (train cycles; validation runs once)."""
    weights = effective_weights(source_weights, domain_weights or {"academic": 1.0, "conversational": 1.0})
    sources = {n: DOMAIN_SOURCES[n][1] for n in weights}
    # Hub sources with no validation split: both sides come from train, split by a text hash.
    carve = [n for n in weights if mode == "hub" and sources[n].splits.get("validation") is None]
    opened = {}
    for split_name, names in (("train", carve), (split, [n for n in weights if n not in carve])):
        if names:
            opened.update(open_sources({n: sources[n] for n in names}, {n: weights[n] for n in names},
                                       split_name, mode, files or {}, skip_unavailable))
    streams = {n: _formatted(ds(), DOMAIN_SOURCES[n][2], (split == "validation") if n in carve else None,
                             held_out_percent) for n, ds in opened.items()}
    live = {n: weights[n] for n in streams}
    docs = (doc for _, doc in mix(streams, live, seed, cycle=cycle))
    return iter_shard(docs, rank, world)
