"""Small chat tasks a tiny model can learn, item-level splits, preference rejections and exact-match scoring.

Families generated from real text (Brown sentences and words) and from numbers:
`copy` (copy or extract from a sentence), `puzzle` (letter and word puzzles), `arith` (small arithmetic) and
`format` (a copy/puzzle/arith question wrapped in a format instruction). Every example is a dict
{messages, source, family, task, item_id, answer, match} plus a private `_wrong` list of (kind, wrong answer).
The split is a pure function of the underlying item (sentence, word or number pair), so an item never appears
in both splits, whichever family or template uses it.
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from collections import Counter
from typing import Callable, Iterable, Iterator

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_WORD_TOKEN = re.compile(r"""^["'(]*[A-Za-z][A-Za-z'-]*[.,;:!?"')]*$""")
_SENT_SPLIT = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["')]))\s+(?=["'(]?[A-Z])""")
_ABBREV = re.compile(r"(Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Col|Gov|Rep|Sen|No|Co|Corp|Inc|Ltd|Lt|Capt|Sgt|Prof|Rev|Mt|Ft|"
                     r"Ave|Jan|Feb|Mar|Apr|Aug|Sept?|Oct|Nov|Dec|vs|U\.S|etc)\.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def split_of(item_id: str, val_mod: int = 20) -> str:
    """Return "val" for the items whose sha1(item_id) is 0 mod `val_mod`, else "train" (stable across runs)."""
    return "val" if int(hashlib.sha1(item_id.encode("utf-8")).hexdigest()[:12], 16) % val_mod == 0 else "train"


def normalise_answer(s: str) -> str:
    """SQuAD/VQA-style answer normalisation: lowercase, punctuation to spaces, number words zero..ten to digits,
    drop the articles a/an/the, collapse whitespace."""
    s = str(s).lower().translate(_PUNCT)
    s = " ".join(_NUMBER_WORDS.get(w, w) for w in s.split())
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, gold, strict: bool = False) -> bool:
    """True if `pred` matches `gold` (a string or a list of accepted strings) after `normalise_answer`.

    `strict=True` compares whitespace-stripped strings as they are (for format-following answers, where case and
    brackets are the point). A gold that normalises to nothing (e.g. the letter "a") is compared lowercased,
    punctuation stripped, articles kept.
    """
    golds = [gold] if isinstance(gold, str) else list(gold)
    for g in golds:
        if strict:
            if str(pred).strip() == str(g).strip():
                return True
            continue
        ng = normalise_answer(g)
        if ng:
            if normalise_answer(pred) == ng:
                return True
        elif " ".join(str(pred).lower().translate(_PUNCT).split()) == " ".join(str(g).lower().translate(_PUNCT).split()):
            return True
    return False


def _core(token: str) -> str:
    """A token without its leading/trailing punctuation ("(Hello," -> "Hello")."""
    return re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", token)


def _sentences(para: str) -> Iterator[str]:
    """Split a paragraph at . ! ? before a capital, but not after an abbreviation or an initial ("Mr.", "J.")."""
    buf = ""
    for piece in _SENT_SPLIT.split(" ".join(para.split())):
        buf = f"{buf} {piece}" if buf else piece
        last = buf.split()[-1]
        if not (_ABBREV.fullmatch(last) or re.fullmatch(r"[A-Z]\.", last)):
            yield buf
            buf = ""
    if buf:
        yield buf


def brown_sentences(docs: Iterable[dict], min_words: int = 4, max_words: int = 12, max_chars: int = 90) -> list[str]:
    """Short clean sentences (each token a word with optional punctuation) from text documents, deduplicated."""
    seen, out = set(), []
    for doc in docs:
        for para in doc["text"].split("\n\n"):
            for sent in _sentences(para):
                toks = sent.split()
                if not (min_words <= len(toks) <= max_words and len(sent) <= max_chars):
                    continue
                if not (sent.lstrip("\"'(")[:1].isupper() and sent.rstrip("\"')")[-1] in ".!?" and sent.count('"') % 2 == 0
                        and all(_WORD_TOKEN.match(t) for t in toks)):
                    continue
                if sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return out


def brown_words(docs: Iterable[dict], min_count: int = 5, min_len: int = 3, max_len: int = 10) -> list[str]:
    """Lowercase alphabetic words seen at least `min_count` times, sorted."""
    counts = Counter(w for doc in docs for w in re.findall(r"\b[a-z]+\b", doc["text"]))
    return sorted(w for w, c in counts.items() if c >= min_count and min_len <= len(w) <= max_len)


def _ex(family: str, task: str, item_id: str, prompt: str, answer: str, wrong=(), source: str = "brown",
        match: str = "normalised") -> dict:
    """One single-turn example."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "source": source, "family": family, "task": task, "item_id": item_id, "answer": answer,
            "match": match, "_wrong": [(k, w) for k, w in wrong if w and w.strip() != answer.strip()]}


def copy_task(sentence: str, rng: random.Random) -> dict:
    """Copy or extract from a sentence: the nth/first/last word, the whole sentence, or its word count."""
    words = [_core(t) for t in sentence.split()]
    item = "sent:" + sentence
    kind = rng.choice(("nth", "nth", "first", "last", "copy", "count"))
    if kind == "nth":
        n = rng.randrange(min(len(words), len(ORDINALS)))
        near = words[n + 1] if n + 1 < len(words) else words[n - 1]
        return _ex("copy", "nth_word", item, f"Repeat the {ORDINALS[n]} word of: {sentence}", words[n],
                   [("wrong_option", near)])
    if kind == "first":
        return _ex("copy", "first_word", item, f"What is the first word of this sentence? {sentence}", words[0],
                   [("wrong_option", words[1])])
    if kind == "last":
        return _ex("copy", "last_word", item, f"What is the last word of this sentence? {sentence}", words[-1],
                   [("wrong_option", words[-2])])
    if kind == "count":
        n = len(words)
        return _ex("copy", "count_words", item, f"How many words are in this sentence? {sentence}", str(n),
                   [("wrong_option", str(n + rng.choice((-1, 1))))])
    toks = sentence.split()
    i = rng.randrange(1, len(toks) - 1)
    dropped = " ".join(toks[:i] + toks[i + 1:])
    return _ex("copy", "copy_sentence", item, f"Copy the sentence: {sentence}", sentence,
               [("corrupted", dropped)], match="strict")


REPEAT_PROMPT = "Repeat after me in English:"  # the speech ASR system prompt (data.speech_tasks.ASR_PROMPT, English)


def repeat_task(sentence: str, rng: random.Random) -> dict:
    """Repeat the user's sentence verbatim under the speech ASR system prompt. A frozen LM fed speech embeddings can
    only transcribe if it can copy its input (experiments/speech/NOTES.md: the text oracle)."""
    toks = sentence.split()
    i = rng.randrange(1, len(toks) - 1) if len(toks) > 2 else 0
    ex = _ex("repeat", "repeat", "repeat:" + sentence, sentence, sentence,
             [("corrupted", " ".join(toks[:i] + toks[i + 1:]))], match="strict")
    ex["messages"].insert(0, {"role": "system", "content": REPEAT_PROMPT})
    return ex


def _other_letter(c: str) -> str:
    return "b" if c == "a" else chr(ord(c) - 1)


def puzzle_task(word: str, rng: random.Random) -> dict:
    """A letter/word puzzle on one word: first/last letter, spell backwards, letter count, spell out, contains."""
    item = "word:" + word
    kind = rng.choice(("first", "last", "backwards", "length", "spell", "contains"))
    if kind == "first":
        return _ex("puzzle", "first_letter", item, f"What is the first letter of {word}?", word[0],
                   [("wrong_option", _other_letter(word[0]))])
    if kind == "last":
        return _ex("puzzle", "last_letter", item, f"What is the last letter of {word}?", word[-1],
                   [("wrong_option", _other_letter(word[-1]))])
    if kind == "backwards":
        rev = word[::-1]
        i = rng.randrange(len(word) - 1)
        swapped = rev[:i] + rev[i + 1] + rev[i] + rev[i + 2:]
        return _ex("puzzle", "backwards", item, f"Spell {word} backwards.", rev,
                   [("wrong_option", word), ("corrupted", swapped)], match="strict")
    if kind == "length":
        return _ex("puzzle", "length", item, f"How many letters are in {word}?", str(len(word)),
                   [("wrong_option", str(len(word) + rng.choice((-1, 1))))])
    if kind == "spell":
        return _ex("puzzle", "spell_out", item, f"Spell {word} letter by letter.", "-".join(word),
                   [("corrupted", "-".join(word[:-1])), ("wrong_option", word)], match="strict")
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice([c for c in string.ascii_lowercase
                                                                     if c not in word] or ["q"])
    yes = letter in word
    return _ex("puzzle", "contains", item, f'Does the word "{word}" contain the letter {letter}? Answer yes or no.',
               "yes" if yes else "no", [("wrong_option", "no" if yes else "yes")])


def arith_task(a: int, b: int, rng: random.Random) -> dict:
    """Small arithmetic on the pair (a, b): plus, minus (non-negative) or times (times only for a, b <= 12)."""
    lo, hi = sorted((a, b))
    item = f"pair:{lo},{hi}"
    ops = ["plus", "minus"] + (["times"] if hi <= 12 else [])
    op = rng.choice(ops)
    if op == "minus":
        a, b = hi, lo
    elif rng.random() < 0.5:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    sym = {"plus": "+", "minus": "-", "times": "*"}[op]
    prompt = rng.choice((f"What is {a} {op} {b}?", f"Compute {a} {sym} {b}.", f"{a} {sym} {b} ="))
    wrong = [("wrong_option", str(value + d)) for d in (1, -1, 10, -10) if value + d >= 0]
    if op == "times":
        wrong.append(("wrong_option", str(a + b)))
    return _ex("arith", op, item, prompt, str(value), [rng.choice(wrong)], source="generated")


def format_task(base: dict, rng: random.Random) -> dict:
    """Wrap a base single-turn example in a format instruction (uppercase, brackets, quotes, one word, number only)."""
    q, a = base["messages"][0]["content"], base["answer"]
    kinds = ["brackets", "quotes"] + (["upper"] if any(c.isalpha() for c in a) else [])
    kinds += ["one_word"] if re.fullmatch(r"[A-Za-z'-]+", a) else []
    kinds += ["number_only"] if a.isdigit() else []
    kind = rng.choice(kinds)
    fmt: Callable[[str], str] = {"upper": str.upper, "brackets": lambda x: f"[{x}]",
                                 "quotes": lambda x: f'"{x}"'}.get(kind, lambda x: x)
    prompt = {"upper": f"Answer in uppercase. {q}", "brackets": f"{q} Put the answer in brackets.",
              "quotes": f"{q} Put the answer in double quotes.", "one_word": f"Reply with exactly one word. {q}",
              "number_only": f"Answer with the number only. {q}"}[kind]
    bad = a if kind in ("upper", "brackets", "quotes") else f"The answer is {a}."
    wrong = [("wrong_format", bad)] + [(k, fmt(w)) for k, w in base["_wrong"] if k == "wrong_option"][:1]
    ans = fmt(a)
    return _ex("format", kind, base["item_id"], prompt, ans, wrong, source=base["source"], match="strict")


def fill_splits(candidates: Iterator[dict], n_train: int, n_val: int, val_mod: int,
                one_per_item: bool = True) -> dict[str, list[dict]]:
    """Take examples from `candidates` into train/val by `split_of(item_id)` until both quotas are met (or the
    candidates run out); one example per item and family, or with `one_per_item=False` one per distinct dialog."""
    out: dict[str, list[dict]] = {"train": [], "val": []}
    want = {"train": n_train, "val": n_val}
    seen = set()
    for ex in candidates:
        key = (ex["family"], ex["item_id"] if one_per_item else repr(ex["messages"]))
        if key in seen:
            continue
        seen.add(key)
        split = split_of(ex["item_id"], val_mod)
        if len(out[split]) < want[split]:
            out[split].append(ex)
        if all(len(out[s]) >= want[s] for s in out):
            break
    return out


def synthetic_family(family: str, sentences: list[str], words: list[str], n_train: int, n_val: int,
                     val_mod: int, seed: int) -> dict[str, list[dict]]:
    """Examples of one synthetic family (copy, repeat, puzzle, arith or format) split by underlying item."""
    rng = random.Random(f"{seed}:{family}")
    pairs = [(a, b) for a in range(100) for b in range(a, 100)]
    pools: dict[str, tuple[list, Callable]] = {
        "copy": (sentences, copy_task),
        "repeat": (sentences, repeat_task),
        "puzzle": (words, puzzle_task),
        "arith": (pairs, lambda p, r: arith_task(p[0], p[1], r)),
    }

    def gen() -> Iterator[dict]:
        if family == "format":
            bases = [(k, x) for k in ("copy", "puzzle", "arith") for x in pools[k][0]]
            rng.shuffle(bases)
            for k, x in bases:
                yield format_task(pools[k][1](x, rng), rng)
            return
        if family not in pools:
            raise ValueError(f"unknown synthetic family {family!r}; expected format, copy, repeat, puzzle or arith")
        items = list(pools[family][0])
        rng.shuffle(items)
        for x in items:
            yield pools[family][1](x, rng)

    return fill_splits(gen(), n_train, n_val, val_mod)


def _corruptions(answer: str, rng: random.Random) -> list[tuple[str, str]]:
    """Corrupted/truncated versions of an answer: first half of the words or letters, swapped words,
    a dropped letter, or a repeated tail (the failure mode DPO's formatting-token masking guards against)."""
    out, words = [], answer.split()
    if len(words) >= 3:
        out.append(("truncated", " ".join(words[: (len(words) + 1) // 2])))
        i = rng.randrange(len(words) - 1)
        sw = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
        out.append(("corrupted", " ".join(sw)))
        out.append(("corrupted", " ".join(words + words[-2:] * 2)))
    elif len(answer) >= 6:
        out.append(("truncated", answer[: len(answer) // 2]))
        i = rng.randrange(1, len(answer) - 1)
        out.append(("corrupted", answer[:i] + answer[i + 1:]))
    return out


_KIND_WEIGHT = {"wrong_option": 0.45, "wrong_format": 0.45, "other_item": 0.3, "corrupted": 0.15, "truncated": 0.1}


def preference_pairs(examples: list[dict], rng: random.Random) -> list[dict]:
    """One preference pair per example where a rejection exists: {messages (the prompt turns), chosen (= the gold
    answer), rejected, rejection_kind, source, family, task, item_id, answer}. A rejection must differ from the gold
    (and, unless it is a wrong format, differ after normalisation and not be another accepted answer to the prompt)."""
    by_family: dict[str, list[dict]] = {}
    accepted: dict[str, set] = {}
    for ex in examples:
        by_family.setdefault(ex["family"], []).append(ex)
        key = repr(ex["messages"][:-1])
        accepted.setdefault(key, set()).add(normalise_answer(ex["answer"]))
    out = []
    for ex in examples:
        chosen = ex["messages"][-1]["content"]
        ok_answers = accepted[repr(ex["messages"][:-1])]
        cands = list(ex.get("_wrong", ())) + _corruptions(chosen, rng)
        peers = by_family[ex["family"]]
        for _ in range(4):
            other = peers[rng.randrange(len(peers))]
            if other["item_id"] != ex["item_id"]:
                cands.append(("other_item", other["answer"]))
                break
        good = []
        for kind, rej in cands:
            if not rej.strip() or rej.strip() == chosen.strip():
                continue
            if kind != "wrong_format" and (normalise_answer(rej) in ok_answers
                                           or normalise_answer(rej) == normalise_answer(chosen)):
                continue
            good.append((kind, rej))
        if not good:
            continue
        kind, rej = rng.choices(good, weights=[_KIND_WEIGHT[k] for k, _ in good])[0]
        out.append({"messages": ex["messages"][:-1], "chosen": chosen, "rejected": rej, "rejection_kind": kind,
                    **{k: ex[k] for k in ("source", "family", "task", "item_id", "answer")}})
    return out
