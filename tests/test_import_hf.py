"""`mm import hf`: a Hugging Face Llama folder (random LlamaForCausalLM saved locally: one file or sharded with an
index, tied or untied, llama3 rope scaling, head_dim / intermediate_size off our sizing rule) becomes an LM run whose
logits and greedy output equal transformers', which exports and re-imports to the identity, and which an image stage
trains on."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers, processors, trainers

from llm.generate import generate
from llm.tokenizer import CHAT_TEMPLATE, ChatFormat, _empty_hf
from mm.model.checkpoint import load_tensors
from mm.model.runs import load_lm
from mm.model.store import load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_SPECIALS))]
TEXT = ["the cat sat on the mat. a dog ran in the park. what is shown? hello there, how are you?"] * 30
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {  # name: (sharded, tied, rope scaling): both layouts, each tied and untied
    "one_file_untied": (False, False, None),
    "one_file_tied_llama3_rope": (False, True, LLAMA3_ROPE),
    "sharded_untied": (True, False, None),
    "sharded_tied_llama3_rope": (True, True, LLAMA3_ROPE),
}


def _llama3_tokenizer(out: Path) -> int:
    """A small byte-level BPE with Llama 3's 256 special tokens after it, as Meta's tokenizer.json lays them out."""
    hf = _empty_hf()
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    hf.add_special_tokens(LLAMA3_SPECIALS)
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))])
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}))
    return hf.get_vocab_size(with_added_tokens=True)


def _hf_folder(root: Path, name: str) -> tuple[Path, "transformers.LlamaForCausalLM"]:
    sharded, tied, scaling = CASES[name]
    d = root / name
    d.mkdir()
    vocab = _llama3_tokenizer(d)
    rope = {"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})}
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=rope,
                                   tie_word_embeddings=tied, initializer_range=0.1,
                                   bos_token_id=LLAMA3_SPECIALS.index("<|begin_of_text|>") + vocab - 256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d, max_shard_size="150KB" if sharded else "1GB")
    assert (d / "model.safetensors.index.json").exists() == sharded
    return d, model


def _mm(*argv) -> tuple[int, dict, str]:
    from mm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    d, hf_model = _hf_folder(root, request.param)
    rc, res, err = _mm("import", "hf", "--model", d, "--out", root / "run", "--chat")
    assert rc == 0, err
    return {"name": request.param, "hf_dir": d, "hf": hf_model, "run": root / "run", "root": root, "res": res}


def test_logits_equal_transformers(imported):
    model, tok, meta = load_lm(imported["run"])
    assert meta["stage"] == "import_hf" and model.cfg.head_dim == 24 and model.cfg.ffn_dim == 100
    assert model.cfg.tie_embeddings == CASES[imported["name"]][1]
    x = torch.randint(0, tok.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), imported["hf"](x).logits
    assert float((ours - theirs).abs().max()) < 1e-4


def test_greedy_generation_equals_transformers(imported):
    model, tok, _ = load_lm(imported["run"])
    prompt = tok.encode("the cat sat", bos=True)
    ours = generate(model, prompt, 20, greedy=True)
    hf = imported["hf"]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()


def test_mm_chat_equals_transformers_chat_template(imported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(imported["hf_dir"])
    _, tok, _ = load_lm(imported["run"])
    msgs = [{"role": "user", "content": "hello there, how are you?"}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ChatFormat(tok).encode_dialog(msgs)[0] == list(ids)  # the same Llama 3 chat-format ids
    stops = [tok.eot_id, tok.eom_id, tok.eos_id]
    with torch.no_grad():
        out = imported["hf"].generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                      pad_token_id=0)[0, len(ids):].tolist()
    out = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
    rc, res, err = _mm("chat", "--ckpt", imported["run"], "--prompt", msgs[0]["content"], "--greedy",
                       "--max-new-tokens", "12")
    assert rc == 0 and res["chat_template"], err
    assert res["text"] == hf_tok.decode(out, skip_special_tokens=False)


def test_import_export_import_is_the_identity(imported):
    root = imported["root"]
    rc, _, err = _mm("export", "hf", "--ckpt", imported["run"], "--out", root / "exported")
    assert rc == 0, err
    rc, _, err = _mm("import", "hf", "--model", root / "exported", "--out", root / "again")
    assert rc == 0, err
    a, b = (load_tensors(r / "final" / "model.safetensors") for r in (imported["run"], root / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "final" / "meta.json").read_text())["model_config"] for r in (imported["run"], root / "again"))
    assert ma == mb
    assert (imported["run"] / "tokenizer.json").read_text() == (root / "again" / "tokenizer.json").read_text()


def test_media_markers_take_reserved_ids(imported):
    _, tok, _ = load_lm(imported["run"])
    raw = json.loads((imported["hf_dir"] / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in raw["added_tokens"]}
    for name in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|finetune_right_pad_id|>"):
        assert tok.special_id(name) == ids[name]  # the Llama 3 ids stay where they were
    media = [tok.special_id(s) for s in ("<|image|>", "<|video|>", "<|speech_start|>", "<|speech|>", "<|speech_end|>")]
    assert sorted(media) == sorted(ids[f"<|reserved_special_token_{i}|>"] for i in range(243, 248))


@pytest.mark.parametrize("damage", ["missing_config_key", "missing_weight", "shape_mismatch", "bin_only"])
def test_bad_folder_is_one_error_line(imported, tmp_path, damage):
    if imported["name"] != "one_file_untied":
        pytest.skip("one layout is enough")
    d = tmp_path / "m"
    shutil.copytree(imported["hf_dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    if damage == "missing_config_key":
        del cfg["hidden_size"]
        want = "config.json: key 'hidden_size' missing"
    elif damage == "shape_mismatch":
        cfg["intermediate_size"] = 96
        want = "has shape"
    elif damage == "missing_weight":
        sd = load_file(str(d / "model.safetensors"))
        del sd["model.layers.1.mlp.down_proj.weight"]
        save_file(sd, str(d / "model.safetensors"))
        want = "weight 'model.layers.1.mlp.down_proj.weight' missing"
    else:
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
        want = "only pickled .bin weights"
    (d / "config.json").write_text(json.dumps(cfg))
    rc, res, err = _mm("import", "hf", "--model", d, "--out", tmp_path / "run")
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and want in res["error"] and str(d) in res["error"], (err, res)
    assert not (tmp_path / "run" / "final").exists()


def test_image_pretrain_runs_on_an_imported_lm(imported, tmp_path):
    if imported["name"] != "sharded_tied_llama3_rope":
        pytest.skip("one imported LM is enough")
    from tests.test_image_stage import YAML, make_world

    world = make_world(tmp_path)
    rc, res, err = _mm("run", YAML, "--out", tmp_path / "img", f"lm={imported['run']}", f"vision={world['clip']}",
                       f"data.shards={tmp_path}/train-*.tar", f"data.val_shards={tmp_path}/val-*.tar", "steps=3",
                       "adapter.every=1", "seq_len=48", "train.batch_size=4", "train.warmup_steps=1", "train.progress=false",
                       "train.lr=1e-2", "data.eval_samples=4")
    assert rc == 0, err
    model, tok, _ = load_model(tmp_path / "img")
    lm = load_tensors(imported["run"] / "final" / "model.safetensors")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in lm.items())  # the imported LM, bitwise, under the adapters
    assert tok.special_id("<|image|>") == tok.vocab_size - 1  # on the last reserved id, reserved_special_token_247
    gates = [v for k, v in own.items() if k.endswith("gate_attn")]
    assert gates and any(float(g.abs().max()) > 0 for g in gates)  # the adapter trained


def test_llama3_0_tokenizer_gets_the_3_1_names_on_reserved_ids(tmp_path):
    """Llama 3.0 has no <|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|> (reserved ids there): the import
    places them, and the media markers, on the highest reserved ids; the 3.0 ids themselves stay."""
    from llm.import_hf import HFImportError, import_tokenizer

    _llama3_tokenizer(tmp_path)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    n = 0
    for t in sorted(raw["added_tokens"], key=lambda t: t["id"]):  # 3.0: every unnamed id reserved, numbered in order
        if t["content"] in ("<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>") or "reserved" in t["content"]:
            t["content"], n = f"<|reserved_special_token_{n}|>", n + 1
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    ids = {t["content"]: t["id"] for t in raw["added_tokens"]}
    tok = import_tokenizer(tmp_path)
    assert tok.eot_id == ids["<|eot_id|>"] and tok.bos_id == ids["<|begin_of_text|>"]
    placed = [tok.special_id(s) for s in ("<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>", "<|image|>",
                                          "<|video|>", "<|speech_start|>", "<|speech|>", "<|speech_end|>")]
    top = sorted((i for name, i in ids.items() if "reserved" in name), reverse=True)[:8]
    assert sorted(placed) == sorted(top)
    for t in raw["added_tokens"]:  # a tokenizer with nothing left to rename is refused in one line
        t["content"] = t["content"].replace("reserved_special_token", "taken")
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(HFImportError, match="special tokens to place"):
        import_tokenizer(tmp_path)
