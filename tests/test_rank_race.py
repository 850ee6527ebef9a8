"""Files one rank writes and others read (token caches) are written atomically by rank 0 and read after a barrier:
with rank 0's writer slowed down mid-file, rank 1 still reads the complete cache (issue: the torchrun race in CI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

# Rank 0 writes its .npz in two halves with a pause between them, straight into the path it is given; rank 1 starts
# reading during the pause. Reading the destination before the barrier would hit the half-written file.
SCRIPT = r'''
import io, json, os, sys, time
from pathlib import Path
import numpy as np
from data import token_stream
from llm.tokenizer import train_tokenizer
from mm.train.distributed import init_distributed
from mm.stages.lm_pretrain import token_sources

out = Path(sys.argv[1])
info = init_distributed("cpu")
docs = [{"source": "a", "text": f"document number {i} about cats and dogs"} for i in range(40)]
tok = train_tokenizer([d["text"] for d in docs], 300)

def slow_save(self, path):
    buf = io.BytesIO()
    np.savez(buf, tokens=self.tokens, starts=self.starts)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2]); f.flush()
        time.sleep(1.5)
        f.write(data[len(data) // 2:])

if info.rank == 0:
    token_stream.TokenSource.save = slow_save
else:
    time.sleep(0.5)  # rank 0 is now inside its slowed write
src = token_sources(docs, tok, out / "tokens", "train", info)["a"]
(out / f"rank{info.rank}.json").write_text(json.dumps({"n": len(src), "sum": int(src.tokens.sum())}))
'''


def test_rank1_waits_for_rank0s_token_cache(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["n"] > 0
    assert not list((tmp_path / "tokens").glob(".tmp-*"))  # the temp file was renamed, not left behind
