"""`mm import hf`: a Hugging Face Llama folder (llm.import_hf) written as an LM run directory.

RUN/final/{model.safetensors, meta.json (model_config, stage "import_hf", chat, source: folder, config sha256)},
RUN/tokenizer.json, RUN/model_config.json, RUN/result.json: what lm_pretrain writes, so every stage takes RUN as
`lm=` / `instruct_lm=` and mm chat / mm eval / mm export load it.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.atomic import atomic_write_text
from llm.import_hf import import_hf
from llm.model import Llama
from mm.model.checkpoint import file_sha256, load_into
from mm.train.rundir import RunLock
from mm.model.runs import FINAL, save_lm


def import_hf_run(model: str | Path, out: str | Path, chat: bool = False, force: bool = False) -> dict:
    """Import the HF folder `model` into run directory `out` (refused if out/final exists, unless force); returns
    the result dict (also out/result.json). chat: an instruct model (mm chat then uses the chat template)."""
    out, src = Path(out), Path(model)
    with RunLock(out):
        if (out / FINAL).exists() and not force:
            raise ValueError(f"{out / FINAL}: exists; pass --force to overwrite it")
        state, cfg, tok = import_hf(src)
        load_into(Llama(cfg), state, src)  # every key and shape fits before anything is written
        source = {"folder": str(src.resolve()), "config_sha256": file_sha256(src / "config.json")}
        save_lm(out / FINAL, state, cfg, tok, {"stage": "import_hf", "chat": chat, "source": source})
        tok.save(out / "tokenizer.json")
        atomic_write_text(out / "model_config.json", json.dumps(cfg.to_dict(), indent=1))
        result = {"stage": "import_hf", "run_dir": str(out), "source": source, "chat": chat,
                  "params": sum(v.numel() for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")),
                  "vocab_size": tok.vocab_size, "tie_embeddings": cfg.tie_embeddings,
                  "rope_scaling": cfg.rope_scaling}
        atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    return result
