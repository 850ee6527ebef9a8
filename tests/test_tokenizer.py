"""Tokenizer and chat-format tests on a tiny BPE trained on CPython's pydoc topics."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydoc_data.topics import topics
from tokenizers import pre_tokenizers

from llm.tokenizer import (
    N_SPECIAL,
    SPECIAL_TOKENS,
    ChatFormat,
    Tokenizer,
    _byte_symbols,
    hf_tokenizer_config,
    train_tokenizer,
)

VOCAB = 768  # 512 gives only ~2.02 bytes/token on held-out pydoc text; 768 gives ~2.47
_KEYS = sorted(topics)
TRAIN = [topics[k] for i, k in enumerate(_KEYS) if i % 5]
HELDOUT = [topics[k] for i, k in enumerate(_KEYS) if i % 5 == 0]
DIALOG = [
    {"role": "user", "content": "  What is a list?\n"},
    {"role": "assistant", "content": "A mutable sequence. "},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TRAIN, VOCAB)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(tok)))
    return d


def test_special_tokens_layout(tok):
    assert len(SPECIAL_TOKENS) == N_SPECIAL == len(set(SPECIAL_TOKENS))
    assert tok.vocab_size == VOCAB
    ids = [tok.special_id(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - N_SPECIAL, VOCAB))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(ids[:3])
    assert (tok.eom_id, tok.eot_id) == (ids[5], ids[6])
    assert all(tok.decode([i]) == s for i, s in zip(ids, SPECIAL_TOKENS))


def test_byte_symbols_match_bytelevel_alphabet():
    assert sorted(_byte_symbols()) == sorted(pre_tokenizers.ByteLevel.alphabet())


_PIECES = st.one_of(
    st.text(),
    st.sampled_from(
        SPECIAL_TOKENS + ["😀", "👩‍👩‍👧", "\x00", "\x7f", "\r\n", "\t", " \n\n ", "don't", "12345", "\ufeff"]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=8).map("".join))
def test_roundtrip_any_text(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.n_bytes(ids) == len(s.encode("utf-8"))
    assert all(i < VOCAB - N_SPECIAL for i in ids)  # specials in text are never parsed


def test_literal_special_string_is_not_special(tok):
    ids = tok.encode("a<|eot_id|>b")
    assert tok.eot_id not in ids and tok.decode(ids) == "a<|eot_id|>b"
    assert tok.encode("x", bos=True, eos=True) == [tok.bos_id, *tok.encode("x"), tok.eos_id]


def test_decode_bytes_partial_utf8(tok):
    ids = tok.encode("é")  # two bytes; the test holds whether or not they are merged
    assert tok.decode_bytes(ids) == "é".encode()
    assert tok.decode_bytes(ids[:1]) == "é".encode()[: len(tok.decode_bytes(ids[:1]))]


def test_compresses_english(tok):
    text = "\n".join(HELDOUT)
    ids = tok.encode(text)
    assert tok.n_bytes(ids) / len(ids) > 2.0
    assert tok.encode_batch(HELDOUT[:3]) == [tok.encode(t) for t in HELDOUT[:3]]


def test_save_load_identical(tok, saved_dir):
    tok2 = Tokenizer.load(saved_dir)
    text = HELDOUT[0] + " <|image|> ünïcødé 😀"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.vocab_size == tok.vocab_size and tok2.eot_id == tok.eot_id


def test_chat_format_layout_and_mask(tok):
    cf = ChatFormat(tok)
    ids, mask = cf.encode_dialog(DIALOG, add_generation_prompt=False)
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is a list?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA mutable sequence.<|eot_id|>"
    )
    assert len(mask) == len(ids)
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("A mutable sequence.") + [tok.eot_id]
    assert ids[-sum(mask):] == [i for i, m in zip(ids, mask) if m]  # contiguous tail
    gen, gmask = cf.encode_dialog(DIALOG)
    assert gen == ids + cf.encode_header("assistant") and gmask == mask + [False] * (len(gen) - len(ids))
    assert cf.encode_message(DIALOG[0]) == ids[1 : len(ids) - sum(mask) - len(cf.encode_header("assistant"))]
    assert cf.decode_reply(tok.encode("Sure.") + [tok.eom_id] + tok.encode("junk")) == "Sure."
    with pytest.raises(ValueError):
        cf.encode_header("tool")


def test_transformers_autotokenizer_parity(tok, saved_dir):
    transformers = pytest.importorskip("transformers")
    at = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    for s in ["Hello, world!", "def f(x):\n    return x ** 2\n", "It's 2024 — naïve café 😀", HELDOUT[1][:500]]:
        assert at(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
        assert at(s)["input_ids"] == tok.encode(s, bos=True)
        assert at.decode(tok.encode(s)) == s
    # HF parses special strings in text unless asked not to; ours never does.
    literal = at("a<|eot_id|>b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert literal == tok.encode("a<|eot_id|>b")
    cf = ChatFormat(tok)
    dialog = [{"role": "system", "content": "Be brief."}, *DIALOG, {"role": "user", "content": "More?"}]
    for gen in (True, False):
        ours, mask = cf.encode_dialog(dialog, add_generation_prompt=gen)
        theirs = at.apply_chat_template(
            dialog, tokenize=True, add_generation_prompt=gen, return_dict=True, return_assistant_tokens_mask=True
        )
        assert theirs["input_ids"] == ours
        assert [bool(m) for m in theirs["assistant_masks"]] == mask
