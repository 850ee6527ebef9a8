"""The notebooks (notebooks/*.ipynb) run end to end in tiny mode (the parameters cell replaced by RUN = None,
TINY = True: each trains its own tiny run through mm.demo and the real stage runners) and show what they claim:
pictures, the figures' lines, the bitwise text-preservation check. Also the anatomy helpers of mm.demo against the
gated cross-attention block they read."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "notebooks"
NOTEBOOKS = ("image_chat.ipynb", "video_qa.ipynb", "speech.ipynb", "adapter_anatomy.ipynb")
CELL_TIMEOUT = 120  # seconds per cell; the four notebooks take ~1 minute together on one thread


def execute(name: str):
    """Run one notebook in tiny mode in a fresh python3 kernel (the venv's, in notebooks/); returns the executed
    notebook. The kernel imports this checkout's code (the repo root first on PYTHONPATH), not whichever checkout an
    editable install points at."""
    nb = nbformat.read(NB / name, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RUN = None" in params[0].source and "TINY = False" in params[0].source, name
    params[0].source = "RUN = None\nTINY = True"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NB)}}).execute(env=env)
    return nb


def text_of(nb) -> str:
    """Everything the notebook printed (streams and text/plain results), in order."""
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def accuracies(text: str, pattern: str) -> list[float]:
    """The figures a printed line matching pattern holds, each checked to be an accuracy in [0, 1]."""
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    vals = [float(v) for v in m.groups()]
    assert all(0 <= v <= 1 for v in vals), m.group(0)
    return vals


def count(nb, mime: str) -> int:
    return sum(mime in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_committed_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(NB / name, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_image_chat_notebook():
    nb = execute("image_chat.ipynb")
    text = text_of(nb)
    assert count(nb, "image/png") >= 1 and "Q: What color is the square?" in text
    accuracies(text, r"vqa_acc ([\d.]+)  blind_vqa_acc ([\d.]+)  shuffled_vqa_acc ([\d.]+)")


def test_video_qa_notebook():
    nb = execute("video_qa.ipynb")
    text = text_of(nb)
    assert count(nb, "image/png") >= 2 and "In which direction does the square move?" in text
    accuracies(text, r"video_acc ([\d.]+)  single_frame_acc ([\d.]+)  blind_acc ([\d.]+)")


def test_speech_notebook():
    nb = execute("speech.ipynb")
    text = text_of(nb)
    assert count(nb, "image/png") >= 1 and count(nb, "text/html") >= 1  # spectrograms and an audio player
    assert "ASR [Repeat after me in English:]" in text and "AST [Translate the following sentence into Spanish:]" in text
    assert re.search(r"^WER \d+\.\d+  blind_wer \d+\.\d+  BLEU \d+\.\d+", text, re.M), text


def test_adapter_anatomy_notebook():
    nb = execute("adapter_anatomy.ipynb")
    text = text_of(nb)
    assert "bitwise_equal True" in text and "before <|image|>: max |diff| 0.0;" in text, text
    assert re.search(r"image/3\.attn\s+[+-]\d\.\d{4}", text)  # the gate table of the tiny run (blocks at 1 and 3)
    assert count(nb, "image/png") >= 5  # gate bars, gates over training, overlays, token map, logit differences


def test_cross_attention_maps_reproduce_the_block():
    """The recomputed softmax weights, applied to the values, give exactly the block's attention output; rows before
    the marker see nothing; patch_heatmap puts a patch's weight at its place in the grid."""
    from encoders.vision import VisionConfig, VisionEncoder, supported_grids
    from llm.model import Llama, LlamaConfig
    from mm.demo import cross_attention_maps, patch_heatmap
    from mm.model.composed import ComposedLM
    from mm.model.streams import ImageStream

    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    enc = VisionEncoder(VisionConfig(image_size=16, patch_size=4, width=8, layers=2, heads=1, mlp_dim=8, taps=[0, 1],
                                     n_gated=0, max_tiles=1))  # out_dim 8 * 3 = 24
    model = ComposedLM(lm, image=ImageStream.build(lm, 5, enc, {"every": 2})).eval()
    blk = model.image.blocks["1"]
    with torch.no_grad():
        blk.gate_attn.fill_(0.7)  # gate_ffn stays 0: the block adds tanh(0.7) * attention output only
    seen = {}
    blk.register_forward_hook(lambda m, args, out: seen.update(x=args[0], kv=args[1], out=out))
    tokens = torch.tensor([[1, 2, 3, 5, 7, 8, 9]])
    media = torch.randn(1, 1, 10, 24)
    w = cross_attention_maps(model, tokens, image=media)["image/1"]  # (H, T, N)
    assert w.shape == (4, 7, 10) and torch.all(w[:, :3] == 0)
    assert torch.allclose(w[:, 3:].sum(-1), torch.ones(4, 4), atol=1e-5)
    v = seen["kv"][1].repeat_interleave(2, dim=1)[0]  # (H, N, hd)
    attn = blk.wo((w @ v).transpose(0, 1).reshape(7, -1))  # (T, D)
    assert torch.allclose(seen["x"][0] + torch.tanh(torch.tensor(0.7)) * attn, seen["out"][0], atol=1e-5)

    vcfg = VisionConfig(image_size=16, patch_size=4, width=8, layers=1, heads=1, mlp_dim=8, taps=[0], n_gated=0,
                        max_tiles=1)
    one = torch.zeros(17)
    one[1 + 2 * 4 + 3] = 1.0  # patch in row 2, column 3 (token 0 is the CLS token)
    heat = patch_heatmap(one, vcfg)
    assert heat.shape == (4, 4) and heat[2, 3] == 1 and heat.sum() == 1
    # a 1x2 grid behind a thumbnail tile: the thumbnail's 17 tokens come first and are left out of the map
    tiled = VisionConfig(**{**vcfg.to_dict(), "max_tiles": 2, "thumbnail": True})
    w = torch.zeros(3 * 17)
    w[1] = 5.0  # the thumbnail's first patch
    w[2 * 17 + 1 + 4] = 1.0  # the second grid tile's patch in row 1, column 0
    heat = patch_heatmap(w, tiled, aspect_id=supported_grids(2).index((1, 2)))
    assert heat.shape == (4, 8) and heat[1, 4] == 1 and heat.sum() == 1
