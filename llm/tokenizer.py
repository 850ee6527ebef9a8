"""Byte-level BPE tokenizer (Llama 3 style) trained in-repo, and the Llama 3 dialog format.

Id layout of a tokenizer with ``vocab_size = V``::

    0 .. 255          the 256 ByteLevel alphabet symbols (every byte is representable)
    256 .. V-17       learned BPE merges
    V-16 .. V-1       SPECIAL_TOKENS, in list order (``special_id(name) == V - 16 + i``)

If the corpus runs out of merges, the BPE block is smaller than requested; the specials are
still the last 16 ids and ``vocab_size`` reports the real total. A Llama 3 tokenizer imported
from Hugging Face (llm/import_hf.py) keeps its own ids, its media markers on reserved ids.

Special-token strings inside ordinary text are encoded literally by ``Tokenizer.encode`` (as
Llama 3's ``encode`` does by default); special ids only come from ``bos``/``eos`` and ``ChatFormat``.
The saved ``tokenizer.json`` is a standard HF file that parses specials in text, like Llama 3's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

N_SPECIAL = 16
SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
    "<|video|>",
    "<|speech_start|>",
    "<|speech|>",
    "<|speech_end|>",
]
REQUIRED_SPECIALS = tuple(SPECIAL_TOKENS)  # what every tokenizer here has (an imported one by renaming reserved ids)
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(N_SPECIAL - len(SPECIAL_TOKENS))]

# Llama 3 / GPT-4 style split: contractions, letter runs (with one leading non-letter), up to 3
# digits, punctuation runs (with an optional leading space), newlines, then other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ROLES = ("system", "user", "assistant", "ipython")


def _byte_symbols() -> list[str]:
    """The ByteLevel symbol of each byte 0..255: printable Latin-1 bytes are themselves, others 256+k."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _empty_hf() -> HFTokenizer:
    """An untrained BPE with the Llama-3-like split, ByteLevel bytes and decoder, no normaliser."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Byte-level BPE + 16 trailing special tokens; exact round trip of any text."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # Second copy that treats special-token strings in text as plain text (not serialised by
        # `tokenizers`, so it is set here on every construction).
        self._literal = HFTokenizer.from_str(hf.to_str())
        self._literal.encode_special_tokens = True
        added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        self._special = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS if hf.token_to_id(s) in added}
        missing = [s for s in REQUIRED_SPECIALS if s not in self._special]
        if missing:
            raise ValueError(f"tokenizer lacks the special token {missing[0]!r} (Llama 3 chat format / media markers)")
        sym_to_byte = {s: b for b, s in enumerate(_byte_symbols())}
        id_to_tok = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
        self._bytes = [  # added tokens (specials) decode to their strings, BPE tokens to their bytes
            added[i].encode("utf-8") if i in added else bytes(sym_to_byte[c] for c in id_to_tok[i])
            for i in range(self.vocab_size)
        ]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or a directory containing one."""
        path = Path(path)
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)))

    def save(self, path: str | Path) -> Path:
        """Write an HF-compatible ``tokenizer.json`` (to ``path``, or into it if it is a directory)."""
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(path))
        return path

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (HF semantics: specials in text are parsed)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Total number of ids, specials included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def special_id(self, name: str) -> int:
        """Id of a special token, e.g. ``special_id("<|eot_id|>")``."""
        return self._special[name]

    @property
    def special_ids(self) -> set[int]:
        """Ids of the SPECIAL_TOKENS this tokenizer has (formatting tokens, media markers)."""
        return set(self._special.values())

    @property
    def bos_id(self) -> int:
        """``<|begin_of_text|>``."""
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        """``<|end_of_text|>``."""
        return self._special["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        """``<|eot_id|>`` (end of turn)."""
        return self._special["<|eot_id|>"]

    @property
    def eom_id(self) -> int:
        """``<|eom_id|>`` (end of message, tool result expected)."""
        return self._special["<|eom_id|>"]

    @property
    def pad_id(self) -> int:
        """``<|finetune_right_pad_id|>``."""
        return self._special["<|finetune_right_pad_id|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text literally (special-token strings are not parsed), optionally adding BOS/EOS."""
        ids = self._literal.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``encode`` over many texts, in parallel inside ``tokenizers``."""
        encs = self._literal.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in encs]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of ``ids`` (specials as their UTF-8 strings); may end mid-character."""
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text, specials rendered as their strings; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def n_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 byte count of the decoded ids (the denominator of bits-per-byte)."""
        return len(self.decode_bytes(ids))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: Path | None = None, min_frequency: int = 2
) -> Tokenizer:
    """Train byte-level BPE on ``texts``; ``vocab_size`` counts the 16 specials appended at the end."""
    if vocab_size < 256 + N_SPECIAL:
        raise ValueError(f"vocab_size must be >= {256 + N_SPECIAL}")
    hf = _empty_hf()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_SPECIAL,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # the trainer would put specials first; add them after training instead
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    hf.add_special_tokens(SPECIAL_TOKENS)
    bos = SPECIAL_TOKENS[0]
    # Like Llama 3's HF tokenizer: `hf.encode(text)` (add_special_tokens=True) prepends BOS.
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, hf.token_to_id(bos))]
    )
    tok = Tokenizer(hf)
    if out_path is not None:
        tok.save(out_path)
    return tok


class ChatFormat:
    """Llama 3 dialog format: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>{role}<|end_header_id|>\\n\\n``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        t = self.tok
        start, end = t.special_id("<|start_header_id|>"), t.special_id("<|end_header_id|>")
        return [start, *t.encode(role), end, *t.encode("\n\n")]

    def encode_message(self, message: dict) -> list[int]:
        """Header, stripped content, ``<|eot_id|>``."""
        return self.encode_header(message["role"]) + self.tok.encode(message["content"].strip()) + [self.tok.eot_id]

    def encode_dialog(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> tuple[list[int], list[bool]]:
        """BOS + messages (+ assistant header); mask is True on assistant content and its ``<|eot_id|>``."""
        tokens, mask = [self.tok.bos_id], [False]
        for m in messages:
            header = self.encode_header(m["role"])
            body = self.tok.encode(m["content"].strip()) + [self.tok.eot_id]
            tokens += header + body
            mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
        if add_generation_prompt:
            header = self.encode_header("assistant")
            tokens += header
            mask += [False] * len(header)
        return tokens, mask

    def decode_reply(self, ids: Sequence[int]) -> str:
        """Decode generated ids up to (excluding) the first ``<|eot_id|>``, ``<|eom_id|>`` or ``<|end_of_text|>``."""
        stops = {self.tok.eot_id, self.tok.eom_id, self.tok.eos_id}
        end = next((i for i, x in enumerate(ids) if x in stops), len(ids))
        return self.tok.decode(ids[:end])


CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'ipython'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- (message['content'] | trim) + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int = 8192) -> dict:
    """Content of ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained`` matches ``tok``/``ChatFormat``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
