#!/usr/bin/env bash
# The main job on CPU: set up, fetch + build the real data kit, then the whole herd at tiny scale
# (experiments/quickstart.yaml: LM pretraining, chat SFT + DPO, CLIP, image pretrain/anneal/SFT soup/DPO, video
# pretrain/SFT, BEST-RQ speech pretrain/SFT, the benchmarks) and its report: $RUN/report/report.md.
# A second run reuses the kit and every completed stage. Extra arguments go to `mm run` (e.g. --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/herd}
SHARDS=.cache/shards  # every stage YAML reads its shards here
.venv/bin/mm data fetch
if [ -f "$SHARDS/manifest.json" ]; then
  echo "[quickstart] data kit: reusing $SHARDS (remove it to rebuild)" >&2
else
  .venv/bin/mm data build --out "$SHARDS"
fi
if [ ! -f "$SHARDS/image_anneal/manifest.json" ]; then  # a kit built before the annealing set existed
  .venv/bin/mm data build experiments/data/image_anneal.yaml --out "$SHARDS"
fi
if [ ! -f "$SHARDS/photos/manifest.json" ]; then  # a kit built before the held-out photos existed
  .venv/bin/mm data build experiments/data/photos.yaml --out "$SHARDS"
fi
if [ ! -f "$SHARDS/speech_human/manifest.json" ]; then  # a kit built before the recorded human speech existed
  .venv/bin/mm data build experiments/data/human_speech.yaml --out "$SHARDS"
fi
.venv/bin/mm run experiments/quickstart.yaml --out "$RUN" "$@"
echo "[quickstart] report: $RUN/report/report.md" >&2
