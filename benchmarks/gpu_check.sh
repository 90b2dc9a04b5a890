#!/usr/bin/env bash
# The realistic shape on one GPU in bf16, twice: one device (bf16-mixed) and FSDP2 in one process
# (FSDP2Strategy, param_dtype bfloat16). Each prints step time, rollout tokens/s, peak memory
# (torch.cuda.max_memory_allocated) against the memory plan's prediction, and the roofline-floor share.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine (a few minutes; no downloads)
#   bash benchmarks/gpu_check.sh --full          # full fine-tuning instead of LoRA
#   bash benchmarks/gpu_check.sh --cpu --smoke   # anywhere: toy sizes on the CPU (tests/test_gpu_check.py)
#
# Options go to benchmarks/gpu_check.py. GPU_CHECK_TIMEOUT (seconds, default 240) bounds each strategy's run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="$root/.venv/bin/python"
if [[ ! -x "$python" ]]; then
    python="$(command -v python3)"
fi
limit="${GPU_CHECK_TIMEOUT:-240}"

cd "$root"
# Build the model once, outside the timed runs (the real tokenizer and ~180 M random weights: ~30 s).
"$python" "$here/gpu_check.py" --build-only "$@"
for strategy in single fsdp2; do
    echo "== gpu_check: $strategy =="
    timeout "$limit" "$python" "$here/gpu_check.py" --strategy "$strategy" "$@"
done
