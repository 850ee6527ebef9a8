#!/usr/bin/env bash
# The main job on CPU: set up, fetch + build the real text kit, pretrain the tiny Llama 3, score it, sample from it.
# (The whole multimodal kit: `mm data fetch && mm data build`; post-training: experiments/lm/posttrain_tiny.yaml.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/quickstart}
.venv/bin/mm data fetch --only text
.venv/bin/mm run experiments/lm/pretrain_tiny.yaml --out "$RUN" "$@"
.venv/bin/python benchmarks/text.py --ckpt "$RUN"
.venv/bin/mm chat --ckpt "$RUN" --prompt "The old man said" --greedy --max-new-tokens 40
