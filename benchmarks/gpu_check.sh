#!/usr/bin/env bash
# The GPU checks, as one script for a lent device machine (see README): the ~1B-shape bf16 speed benchmark against
# transformers, then the tiny pretraining stage end to end on the GPU (bf16 autocast) and its text benchmark.
# Expects the pinned wheels in .whl/ (omegaconf, webdataset, braceexpand, open_clip_torch, ftfy, wcwidth) and the text
# shards in .cache/shards/text (device tool: carry .whl and .cache/shards/text).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/speed_lm.py --shape 1b --device cuda --dtype bf16 --batch 2 --seq-len 2048 --steps 8 --warmup 3 \
  2>/dev/null | tee "$OUT/speed_1b_bf16.json"
python3 benchmarks/speed_lm.py --shape small --device cuda --dtype bf16 --batch 16 --seq-len 1024 --steps 8 --warmup 3 \
  2>/dev/null | tee "$OUT/speed_small_bf16.json"
python3 -m pytest tests/test_fused.py -q -k cuda -p no:cacheprovider 2>&1 | tail -3
RUN=/tmp/gpu_run
timeout 240 python3 -m mm.cli run experiments/lm/pretrain_tiny.yaml --out $RUN --force train.progress=false \
  train.device=cuda 2>"$OUT/run_stderr.txt" | tee "$OUT/gpu_run.json"
tail -3 "$OUT/run_stderr.txt"
python3 benchmarks/text.py --ckpt $RUN 2>/dev/null | tee "$OUT/gpu_text.json"
cp $RUN/metrics.jsonl "$OUT/gpu_metrics.jsonl"
