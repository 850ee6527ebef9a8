"""Cross-attention image fusion vs LLaVA-style concatenation (image tokens as extra LM positions before the text).

For each image-token count: forward time and analytic forward FLOPs of both on the same LM, text and projected image
features; generation tokens/s of the composed model with the image keys/values cached once vs recomputed every step
("xattn_cache_speedup" = cached / recomputed, whole calls; "xattn_cache_decode_speedup" the same for decode steps
only), and of the concatenation model (its LM KV cache holds the image).
FLOPs: 2 per multiply-add of every matmul (norms, softmax and elementwise ops ignored); causal self-attention counts
only the attended (query, key) pairs, 4·D per pair (scores + weighted values); logits only over text positions.
Prints one JSON line.
    python benchmarks/speed_mm.py                               # small shape, CPU
    python benchmarks/speed_mm.py --shape tiny --image-tokens 16 64 --reps 5
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse
import json
import time

import torch

from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig, shape_config
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.streams import ImageStream


def lm_flops(cfg: LlamaConfig, positions: int, text: int) -> float:
    """Forward FLOPs of the LM over `positions` causal positions, with logits on the last `text` of them."""
    hd = cfg.head_dim
    per_pos = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    attn_pairs = positions * (positions + 1) / 2
    body = cfg.n_layers * (2.0 * positions * per_pos + 4.0 * cfg.dim * attn_pairs)
    return body + 2.0 * text * cfg.vocab_size * cfg.dim


def xattn_block_flops(cfg: LlamaConfig, text: int, media: int) -> float:
    """Forward FLOPs of one cross-attention block: q/o and FFN over text, k/v over media, text x media attention."""
    hd = cfg.head_dim
    per_text = 2 * cfg.dim * cfg.n_heads * hd + 3 * cfg.dim * cfg.ffn_dim
    return 2.0 * text * per_text + 2.0 * media * cfg.dim * 2 * cfg.n_kv_heads * hd + 4.0 * text * media * cfg.dim


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Best-of-reps seconds of each fn, after one warm-up each; the fns alternate within every round, so drift in
    machine load hits them alike, and the minimum discards rounds slowed by other processes on a shared CPU."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


@torch.no_grad()
def llava_generate(model: ComposedLM, prompt: list[int], feats: torch.Tensor, n_new: int) -> list[int]:
    """Greedy decoding with the projected image tokens as LM positions before the prompt (LM KV cache only)."""
    lm = model.lm
    img = model.image.adapter.projection(feats)  # (1, N, D)
    embeds = torch.cat([img, lm.tok_embeddings(torch.tensor([prompt]))], dim=1)  # (1, N + T, D)
    out: list[int] = []
    try:
        lm.setup_cache(1, embeds.shape[1] + n_new)
        logits = lm(embeds=embeds)[0, -1]
        pos = embeds.shape[1]
        for _ in range(n_new):
            out.append(int(logits.argmax()))
            logits = lm(torch.tensor([[out[-1]]]), start_pos=pos)[0, -1]
            pos += 1
    finally:
        lm.clear_cache()
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", help="named LM shape (llm/model.py SHAPES)")
    ap.add_argument("--dim", type=int, default=0, help="override width (with --n-layers: a custom tiny LM)")
    ap.add_argument("--n-layers", type=int, default=0)
    ap.add_argument("--media-dim", type=int, default=768, help="encoder feature width (6 taps x 128 here)")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    over = {"max_seq_len": max(args.image_tokens) + args.text_len + args.gen_tokens + 1}
    if args.dim:
        over.update(dim=args.dim, n_heads=4, n_kv_heads=2, vocab_size=512)
    if args.n_layers:
        over["n_layers"] = args.n_layers
    cfg = shape_config(args.shape, **over)
    torch.manual_seed(0)
    lm = Llama(cfg).eval()
    img_id = cfg.vocab_size - 8
    # features of width media_dim are given directly: the stream's one-block ViT only fixes that width and never runs
    vision = VisionEncoder(VisionConfig(image_size=16, patch_size=8, width=args.media_dim, layers=1, heads=1,
                                        mlp_dim=args.media_dim, taps=[], n_gated=0))
    spec = {"kind": "gated_xattn", "every": min(args.every, cfg.n_layers)}
    model = ComposedLM(lm, image=ImageStream.build(lm, img_id, vision, spec)).eval()
    with torch.no_grad():  # open the gates so the fused path does its real work
        for blk in model.image.blocks.values():
            blk.gate_attn.fill_(0.5)
            blk.gate_ffn.fill_(0.5)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, cfg.vocab_size - 16, (args.batch, args.text_len), generator=g)
    text[:, 0] = img_id  # the image comes first, then the text
    n_blocks = len(model.image.blocks)
    configs = []
    for n in args.image_tokens:
        feats = torch.randn(args.batch, 1, n, args.media_dim, generator=g)
        proj = 2.0 * n * args.media_dim * cfg.dim

        def concat_forward():
            img = model.image.adapter.projection(feats[:, 0])  # (B, N, D)
            h = lm(embeds=torch.cat([img, lm.tok_embeddings(text)], dim=1), return_hidden=True)  # (B, N + T, D)
            return lm.output(h[:, n:])

        fwd = timed({"xattn": lambda: model(text, image=feats), "llava": concat_forward}, args.reps)
        x_s, c_s = fwd["xattn"], fwd["llava"]
        x_fl = proj + lm_flops(cfg, args.text_len, args.text_len) + n_blocks * xattn_block_flops(cfg, args.text_len, n)
        c_fl = proj + lm_flops(cfg, n + args.text_len, args.text_len)
        x_fl, c_fl = args.batch * x_fl, args.batch * c_fl
        prompt, one = text[0].tolist(), feats[0]
        G = args.gen_tokens
        runs = {"cached": lambda k: generate(model, prompt, k, image=one),
                "recomputed": lambda k: generate(model, prompt, k, image=one, cache_media=False),
                "llava": lambda k: llava_generate(model, prompt, one, k)}
        # whole calls of G tokens, and of 1 token (media + prefill only): decode rate = (G - 1) / difference
        t = timed({f"{name}_{k}": (lambda fn=fn, k=k: fn(k)) for name, fn in runs.items() for k in (G, 1)}, args.reps)
        gen = {name: G / t[f"{name}_{G}"] for name in runs}
        dec = {name: (G - 1) / max(t[f"{name}_{G}"] - t[f"{name}_1"], 1e-9) for name in runs}
        configs.append({
            "image_tokens": n, "xattn_forward_s": x_s, "llava_forward_s": c_s, "forward_speedup": c_s / x_s,
            "xattn_forward_flops": x_fl, "llava_forward_flops": c_fl, "flops_ratio_llava_over_xattn": c_fl / x_fl,
            "xattn_gen_tokens_per_s": gen["cached"], "xattn_gen_nocache_tokens_per_s": gen["recomputed"],
            "xattn_cache_speedup": gen["cached"] / gen["recomputed"], "llava_gen_tokens_per_s": gen["llava"],
            "xattn_decode_tokens_per_s": dec["cached"], "xattn_decode_nocache_tokens_per_s": dec["recomputed"],
            "xattn_cache_decode_speedup": dec["cached"] / dec["recomputed"], "llava_decode_tokens_per_s": dec["llava"],
        })
        print(f"image tokens {n}: done", file=sys.stderr)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "shape": args.shape, "dim": cfg.dim,
           "n_layers": cfg.n_layers, "xattn_blocks": n_blocks, "media_dim": args.media_dim, "batch": args.batch,
           "text_len": args.text_len, "gen_tokens": args.gen_tokens,
           "timing": "best of reps, alternating; *_gen_* = whole greedy call (media KV + prefill + decode), "
                     "*_decode_* = (G-1) / (t(G tokens) - t(1 token)), batch 1; FLOPs for the whole batch",
           "configs": configs}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
