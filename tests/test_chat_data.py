"""Chat and preference kit: item-level splits, correct task answers, preference pairs, safe decoding, scoring."""
from __future__ import annotations

import json
import random
import re

import pytest

from data.chat_kit import (CHAT_ROLES, cached_chat_dirs, collect_examples, decode_chat_sample, iter_chat,
                           resolve_cfg, write_chat_kit)
from data.chat_sources import chatterbot_dialogs, evals_examples, wordnet_examples
from data.chat_tasks import (ORDINALS, arith_task, brown_sentences, copy_task, exact_match, format_task,
                             normalise_answer, preference_pairs, puzzle_task, split_of)
from data.fetch import default_cache_dir
from data.shards import SkipCounter, expand_shards
from data.speech_tasks import ASR_PROMPT
from tests.shard_helpers import write_tar

VOCAB = ("the a old quiet river garden farmer carried small basket across bright morning village children "
         "laughed under tall green trees while their mother sang softly near open window evening light "
         "fell slowly over distant hills").split()
TINY_CFG = {"val_mod": 4, "n_copy": 40, "n_puzzle": 40, "n_arith": 60, "n_format": 40, "n_define": 4,
            "n_example": 4, "evals_cap": 20, "shard_size": 50}
KINDS = {"wrong_option", "wrong_format", "other_item", "corrupted", "truncated"}


def _fake_brown(root):
    """A Brown-like folder: cats.txt and two tagged files of generated sentences."""
    rng = random.Random(0)
    root.mkdir()
    (root / "cats.txt").write_text("ca01 news\nca02 humor\n")
    for fid in ("ca01", "ca02"):
        paras = []
        for _ in range(12):
            sents = []
            for _ in range(5):
                words = [rng.choice(VOCAB) for _ in range(rng.randint(4, 10))]
                words[0] = words[0].capitalize()
                sents.append(" ".join(f"{w}/nn" for w in words) + " ./.")
            paras.append("\t" + " ".join(sents))
        (root / fid).write_text("\n\n".join(paras) + "\n")
    return root


CHATTERBOT_YML = """categories:
- greetings
conversations:
- - Hello
  - Hi there
- - Hello
  - Hi there
- - How are you?
  - I am fine.
  - Good to hear.
- - Is it on?
  - yes
- - What is your name?
  - I am a bot.
  - Nice name.
  - Thanks.
- - Tell me a long story.
  - "%s"
""" % ("once upon a time " * 40).strip()


def _fake_sources(tmp_path):
    """Tiny chatterbot, evals and WordNet folders in the fetched layout."""
    cb = tmp_path / "cb"
    cb.mkdir()
    (cb / "greetings.yml").write_text(CHATTERBOT_YML)
    ev = tmp_path / "evals" / "toy"
    ev.mkdir(parents=True)
    rows = [{"input": [{"role": "system", "content": "Answer Yes or No."},
                       {"role": "user", "content": f"Is {n} even?"}], "ideal": "Yes" if n % 2 == 0 else "No"}
            for n in range(40)]
    rows.append({"input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}], "ideal": "d"})  # multi-turn: dropped
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"input": "x", "ideal": 3})]
    (ev / "samples.jsonl").write_text("\n".join(lines) + "\n")
    wn = tmp_path / "wn"
    wn.mkdir()
    header = "  1 This software and database is being provided to you\n"
    (wn / "data.noun").write_text(header + "00000001 05 n 01 bank 0 000 | sloping land beside a body of water; "
                                  '"they pulled the canoe up on the bank"\n'
                                  "00000002 05 n 01 bank 1 000 | a financial institution; "
                                  '"he cashed a check at the bank"\n'
                                  "00000003 05 n 01 river 0 000 | a large natural stream of water\n")
    (wn / "index.noun").write_text(header + "bank n 2 1 @ 2 2 00000002 00000001\nriver n 1 0 1 1 00000003\n"
                                   "zyzzyva n 1 0 1 0 00000003\n")
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text(header)
        (wn / f"index.{pos}").write_text(header)
    return {"brown": str(_fake_brown(tmp_path / "brown")), "chatterbot": str(cb), "evals": str(tmp_path / "evals"),
            "wordnet": str(wn)}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatkit")
    dirs = _fake_sources(tmp)
    manifest = write_chat_kit(dirs, tmp / "out", TINY_CFG)
    read = {}
    for kind in ("chat", "pref"):
        for split in ("train", "val"):
            skips = SkipCounter()
            read[kind, split] = list(iter_chat(expand_shards(tmp / "out" / kind / f"{split}-*.tar"), skips))
            assert skips.total() == 0
    return {"dirs": dirs, "manifest": manifest, "read": read, "out": tmp / "out"}


def test_manifest_counts_match_shards(kit):
    m, read = kit["manifest"], kit["read"]
    for kind in ("chat", "pref"):
        for split in ("train", "val"):
            assert m[kind][split]["examples"] == len(read[kind, split]) > 0
    fams = set(m["chat"]["train"]["by_family"])
    assert {"copy", "puzzle", "arith", "format", "dialogue", "toy", "define"} <= fams
    assert len(list((kit["out"] / "chat").glob("train-*.tar"))) > 1  # shard_size 50
    assert json.loads((kit["out"] / "chat" / "manifest.json").read_text())["chat"]["train"]["examples"] > 0


def test_splits_are_disjoint_by_item(kit):
    read = kit["read"]
    train = {r["item_id"] for r in read["chat", "train"]}
    val = {r["item_id"] for r in read["chat", "val"]}
    assert train and val and not train & val
    assert all(split_of(i, TINY_CFG["val_mod"]) == "train" for i in train)
    assert all(split_of(i, TINY_CFG["val_mod"]) == "val" for i in val)
    assert {r["item_id"] for r in read["pref", "train"]} <= train
    assert {r["item_id"] for r in read["pref", "val"]} <= val
    # format examples reuse the underlying item, so the split is shared across families
    fmt_items = {r["item_id"] for r in read["chat", "val"] if r["family"] == "format"}
    assert all(i.split(":")[0] in ("sent", "word", "pair") for i in fmt_items)


def test_preference_pairs_valid(kit):
    for split in ("train", "val"):
        for r in kit["read"]["pref", split]:
            assert r["chosen"] == r["answer"] and r["chosen"].strip() != r["rejected"].strip()
            assert r["rejected"].strip() and r["rejection_kind"] in KINDS
            assert r["messages"][-1]["role"] == "user"
            if r["rejection_kind"] != "wrong_format":
                assert not exact_match(r["rejected"], r["chosen"])


def test_chat_samples_end_with_gold_answer(kit):
    for r in kit["read"]["chat", "train"]:
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
        assert {m["role"] for m in r["messages"]} <= set(CHAT_ROLES)
        assert r["match"] in ("strict", "normalised")


def _check_base(prompt: str, answer: str) -> None:
    """Recompute the answer of a copy/puzzle/arith prompt independently."""
    core = lambda t: re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", t)  # noqa: E731
    if m := re.fullmatch(r"(?:What is |Compute )?(\d+) (plus|minus|times|\+|-|\*) (\d+)(?:\?|\.| =)", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        assert int(answer) == {"plus": a + b, "+": a + b, "minus": a - b, "-": a - b, "times": a * b, "*": a * b}[op]
        assert int(answer) >= 0 and a <= 99 and b <= 99
    elif m := re.fullmatch(r"What is the (first|last) letter of (\w+)\?", prompt):
        assert answer == m[2][0 if m[1] == "first" else -1]
    elif m := re.fullmatch(r"Spell (\w+) backwards\.", prompt):
        assert answer == m[1][::-1]
    elif m := re.fullmatch(r"How many letters are in (\w+)\?", prompt):
        assert int(answer) == len(m[1])
    elif m := re.fullmatch(r"Spell (\w+) letter by letter\.", prompt):
        assert answer.replace("-", "") == m[1] and len(answer) == 2 * len(m[1]) - 1
    elif m := re.fullmatch(r'Does the word "(\w+)" contain the letter (\w)\? Answer yes or no\.', prompt):
        assert answer == ("yes" if m[2] in m[1] else "no")
    elif m := re.fullmatch(r"Repeat the (\w+) word of: (.+)", prompt):
        assert answer == core(m[2].split()[ORDINALS.index(m[1])])
    elif m := re.fullmatch(r"What is the (first|last) word of this sentence\? (.+)", prompt):
        assert answer == core(m[2].split()[0 if m[1] == "first" else -1])
    elif m := re.fullmatch(r"How many words are in this sentence\? (.+)", prompt):
        assert int(answer) == len(m[1].split())
    elif m := re.fullmatch(r"Copy the sentence: (.+)", prompt):
        assert answer == m[1]
    else:
        raise AssertionError(f"unrecognised prompt {prompt!r}")


def test_generated_answers_are_correct():
    rng = random.Random(1)
    sentences = ["The old farmer carried a small basket.", "Children laughed under tall green trees!",
                 "Why did the quiet river rise so slowly?"]
    words = ["garden", "level", "tree", "abc"]
    bases = [arith_task(a, b, rng) for a in range(0, 100, 7) for b in range(0, 100, 3)]
    bases += [puzzle_task(w, rng) for w in words for _ in range(30)]
    bases += [copy_task(s, rng) for s in sentences for _ in range(30)]
    for ex in bases:
        _check_base(ex["messages"][0]["content"], ex["answer"])
        assert all(w.strip() != ex["answer"] for _, w in ex["_wrong"])
    for ex in (format_task(b, rng) for b in bases):
        q, a = ex["messages"][0]["content"], ex["answer"]
        if ex["task"] == "upper":
            assert q.startswith("Answer in uppercase. ") and a == a.upper()
        elif ex["task"] == "brackets":
            assert q.endswith(" Put the answer in brackets.") and a[0] == "[" and a[-1] == "]"
        elif ex["task"] == "quotes":
            assert a[0] == '"' and a[-1] == '"'
        elif ex["task"] == "one_word":
            assert len(a.split()) == 1
        else:
            assert ex["task"] == "number_only" and a.isdigit()
        base_q = re.sub(r"^(Answer in uppercase|Reply with exactly one word|Answer with the number only)\. |"
                        r" Put the answer in (brackets|double quotes)\.$", "", q)
        base_a = a.strip('[]"')
        ok = [b["answer"] for b in bases if b["messages"][0]["content"] == base_q]
        assert ok and base_a.lower() in {x.lower() for x in ok}


def test_brown_sentences_clean():
    docs = [{"text": 'He met Mr. Smith at the border today. Then J. Doe left the room! Tiny.\n\n'
                     '"Where is the key?" he asked the old man. Bad -- token here in it.'}]
    sents = brown_sentences(docs)
    assert sents == ["He met Mr. Smith at the border today.", "Then J. Doe left the room!",
                     '"Where is the key?" he asked the old man.']


def test_chatterbot_reader(tmp_path):
    dirs = _fake_sources(tmp_path)
    rows = list(chatterbot_dialogs(dirs["chatterbot"], max_chars=200))
    msgs = [r["messages"] for r in rows]
    assert [m["content"] for m in msgs[0]] == ["Hello", "Hi there"]  # the duplicate is dropped
    assert [m["role"] for m in msgs[2]] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in msgs[1]] == ["user", "assistant"]  # odd tail dropped
    assert not any(r["messages"][0]["content"] == "Is it on?" for r in rows)  # `yes` loads as a bool
    assert not any("once upon" in m["content"] for r in rows for m in r["messages"])  # over max_chars
    assert len(rows) == 3 and all(r["answer"] == r["messages"][-1]["content"] for r in rows)


def test_evals_and_wordnet_readers(tmp_path):
    dirs = _fake_sources(tmp_path)
    rows = list(evals_examples(dirs["evals"]))
    assert len(rows) == 40 and {r["family"] for r in rows} == {"toy"}
    assert all(r["messages"][0]["role"] == "system" and r["_wrong"][0][1] != r["answer"] for r in rows)
    one_sided = tmp_path / "evals" / "allno"
    one_sided.mkdir()
    (one_sided / "samples.jsonl").write_text("\n".join(json.dumps(
        {"input": [{"role": "user", "content": f"Is {n} a letter?"}], "ideal": "NO"}) for n in range(5)))
    assert {r["_wrong"][0][1] for r in evals_examples(dirs["evals"]) if r["family"] == "allno"} == {"YES"}
    define = list(wordnet_examples(dirs["wordnet"], "define"))
    assert {r["item_id"] for r in define} == {"wn:bank", "wn:river"}  # zyzzyva: no tagged sense
    bank = next(r for r in define if r["item_id"] == "wn:bank")
    senses = {"a financial institution", "sloping land beside a body of water"}
    assert bank["answer"] in senses and bank["_wrong"][0][1] in senses - {bank["answer"]}
    if bank["task"] != "define_in_context":
        assert bank["answer"] == "a financial institution"  # sense 1 in the index order
    example = list(wordnet_examples(dirs["wordnet"], "example"))
    assert len(example) == 1 and "bank" in example[0]["answer"]


def test_exact_match_and_normalise():
    assert normalise_answer("  The Answer, is: an APPLE! ") == "answer is apple"
    assert normalise_answer("Two") == "2"
    assert exact_match("the Kroger Co.", "Kroger Co")
    assert exact_match("five", "5") and not exact_match("6", "5")
    assert exact_match("A", "a") and not exact_match("b", "a")  # an article-only gold still scores
    assert exact_match("no", ["yes", "No."])
    assert not exact_match("apple", "[APPLE]", strict=True) and exact_match(" [APPLE]", "[APPLE]", strict=True)




def test_decode_rejects_malformed_chat(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = [b"\xff\xfe", b"{oops", b"[1, 2]", json.dumps({"x": 1}).encode(),
           json.dumps({"messages": []}).encode(),
           json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
           json.dumps({**good, "chosen": "a"}).encode(),
           json.dumps({**good, "chosen": "a", "rejected": None}).encode()]
    members = [("ok.json", json.dumps(good).encode()), ("p.json", json.dumps({**good, "chosen": "a",
                                                                              "rejected": "b"}).encode())]
    members += [(f"b{i}.json", raw) for i, raw in enumerate(bad)]
    members += [("t.txt", b"no json member"), ("k.json", json.dumps(good).encode()), ("k.pkl", b"\x80")]
    skips = SkipCounter()
    out = list(iter_chat([write_tar(tmp_path / "s.tar", members)], skips))
    assert [r["key"] for r in out] == ["ok", "p", "k"]
    assert skips.as_dict() == {"bad_chat": len(bad) + 1, "pickle_member": 1}
    with pytest.raises(ValueError, match="bad_chat"):
        decode_chat_sample({"__key__": "x", "json": b'{"messages": "hi"}'})


def test_roles_match_tokenizer():
    from llm.tokenizer import ROLES

    assert tuple(CHAT_ROLES) == tuple(ROLES)


def test_encode_dialog_masks_the_answer(kit):
    from llm.tokenizer import ChatFormat, train_tokenizer

    rows = kit["read"]["chat", "train"]
    tok = train_tokenizer([m["content"] for r in rows for m in r["messages"]], 400)
    fmt = ChatFormat(tok)
    for r in rows[:50]:
        ids, mask = fmt.encode_dialog(r["messages"], add_generation_prompt=False)
        trained = [i for i, on in zip(ids, mask) if on]
        n_asst = sum(m["role"] == "assistant" for m in r["messages"])
        assert trained[-1] == tok.eot_id and trained.count(tok.eot_id) == n_asst
        if n_asst == 1:
            assert tok.decode(trained[:-1]) == r["answer"].strip()


def test_cfg_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_cats"):
        resolve_cfg({"n_cats": 3})


def test_preference_pairs_skip_accepted_answers():
    ex = lambda a, item: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}],  # noqa
                          "source": "s", "family": "f", "task": "t", "item_id": item, "answer": a, "_wrong": []}
    pairs = preference_pairs([ex("Hello", "i1"), ex("Hi there", "i1"), ex("Bye", "i2")], random.Random(0))
    for p in pairs:
        if p["messages"][0]["content"] == "Hi" and p["rejection_kind"] == "other_item":
            assert p["rejected"] == "Bye"


def test_collect_without_sources_gives_arith_only():
    splits = collect_examples({}, {"n_arith": 30, "val_mod": 5})
    assert {r["family"] for s in splits.values() for r in s} == {"arith"}
    assert len(splits["train"]) == 30


@pytest.mark.data_cache
def test_build_chat_kit_on_real_cache(tmp_path):
    cache = default_cache_dir()
    if cached_chat_dirs(cache) is None:
        pytest.skip(f"chat data cache not fetched at {cache} (run data.chat_kit.fetch_chat and fetch_text)")
    from data.chat_kit import build_chat_kit

    m = build_chat_kit(cache, tmp_path)
    train, val = m["chat"]["train"], m["chat"]["val"]
    assert 30000 <= train["examples"] <= 50000 and 1000 <= val["examples"] <= 3000
    assert {"copy", "repeat", "puzzle", "arith", "format", "dialogue", "define", "example", "sarcasm", "quartz"} <= \
        set(train["by_family"])
    assert 8000 <= train["by_family"]["repeat"] <= 12000  # the pool less the speech kit's held-out texts
    assert train["share_le_360_chars"] == 1.0 and m["pref"]["train"]["examples"] > 10000
    assert set(m["pref"]["train"]["by_rejection_kind"]) <= KINDS
    skips = SkipCounter()
    val_rows = list(iter_chat(expand_shards(tmp_path / "chat" / "val-*.tar"), skips))
    assert len(val_rows) == val["examples"] and not skips.total()
    train_items = {r["item_id"] for r in iter_chat(expand_shards(tmp_path / "chat" / "train-*.tar"))}
    assert not train_items & {r["item_id"] for r in val_rows}


def test_repeat_family_copies_under_the_asr_prompt_and_skips_held_out_transcripts():
    from data.chat_tasks import REPEAT_PROMPT, synthetic_family
    from data.speech_kit import held_out_text

    assert REPEAT_PROMPT == ASR_PROMPT.format(language="English")  # the prompt speech_sft trains ASR under
    sentences = [f"The {w} farmer carried {n} small baskets home." for w in ("old", "young", "tall", "kind")
                 for n in ("two", "three", "four", "five", "six")]
    held = [s for s in sentences if held_out_text(s)]
    assert held and len(held) < len(sentences)  # the hash splits this pool both ways
    pool = [s for s in sentences if not held_out_text(s)]
    out = synthetic_family("repeat", pool, [], len(pool), 0, 1000, 0)
    exs = out["train"] + out["val"]
    assert len(exs) == len(pool)
    for ex in exs:
        sys_msg, user, reply = ex["messages"]
        assert sys_msg == {"role": "system", "content": REPEAT_PROMPT} and reply["content"] == user["content"]
        assert ex["answer"] == user["content"] and ex["match"] == "strict" and not held_out_text(ex["answer"])
        (kind, wrong), = ex["_wrong"]  # the rejected answer drops one word
        assert kind == "corrupted" and len(wrong.split()) == len(ex["answer"].split()) - 1
