"""Chat (SFT) and preference shards from the real data kit (DATA.md §5) plus small generated task families.

Layout: out_dir/chat/{train,val}-XXXXXX.tar and out_dir/pref/{train,val}-XXXXXX.tar, one `json` member per
sample. Chat json: {messages: [{role, content}], source, family, task, item_id, answer, match} (the last message
is the assistant's gold answer). Preference json: {messages (the prompt turns), chosen (= the gold answer),
rejected, rejection_kind, source, family, task, item_id, answer}. Splits are by source item (`split_of`), and a
preference pair comes from the same split as its chat example. `match` says how to score the answer:
"strict" (format-sensitive) or "normalised" (`exact_match`).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from webdataset import TarWriter

from data.chat_sources import chatterbot_dialogs, evals_examples, wordnet_examples
from data.chat_tasks import brown_sentences, brown_words, fill_splits, preference_pairs, synthetic_family
from data.fetch import PINS, cached_dirs, fetch_many, fetch_text
from data.shards import BadSample, SkipCounter, iter_samples
from data.speech_kit import held_out_text
from data.text_kit import brown_documents

CHAT_KEYS = ("chatterbot", "evals", "wordnet")
CHAT_ROLES = ("system", "user", "assistant", "ipython")  # == llm.tokenizer.ROLES (kept here: no tokenizer import)
DEFAULT_CFG = {
    "seed": 0,
    "val_mod": 20,  # an item is held out when sha1(item_id) % val_mod == 0 (about 5%)
    "max_chars": 360,  # whole-dialog characters (about 96 tokens at a tiny BPE's ~3.8 bytes per token)
    "shard_size": 5000,
    "n_copy": 4000, "n_puzzle": 4000, "n_arith": 4000, "n_format": 4000,  # train examples per family
    "n_repeat": 12000,  # verbatim repeats under the ASR prompt (the copying speech SFT needs from the frozen LM)
    "n_define": 4000, "n_example": 1500,  # WordNet families
    "evals_cap": 2000,  # train examples per evals set at most
    "chatterbot_cap": 5000,
    "pref_fraction": 0.5,  # share of chat examples that also get a preference pair
}
SYNTHETIC = ("copy", "repeat", "puzzle", "format", "arith")


def fetch_chat(cache_dir, progress: bool = True) -> dict:
    """Fetch the pinned chatterbot-corpus, evals and WordNet archives; return {key: extracted dir}."""
    return fetch_many(CHAT_KEYS, Path(cache_dir), progress)


def cached_chat_dirs(cache_dir) -> dict | None:
    """The verified chat + Brown cache dirs if all are present in cache_dir, else None (never fetches)."""
    return cached_dirs((*CHAT_KEYS, "brown"), cache_dir)


def resolve_cfg(cfg: dict | None) -> dict:
    """DEFAULT_CFG updated by `cfg`; an unknown key is an error naming it."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CFG))
    if unknown:
        raise ValueError(f"unknown chat kit config key(s) {unknown}; known: {sorted(DEFAULT_CFG)}")
    return {**DEFAULT_CFG, **cfg}


def _n_val(n_train: int, val_mod: int) -> int:
    return max(1, round(n_train / max(1, val_mod - 1))) if n_train else 0


def _real_split(examples: Iterable[dict], cap: int, cfg: dict, tag: str, one_per_item: bool) -> dict:
    rows = list(examples)
    random.Random(f"{cfg['seed']}:{tag}").shuffle(rows)
    return fill_splits(iter(rows), cap, _n_val(cap, cfg["val_mod"]), cfg["val_mod"], one_per_item)


def collect_examples(dirs: dict, cfg: dict | None = None) -> dict[str, list[dict]]:
    """All chat examples by split from the source dirs present in `dirs` (keys brown, chatterbot, evals, wordnet;
    a missing key skips that source; `arith` needs none)."""
    cfg = resolve_cfg(cfg)
    vm, seed = cfg["val_mod"], cfg["seed"]
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    parts = []
    sentences: list[str] = []
    words: list[str] = []
    if dirs.get("brown"):
        docs = list(brown_documents(dirs["brown"]))
        sentences, words = brown_sentences(docs), brown_words(docs)
    for fam in SYNTHETIC:
        if fam != "arith" and not (sentences and words):
            continue
        n = cfg[f"n_{fam}"]
        pool = [t for t in sentences if not held_out_text(t)] if fam == "repeat" else sentences
        parts.append(synthetic_family(fam, pool, words, n, _n_val(n, vm), vm, seed))
    if dirs.get("chatterbot"):
        parts.append(_real_split(chatterbot_dialogs(dirs["chatterbot"], cfg["max_chars"]), cfg["chatterbot_cap"],
                                 cfg, "chatterbot", one_per_item=False))
    if dirs.get("evals"):
        by_set: dict[str, list[dict]] = {}
        for ex in evals_examples(dirs["evals"], cfg["max_chars"], seed):
            by_set.setdefault(ex["family"], []).append(ex)
        for fam, rows in sorted(by_set.items()):
            parts.append(_real_split(rows, cfg["evals_cap"], cfg, f"evals:{fam}", one_per_item=False))
    if dirs.get("wordnet"):
        for fam in ("define", "example"):
            n = cfg[f"n_{fam}"]
            parts.append(fill_splits(wordnet_examples(dirs["wordnet"], fam, seed), n, _n_val(n, vm), vm))
    for part in parts:
        for split in splits:
            splits[split].extend(part[split])
    overlap = {e["item_id"] for e in splits["train"]} & {e["item_id"] for e in splits["val"]}
    if overlap:
        raise AssertionError(f"{len(overlap)} items in both splits, e.g. {sorted(overlap)[:3]}")
    for split, rows in splits.items():
        random.Random(f"{seed}:shuffle:{split}").shuffle(rows)
    return splits


def write_json_shards(records: Iterable[dict], out_dir, prefix: str, shard_size: int = 5000) -> list[Path]:
    """Write records as `json` members to out_dir/<prefix>-XXXXXX.tar (keys without dots; private `_` keys dropped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    try:
        for i, rec in enumerate(records):
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                writer = TarWriter(str(paths[-1]), mtime=0.0)
            body = {k: v for k, v in rec.items() if not k.startswith("_")}
            writer.write({"__key__": f"{prefix}_{i:07d}", "json": json.dumps(body, ensure_ascii=False).encode()})
    finally:
        if writer is not None:
            writer.close()
    return paths


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 2) if xs else 0.0


def _stats(rows: list[dict], shards: list[Path], pref: bool) -> dict:
    prompt = [sum(len(m["content"]) for m in (r["messages"] if pref else r["messages"][:-1])) for r in rows]
    answer = [len(r["chosen"] if pref else r["messages"][-1]["content"]) for r in rows]
    out = {
        "examples": len(rows), "items": len({r["item_id"] for r in rows}), "shards": [p.name for p in shards],
        "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
        "by_family": dict(sorted(Counter(r["family"] for r in rows).items())),
        "by_source_family": dict(sorted(Counter(f"{r['source']}/{r['family']}" for r in rows).items())),
        "mean_prompt_chars": _mean(prompt), "mean_answer_chars": _mean(answer),
        "mean_turns": _mean(len(r["messages"]) + pref for r in rows),
        "share_le_360_chars": round(sum(p + a <= 360 for p, a in zip(prompt, answer)) / max(1, len(rows)), 4),
    }
    if pref:
        out["by_rejection_kind"] = dict(sorted(Counter(r["rejection_kind"] for r in rows).items()))
        out["mean_rejected_chars"] = _mean(len(r["rejected"]) for r in rows)
    return out


def _attribution() -> str:
    rows = [("chatterbot", "chatterbot-corpus (Gunther Cox)", "PyPI wheel", "BSD-3-Clause"),
            ("evals", "OpenAI evals registry data: sarcasm, quartz, socialiqa, syllables, food, which_is_heavier, "
             "last_word_nth, first-letters, anagrams, born_first, largest_country, bigrams, logic-statements",
             "PyPI wheel", "MIT (Social IQA: CC-BY-4.0)"),
            ("wordnet", "WordNet 3.0, Princeton University", "Debian package", "WordNet 3.0 licence"),
            ("brown", "Brown Corpus (generated copy/puzzle/format tasks)", "npm package", "redistribution permitted")]
    lines = ["# Attribution for the built chat and preference kit", "",
             "Derived data: never commit it. Sources (pinned and sha256-checked by `data/fetch.py`):", "",
             "| source | fetched as | sha256 | licence |", "|---|---|---|---|"]
    lines += [f"| {what} | {how} `{PINS[k].spec}` | `{PINS[k].sha256}` | {lic} |" for k, what, how, lic in rows]
    return "\n".join(lines) + "\n"


def write_chat_kit(dirs: dict, out_dir, cfg: dict | None = None) -> dict:
    """Build chat and preference shards from source dirs (see `collect_examples`); write manifest.json in
    out_dir/chat and out_dir/pref; return the manifest."""
    cfg = resolve_cfg(cfg)
    splits = collect_examples(dirs, cfg)
    out_dir = Path(out_dir)
    manifest: dict = {"cfg": cfg, "sources": sorted(k for k in dirs if dirs[k]), "chat": {}, "pref": {}}
    for kind in ("chat", "pref"):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
        for stale in [*(out_dir / kind).glob("train-*.tar"), *(out_dir / kind).glob("val-*.tar")]:
            stale.unlink()
    for split, rows in splits.items():
        rng = random.Random(f"{cfg['seed']}:pref:{split}")
        pairs = preference_pairs(rows, rng)
        pairs = rng.sample(pairs, round(len(pairs) * cfg["pref_fraction"]))
        chat_shards = write_json_shards(rows, out_dir / "chat", split, cfg["shard_size"])
        pref_shards = write_json_shards(pairs, out_dir / "pref", split, cfg["shard_size"])
        manifest["chat"][split] = _stats(rows, chat_shards, pref=False)
        manifest["pref"][split] = _stats(pairs, pref_shards, pref=True)
    text = json.dumps(manifest, indent=1) + "\n"
    (out_dir / "chat" / "manifest.json").write_text(text)
    (out_dir / "pref" / "manifest.json").write_text(text)
    (out_dir / "chat" / "ATTRIBUTION.md").write_text(_attribution())
    return manifest


def build_chat_kit(cache_dir, out_dir, cfg: dict | None = None) -> dict:
    """Fetch (or reuse) the chat sources and Brown, then `write_chat_kit` into out_dir; return the manifest."""
    dirs = fetch_chat(cache_dir, progress=False)
    dirs["brown"] = fetch_text(Path(cache_dir), progress=False)["brown"]
    return write_chat_kit(dirs, out_dir, cfg)


def decode_chat_sample(sample: dict) -> dict:
    """Decode a chat/preference sample's `json` member (strict UTF-8, a dict with a non-empty `messages` list of
    {role in system/user/assistant/ipython, content: str}; `chosen` and `rejected` both strings or both absent).
    Returns the dict plus "key"; raises BadSample("bad_chat", detail) otherwise."""
    raw = sample.get("json")
    if raw is None:
        raise BadSample("bad_chat", f"no json member in {sample.get('__key__')}")
    try:
        rec = json.loads(bytes(raw).decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadSample("bad_chat", f"unreadable json: {e}") from None
    if not isinstance(rec, dict):
        raise BadSample("bad_chat", f"expected an object, got {type(rec).__name__}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadSample("bad_chat", "messages is not a non-empty list")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise BadSample("bad_chat", f"bad message {str(m)[:80]}")
    has = [k in rec for k in ("chosen", "rejected")]
    if any(has) and not (all(has) and isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str)):
        raise BadSample("bad_chat", "chosen/rejected must both be strings")
    rec["key"] = sample.get("__key__")
    return rec


def iter_chat(paths: Iterable, skips: SkipCounter | None = None) -> Iterator[dict]:
    """Yield decoded chat/preference samples from shards, skipping and counting bad tars, members and samples."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_samples(paths, skips):
        try:
            yield decode_chat_sample(sample)
        except BadSample as e:
            skips.add(e.reason)
