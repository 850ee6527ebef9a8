"""Helpers for the notebooks (notebooks/*.ipynb) and their test: tiny runs built in seconds, and the adapter anatomy.

A notebook either loads a run directory (`RUN = "runs/image_dpo_tiny"`) or, with `RUN = None`, builds a tiny run of
its own in a temporary folder with the real code paths: synthetic shards written with the project's shard writers
(webdataset TarWriter, data.image_kit.encode_image, data.video_kit.encode_mp4, espeak-ng speech via data.tts), a
randomly initialised tiny LM and ViT saved as runs, then the stage runners through mm.runner.run_config with small
overrides of the tiny YAMLs. No data kit is needed, so the test suite executes the notebooks on CI.

The anatomy helpers read what the composed model does: the softmax weights of every gated cross-attention block
(recomputed from the block's own projections on the inputs it received) and their map back onto the image's patch
grid.
"""
from __future__ import annotations

import atexit
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("image", "video", "speech")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
SIDES = ("left", "right")
DIRECTIONS = ("left", "right", "up", "down")
PHRASES = ["a red hen", "the blue car", "a green tree", "the yellow sun", "a small dog", "the old boat"]
SPANISH = {"a red hen": "una gallina roja", "the blue car": "el coche azul", "a green tree": "un árbol verde",
           "the yellow sun": "el sol amarillo", "a small dog": "un perro pequeño", "the old boat": "el barco viejo"}
# steps of the tiny stage runs: TINY (the test suite) and the default demo (still well under a minute)
STEPS = {True: {"image": 12, "video": 6, "speech": 8}, False: {"image": 300, "video": 60, "speech": 80}}
SIZE = 32  # synthetic image / frame side in px; the tiny ViT sees it as one tile of 8 x 8 patches


def resolve(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the repository root (notebooks run from notebooks/)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


# ---- synthetic shards -----------------------------------------------------------------------------------------------

def square_image(i: int, size: int = SIZE) -> tuple[np.ndarray, str, str]:
    """(H, W, 3) uint8: a coloured square on the left or right of a dark noisy background; (image, colour, side)."""
    color, side = list(COLORS)[i % 3], SIDES[(i // 3) % 2]
    img = np.random.default_rng(i).integers(0, 50, (size, size, 3)).astype(np.uint8)
    s, y = size * 3 // 8, size // 4 + (i % 4)
    x = 2 + i % 3 if side == "left" else size - s - 2 - i % 3
    img[y:y + s, x:x + s] = COLORS[color]
    return img, color, side


def moving_square(i: int, frames: int = 8, size: int = SIZE) -> tuple[np.ndarray, str]:
    """(F, H, W, 3) uint8: a bright square moving in DIRECTIONS[i % 4]; (frames, direction)."""
    d = DIRECTIONS[i % 4]
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[d]
    out = np.zeros((frames, size, size, 3), np.uint8)
    s, step = size // 4, size // (2 * frames)
    for t in range(frames):
        x = size // 2 - s // 2 + dx * step * (t - frames // 2)
        y = size // 2 - s // 2 + dy * step * (t - frames // 2)
        out[t, max(0, y):y + s, max(0, x):x + s] = (230, 200, 60)
    return out, d


def _write(path: Path, samples) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def write_image_shards(root: str | Path, n_train: int = 48, n_val: int = 6) -> dict[str, str]:
    """Image-text shards (png + caption + json {family, qa}) of square_image; {"train": spec, "val": spec}."""
    from data.image_kit import encode_image, make_qa

    root = Path(root)
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1000)):
        def sample(i):
            img, color, side = square_image(off + i)
            qa = [make_qa("What color is the square?", [color], list(COLORS)),
                  make_qa("Is the square on the left or the right?", [side], list(SIDES))]
            meta = {"source": "demo", "label": color, "family": "recognition", "qa": qa}
            return {"__key__": f"{split}{i:05d}", "png": encode_image(img, "png"),
                    "txt": f"a {color} square on the {side}.", "json": json.dumps(meta)}
        _write(root / f"{split}-000000.tar", (sample(i) for i in range(n)))
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar")}


def write_video_shards(root: str | Path, n_train: int = 16, n_val: int = 4, frames: int = 8) -> dict[str, str]:
    """Video-text shards (mp4 + caption + json {family direction, qa}) of moving_square; {"train", "val"} specs."""
    from data.image_kit import make_qa
    from data.video_kit import encode_mp4

    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        def sample(i):
            clip, d = moving_square(i, frames)
            meta = {"family": "direction", "fps": 8, "frames": frames,
                    "qa": [make_qa("In which direction does the square move?", [d], list(DIRECTIONS))]}
            return {"__key__": f"{split}{i:05d}", "mp4": encode_mp4(clip, 8), "txt": f"The square moves {d}.",
                    "json": json.dumps(meta)}
        _write(root / f"{split}-000000.tar", (sample(i) for i in range(n)))
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar")}


def write_audio_shards(root: str | Path, n_train: int = 12, n_val: int = 4) -> dict[str, str]:
    """Audio-text shards of PHRASES spoken by two espeak-ng voices (flac + transcript + json; every other sample
    with a Spanish translation for AST); {"train", "val"} specs."""
    import soundfile as sf

    from data.tts import EspeakEngine, synthesize

    eng, root = EspeakEngine(), Path(root)
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1)):
        def sample(i):
            text, voice = PHRASES[(off + i) % len(PHRASES)], ("en-us", "en-gb+f2")[i % 2]
            buf = io.BytesIO()
            sf.write(buf, synthesize(eng, text, voice), 16000, format="FLAC")
            meta = {"language": "en", "voice": f"espeak:{voice}", "engine": "espeak", "task": "asr"}
            if i % 2:
                meta.update(task="ast", translation={"lang": "es", "text": SPANISH[text]})
            return {"__key__": f"{split}{i:05d}", "flac": buf.getvalue(), "txt": text, "json": json.dumps(meta)}
        _write(root / f"{split}-000000.tar", (sample(i) for i in range(n)))
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar")}


# ---- tiny models and runs -------------------------------------------------------------------------------------------

def corpus() -> list[str]:
    """Every text the tiny runs see (prompts, answers, captions), for the tiny tokenizer."""
    from data.speech_tasks import AST_PROMPT, ASR_PROMPT
    from data.qa_format import mc_prompt, short_prompt

    words = " ".join([*COLORS, *SIDES, *DIRECTIONS, "square", "moves", "on the", "a", "the", "yes", "no"])
    qs = ["What color is the square?", "Is the square on the left or the right?", "Describe the image.",
          "Describe the video.", mc_prompt("In which direction does the square move?", list(DIRECTIONS)),
          short_prompt("In which direction does the square move?"), ASR_PROMPT.format(language="English"),
          AST_PROMPT.format(language="Spanish")]
    return [words, *qs, *PHRASES, *SPANISH.values()] * 20


def save_tiny_lm(directory: str | Path, n_layers: int = 4, vocab_size: int = 400, seed: int = 0,
                 output_std: float = 0.3) -> Path:
    """A randomly initialised tiny Llama (dim 32, GQA 4/2 heads; output head at std output_std) with a tokenizer
    trained on corpus(), saved as an LM run (mm.model.runs.save_lm); returns the run directory."""
    from llm.model import Llama, LlamaConfig
    from llm.tokenizer import train_tokenizer
    from mm.model.runs import save_lm

    tok = train_tokenizer(corpus(), vocab_size)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      max_seq_len=160)
    torch.manual_seed(seed)
    lm = Llama(cfg)
    with torch.no_grad():  # at std 0.02 a random head's logits are too flat for any adapter to steer them
        lm.output.weight.normal_(0.0, output_std)
    save_lm(Path(directory) / "final", lm.state_dict(), cfg, tok, {"stage": "lm_pretrain"})
    return Path(directory)


def save_tiny_vision(directory: str | Path, seed: int = 1):
    """A randomly initialised tiny ViT (one 32-px tile of 4-px patches) saved as a clip run; returns the directory."""
    from encoders.vision import VisionConfig, VisionEncoder
    from mm.model.checkpoint import save_weights

    vcfg = VisionConfig(image_size=SIZE, patch_size=4, width=32, layers=2, heads=2, mlp_dim=64, taps=[0], n_gated=1,
                        max_tiles=1)
    torch.manual_seed(seed)
    enc = VisionEncoder(vcfg)
    save_weights(Path(directory) / "final", {"model": {f"vision.{k}": v for k, v in enc.state_dict().items()}},
                 {"kind": "clip", "vision_config": vcfg.to_dict()})
    return Path(directory)


def _train(steps: int, batch: int, lr: float) -> list[str]:
    return [f"steps={steps}", f"train.batch_size={batch}", "train.warmup_steps=1", "train.threads=0",
            "train.log_every=1", "train.progress=false", f"train.ckpt_every={steps}", f"train.lr={lr}"]


def _stage(yaml: str, out: Path, overrides: list[str]) -> Path:
    from mm.runner import run_config

    run_config(REPO / "experiments" / yaml, overrides, out)
    return out


def tiny_image_run(root: str | Path, steps: int = 12) -> Path:
    """image_pretrain (the real runner) of a tiny ViT + adapter on square_image shards into root/image."""
    root = Path(root)
    shards = write_image_shards(root / "shards_image")
    return _stage("image/image_pretrain_tiny.yaml", root / "image", [
        f"lm={save_tiny_lm(root / 'lm')}", f"vision={save_tiny_vision(root / 'clip')}", f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}", "adapter.every=2", "seq_len=48", "caption_prob=0.2", *_train(steps, 8, 1e-2)])


def tiny_video_run(root: str | Path, steps: int = 6, image_steps: int = 12) -> Path:
    """video_pretrain (the real runner) on moving_square clips, from a tiny image run, into root/video."""
    root = Path(root)
    image = tiny_image_run(root, image_steps)
    shards = write_video_shards(root / "shards_video")
    return _stage("video/video_pretrain_tiny.yaml", root / "video", [
        f"init_from={image}", f"data.shards={shards['train']}", f"data.val_shards={shards['val']}", "num_frames=8",
        "factor=8", "aggregator.width=16", "aggregator.n_latents=1", "aggregator.depth=1", "aggregator.heads=2",
        "aggregator.max_frames=16", "seq_len=96", "eval_items=0", *_train(steps, 4, 1e-2)])


def tiny_speech_run(root: str | Path, steps: int = 8) -> Path:
    """speech_sft (the real runner; Conformer from random init, encoder_from null) on espeak-ng shards into
    root/speech."""
    root = Path(root)
    shards = write_audio_shards(root / "shards_audio")
    return _stage("speech/speech_sft_tiny.yaml", root / "speech", [
        f"lm={save_tiny_lm(root / 'lm')}", "encoder_from=null", f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}", "encoder.dim=32", "encoder.layers=2", "encoder.heads=2",
        "encoder.ffn_dim=64", "adapter.dim=16", "adapter.heads=2", "adapter.ffn_dim=32", "seq_len=96",
        "eval_items=0", *_train(steps, 4, 3e-3)])


def notebook_run(kind: str, run: str | Path | None = None, tiny: bool = False) -> Path:
    """The run a notebook shows: `run` (resolved against the repo root) when given, else a fresh tiny run of `kind`
    ("image", "video" or "speech") in a temporary folder removed when the kernel exits (STEPS[tiny] steps)."""
    if run is not None:
        return resolve(run)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(tempfile.mkdtemp(prefix=f"mm_demo_{kind}_"))
    atexit.register(shutil.rmtree, root, True)
    steps = STEPS[bool(tiny)]
    if kind == "image":
        return tiny_image_run(root, steps["image"])
    if kind == "video":
        return tiny_video_run(root, steps["video"], steps["image"])
    return tiny_speech_run(root, steps["speech"])


def val_shards(run: str | Path) -> str:
    """The held-out shards a run's resolved config names (data.val_shards), resolved against the repo root."""
    import yaml

    spec = yaml.safe_load((Path(run) / "config.yaml").read_text())["data"]["val_shards"]
    return str(resolve(spec)) if not Path(spec).is_absolute() else spec


def held_out_image(run: str | Path, image_size: int, seed: int = 1) -> tuple[np.ndarray, str]:
    """One held-out image of a run as (3, H, W) uint8 and a question about it: from an image run's val shards (its
    first qa question, else "Describe the image."), or the middle frame of a video run's held-out clip."""
    from mm.model.checkpoint import load_meta
    from mm.model.runs import model_dir

    meta = load_meta(model_dir(run))
    if "video" in (meta.get("streams") or meta):  # a composed run, or one written before format 2
        from mm.eval.video import load_video_samples

        frames = load_video_samples(val_shards(run), 8, image_size, max_items=1, seed=seed)[0][0]["frames"]
        return np.asarray(frames[len(frames) // 2]), "Describe the image."
    from data.loader import load_image_samples

    sample = load_image_samples(val_shards(run), image_size, max_samples=1, seed=seed)[0][0]
    qa = (sample["meta"] or {}).get("qa") or [{"question": "Describe the image."}]
    return np.asarray(sample["image"]), qa[0]["question"]


# ---- adapter anatomy ------------------------------------------------------------------------------------------------

@torch.no_grad()
def cross_attention_maps(model, tokens: torch.Tensor, image=None, video=None) -> dict[str, torch.Tensor]:
    """Run model(tokens, image=..., video=...) once and return every cross-attention block's softmax weights for
    batch row 0: {"image/<layer>" | "video/<layer>": (heads, T, M*N)}; rows that see no media are all zero (each
    block's own `attention_weights` on the inputs it received)."""
    seen, hooks = {}, []
    for name, stream in (("image", model.image), ("video", model.video)):
        blocks = getattr(stream, "blocks", None) if stream is not None else None
        for i, blk in (blocks or {}).items():
            def grab(mod, args, key=f"{name}/{i}"):
                seen[key] = (mod, args)
            hooks.append(blk.register_forward_pre_hook(grab))
    try:
        model(tokens, image=image, video=video)
    finally:
        for h in hooks:
            h.remove()
    return dict(sorted((key, blk.attention_weights(*args)[0]) for key, (blk, args) in seen.items()))


def patch_heatmap(weights: torch.Tensor, vcfg, aspect_id: int = 0) -> np.ndarray:
    """Attention over one image's media tokens (n_tiles * (1 + grid^2),: CLS then patches per tile) -> a
    (rows * grid, cols * grid) map over the image's patch layout (tiles placed by their aspect-ratio grid; a
    thumbnail tile, first, is left out)."""
    from encoders.vision import supported_grids, with_thumbnail

    g, per = vcfg.grid, vcfg.tokens_per_tile
    rows, cols = supported_grids(vcfg.max_tiles)[int(aspect_id)]
    first = with_thumbnail(rows * cols, vcfg.thumbnail) - rows * cols  # the grid's tiles follow the thumbnail
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    heat = np.zeros((rows * g, cols * g), np.float32)
    for t in range(rows * cols):
        patches = w[(first + t) * per + 1:(first + t + 1) * per].reshape(g, g).numpy()
        r, c = divmod(t, cols)
        heat[r * g:(r + 1) * g, c * g:(c + 1) * g] = patches
    return heat


# ---- plots ----------------------------------------------------------------------------------------------------------

def printable(text) -> str:
    """Text safe to draw: characters a font cannot show (control bytes a random tiny LM may emit) become '?'."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in str(text))


def wrap(text, width: int) -> str:
    """printable(text) with each of its lines wrapped at `width` characters."""
    import textwrap

    return "\n".join(w for part in printable(text).splitlines() for w in textwrap.wrap(part, width) or [""])


def show_images(images, titles, ncols: int = 4, size: float = 2.6, width: int = 34, suptitle: str | None = None):
    """A grid of (H, W, 3) / (3, H, W) uint8 images, each titled (lines wrapped at `width` characters), under an
    optional figure title; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    tall = max(len(str(t).splitlines()) for t in titles) * 0.3
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + tall + 0.3) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        img = np.asarray(img)
        ax.imshow(img.transpose(1, 2, 0) if img.shape[0] == 3 and img.ndim == 3 else img)
        ax.set_title(wrap(title, width), fontsize=7.5)
    if suptitle:
        fig.suptitle(wrap(suptitle, 24 * ncols), fontsize=8)
    fig.tight_layout()
    return fig


def plot_gate_bars(gates: dict[str, float], title: str = "tanh(gate) per cross-attention block"):
    """Bars of gate values {"image/3.attn": v, ...} grouped by block, attention and FFN gates side by side."""
    import matplotlib.pyplot as plt

    blocks = sorted({k.rsplit(".", 1)[0] for k in gates}, key=lambda b: (b.split("/")[0], int(b.split("/")[1])))
    x = np.arange(len(blocks))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(blocks) + 2), 3.0))
    for j, part in enumerate(("attn", "ffn")):
        ax.bar(x + (j - 0.5) * 0.38, [gates.get(f"{b}.{part}", 0.0) for b in blocks], 0.38, label=part)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, [f"{b.split('/')[0]} before\nlayer {b.split('/')[1]}" for b in blocks], fontsize=8)
    ax.set_ylabel("tanh(gate)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
