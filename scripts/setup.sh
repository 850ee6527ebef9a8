#!/usr/bin/env bash
# Create .venv with the pinned packages the first time (and again whenever pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # the pinned torch triple first (CPU use works with the default wheels), then the project and test extras
  .venv/bin/python -m pip install -q "torch==2.11.0" "torchvision==0.26.0" "torchaudio==2.11.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
