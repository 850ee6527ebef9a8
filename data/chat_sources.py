"""Readers for the real instruction/dialogue sources of DATA.md §5: chatterbot-corpus, OpenAI evals, WordNet.

Each reader yields examples in the shape of `data.chat_tasks` ({messages, source, family, task, item_id, answer,
match, _wrong}); item ids name the underlying source item (chatterbot: the opening user turn; evals: the prompt;
WordNet: the lemma) so that the item-level split keeps every dialog about one item on one side.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterator

import yaml

from data.chat_tasks import normalise_answer

WN_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_LEMMA = re.compile(r"[a-z][a-z_'-]*[a-z]")


def _example(messages, source, family, task, item_id, match="normalised", wrong=()) -> dict:
    answer = messages[-1]["content"]
    return {"messages": messages, "source": source, "family": family, "task": task, "item_id": item_id,
            "answer": answer, "match": match, "_wrong": [(k, w) for k, w in wrong if w.strip() != answer.strip()]}


def chatterbot_dialogs(cb_dir, max_chars: int = 360) -> Iterator[dict]:
    """Each chatterbot conversation (yaml.safe_load of `*.yml`) as alternating user/assistant turns, cut to the
    longest prefix that ends on an assistant turn and fits `max_chars`; family "dialogue", task = file stem."""
    seen = set()
    for path in sorted(Path(cb_dir).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        convs = data.get("conversations") if isinstance(data, dict) else None
        for conv in convs if isinstance(convs, list) else []:
            if not isinstance(conv, list) or not all(isinstance(t, str) and t.strip() for t in conv):
                continue  # a non-string turn (a YAML bool or number) would break the alternation
            msgs, total = [], 0
            for i, turn in enumerate(conv):
                total += len(turn.strip())
                if total > max_chars:
                    break
                msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn.strip()})
            if len(msgs) % 2:
                msgs.pop()
            key = json.dumps(msgs)
            if not msgs or key in seen:
                continue
            seen.add(key)
            opening = normalise_answer(msgs[0]["content"]) or msgs[0]["content"]
            yield _example(msgs, "chatterbot", "dialogue", path.stem, "cb:" + opening)


def evals_examples(evals_dir, max_chars: int = 360, seed: int = 0) -> Iterator[dict]:
    """Single-turn chat-format evals samples ({"input": [system?, user], "ideal": str | [str, ...]}) with the
    first ideal as the assistant answer; family = the eval's folder name. Sets with at most 12 distinct answers
    (yes/no, A/B/C, 0/1; a yes/no answer's opposite counts too) get another option as their wrong option."""
    rng = random.Random(seed)
    for path in sorted(Path(evals_dir).rglob("*.jsonl")):
        family, rows, seen = path.parent.name, [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            inp, ideal = rec.get("input"), rec.get("ideal")
            golds = [ideal] if isinstance(ideal, str) else ideal if isinstance(ideal, list) else []
            golds = [g.strip() for g in golds if isinstance(g, str) and g.strip()]
            if not golds or not isinstance(inp, list) or not inp:
                continue
            if not all(isinstance(m, dict) and m.get("role") in ("system", "user") and isinstance(m.get("content"), str)
                       and m["content"].strip() for m in inp):
                continue
            if sum(m["role"] == "user" for m in inp) != 1 or inp[-1]["role"] != "user":
                continue
            msgs = [{"role": m["role"], "content": m["content"].strip()} for m in inp]
            msgs.append({"role": "assistant", "content": golds[0]})
            item = f"evals/{family}:" + hashlib.sha1(json.dumps(msgs[:-1]).encode()).hexdigest()[:16]
            if sum(len(m["content"]) for m in msgs) > max_chars or item in seen:
                continue
            seen.add(item)
            ex = _example(msgs, "evals", family, family, item)
            if len(golds) > 1:
                ex["answers"] = golds
            rows.append(ex)
        options = sorted({ex["answer"] for ex in rows} | {_flip(ex["answer"]) for ex in rows} - {None})
        for ex in rows:
            wrong = [o for o in options if normalise_answer(o) != normalise_answer(ex["answer"])]
            if len(options) <= 12 and wrong:
                ex["_wrong"] = [("wrong_option", rng.choice(wrong))]
            yield ex


def _flip(answer: str) -> str | None:
    """The opposite of a yes/no-style answer in the same case ("NO" -> "YES", "Y" -> "N"), else None."""
    other = {"yes": "no", "no": "yes", "y": "n", "n": "y", "true": "false", "false": "true"}.get(answer.lower())
    if other is None:
        return None
    return other.upper() if answer.isupper() else other.capitalize() if answer[0].isupper() else other


def _parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """WordNet gloss -> (definition, quoted example sentences)."""
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
    definition = gloss.split('"')[0].strip().rstrip(";").strip()
    return definition, examples


def wordnet_senses(wn_dir) -> dict[tuple[str, str], dict]:
    """{(lemma, pos name): {"tagged": n senses seen in SemCor, "senses": [(definition, examples), ...] by
    frequency}} from WordNet's index.* and data.* files."""
    wn_dir = Path(wn_dir)
    out = {}
    for pos in WN_POS:
        synsets = {}
        for line in (wn_dir / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # the licence header
            head, _, gloss = line.partition(" | ")
            synsets[head.split()[0]] = _parse_gloss(gloss.strip())
        for line in (wn_dir / f"index.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            f = line.split()
            if line.startswith("  ") or len(f) < 6:
                continue
            n_syn, n_ptr = int(f[2]), int(f[3])
            offsets = f[6 + n_ptr: 6 + n_ptr + n_syn]
            out[(f[0], pos)] = {"tagged": int(f[5 + n_ptr]), "senses": [synsets[o] for o in offsets if o in synsets]}
    return out


def _mentions(example: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", example, re.I) is not None


def wordnet_examples(wn_dir, family: str, seed: int = 0, max_def: int = 100) -> Iterator[dict]:
    """WordNet dialogs about common lemmas (at least one SemCor-tagged sense), one per lemma, in shuffled order.

    family "define": "What does X mean?" (sense 1 of the lemma's most tagged part of speech), "What does the
    <pos> X mean?", or "What does X mean in this sentence? <example>" -> that sense's definition; the wrong
    option is another sense's definition. family "example": "Use the word X in a sentence." -> a WordNet example.
    """
    if family not in ("define", "example"):
        raise ValueError(f"unknown WordNet family {family!r}; expected define or example")
    rng = random.Random(f"{seed}:wordnet:{family}")
    by_lemma: dict[str, list] = {}
    for (lemma, pos), entry in wordnet_senses(wn_dir).items():
        if entry["tagged"] > 0 and entry["senses"] and _LEMMA.fullmatch(lemma) and len(lemma) >= 3:
            by_lemma.setdefault(lemma, []).append((entry["tagged"], pos, entry["senses"]))
    lemmas = sorted(by_lemma)
    rng.shuffle(lemmas)
    for lemma in lemmas:
        word, item = lemma.replace("_", " "), "wn:" + lemma
        entries = sorted(by_lemma[lemma], key=lambda e: -e[0])
        if family == "example":
            cands = [e for _, _, senses in entries for _, exs in senses for e in exs
                     if _mentions(e, word) and len(e) <= max_def]
            if cands:
                prompt = rng.choice((f"Use the word {word} in a sentence.",
                                     f"Give an example sentence with the word {word}."))
                yield _example([{"role": "user", "content": prompt},
                                {"role": "assistant", "content": rng.choice(cands)}], "wordnet", "example",
                               "use_in_sentence", item)
            continue
        choices = []
        _, pos, senses = entries[0]
        if len(senses[0][0]) <= max_def:
            choices.append(("define", f"What does {word} mean?", senses[0][0], senses[1:]))
        for _, pos, senses in entries:
            if len(senses[0][0]) <= max_def:
                choices.append(("define_pos", f'What does the {pos} "{word}" mean?', senses[0][0], senses[1:]))
            for i, (definition, exs) in enumerate(senses):
                for e in exs:
                    if _mentions(e, word) and len(definition) <= max_def and len(e) <= max_def:
                        others = senses[:i] + senses[i + 1:]
                        choices.append(("define_in_context", f"What does {word} mean in this sentence? {e}",
                                        definition, others))
        if not choices:
            continue
        task, prompt, definition, others = rng.choice(choices)
        wrong = [("wrong_option", d) for d, _ in others if d != definition and len(d) <= max_def][:1]
        yield _example([{"role": "user", "content": prompt}, {"role": "assistant", "content": definition}],
                       "wordnet", "define", task, item, wrong=wrong)
