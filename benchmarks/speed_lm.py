"""Training-step speed of our Llama against transformers' LlamaForCausalLM on the same config, weights and batch.

Full steps (forward, backward, AdamW) alternate between the two models in one process; prints one JSON line with
both tokens/s, "ratio_vs_hf" (ours over theirs), MFU where the device's peak is known, and peak memory.
    python benchmarks/speed_lm.py                       # tiny shape, CPU, fp32
    python benchmarks/speed_lm.py --shape 1b --device cuda --dtype bf16 --batch 4 --seq-len 2048
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse
import json
import resource
import statistics
import time

import torch

from llm.export import hf_config, to_hf_state
from llm.model import Llama, flops_per_token, shape_config
from mm.train.metrics import mfu, peak_flops


def build_pair(args, device):
    """Our model and an HF model holding the same weights."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    over = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = shape_config(args.shape, max_seq_len=max(args.seq_len, 512), **over)
    torch.manual_seed(0)
    ours = Llama(cfg).to(device)
    hf_cfg = HFConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)
    hf.load_state_dict(to_hf_state(ours.state_dict(), cfg))
    return cfg, ours, hf


def make_step(model, is_hf: bool, tokens, amp, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if is_hf:
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                loss = model(tokens[:, :-1], labels=tokens[:, 1:])  # our training path: fused projection + CE
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # forces a device sync, like a real loop logging its loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--vocab", type=int, default=0, help="override the shape's vocab size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip-hf", action="store_true", help="time only our model (e.g. where HF would not fit)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg, ours, hf = build_pair(args, device)
    amp = args.dtype == "bf16"
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    # HF shifts labels inside; give it the same T input positions as ours
    steps = {"ours": make_step(ours, False, tokens, amp, device)}
    if not args.skip_hf:
        steps["hf"] = make_step(hf, True, tokens[:, :-1].contiguous(), amp, device)
    else:
        del hf
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():  # alternate, so drift in machine load hits both alike
            t = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
        print(f"step {i + 1}/{args.warmup + args.steps}", file=sys.stderr, end="\r")
    tok_per_step = args.batch * args.seq_len
    out = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq_len,
           "params": sum(p.numel() for p in ours.parameters())}
    peak = peak_flops(device)
    fpt = flops_per_token(cfg, args.seq_len)
    for name, ts in times.items():
        tps = tok_per_step / statistics.median(ts)
        out[f"{name}_tokens_per_s"] = tps
        out[f"{name}_mfu"] = mfu(fpt, tps, peak)
    if "hf" in times:
        out["ratio_vs_hf"] = out["ours_tokens_per_s"] / out["hf_tokens_per_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(out))


if __name__ == "__main__":
    main()
