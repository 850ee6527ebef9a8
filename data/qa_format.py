"""The paper's question formats for evaluation and training (PAPER.md §5): the multiple-choice prompt ("Select the
correct answer from the following options: ... Answer with the correct option letter and nothing else.") scored by
the option letter a reply starts with, and the short-answer prompt ("Answer the question using a single word or
phrase."). Shared by the video stage and eval, and the image eval of benchmark files (data/bench_files.py)."""
from __future__ import annotations

import re

from data.chat_tasks import normalise_answer

LETTERS = "ABCDEFGH"
MC_PROMPT = "Select the correct answer from the following options: {question} {options}. " \
            "Answer with the correct option letter and nothing else."
SHORT_PROMPT = "Answer the question using a single word or phrase. {question}"


def mc_prompt(question: str, choices: list[str]) -> str:
    """The multiple-choice prompt: question + "(A) x (B) y ..." options (2..8 of them, else ValueError)."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {len(choices)}")
    options = " ".join(f"({L}) {c}" for L, c in zip(LETTERS, choices))
    return MC_PROMPT.format(question=question.strip(), options=options)


def qa_prompt(qa: dict) -> str:
    """The image question as trained and scored: the question, and "Options: a, b, c." when it has choices."""
    q = str(qa["question"]).strip()
    if qa.get("choices"):
        q += " Options: " + ", ".join(str(c) for c in qa["choices"]) + "."
    return q


def short_prompt(question: str) -> str:
    """The short-answer prompt."""
    return SHORT_PROMPT.format(question=question.strip())


def gold_letter(qa: dict) -> str | None:
    """The letter of the first option that matches a reference answer (normalise_answer), or None."""
    refs = {normalise_answer(a) for a in qa.get("answers") or []}
    for L, c in zip(LETTERS, qa.get("choices") or []):
        if normalise_answer(c) in refs:
            return L
    return None


def parse_letter(pred: str) -> str | None:
    """The option letter a reply starts with ("B", "(B)", "B. left", "B) cat" -> "B"), or None."""
    m = re.match(r"^\W*([A-H])(?![A-Za-z])", pred.strip())
    return m.group(1) if m else None
