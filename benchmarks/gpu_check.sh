#!/usr/bin/env bash
# The realistic shape on one GPU in bf16, twice: one device (bf16-mixed) and FSDP2 in one process
# (FSDP2Strategy, param_dtype bfloat16). Each prints step time, rollout tokens/s, peak memory
# (torch.cuda.max_memory_allocated) against the memory plan's prediction, and the roofline-floor share.
# Then, if vLLM is importable, the two rollout engines on the GPU in bf16 (benchmarks/rollout.py --engine both:
# the fused decode and the colocated vLLM engine, tokens/s and their ratio); without vLLM that step is skipped.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine (a few minutes; no downloads)
#   bash benchmarks/gpu_check.sh --full          # full fine-tuning instead of LoRA
#   bash benchmarks/gpu_check.sh --cpu --smoke   # anywhere: toy sizes on the CPU (tests/test_gpu_check.py)
#
# Options go to benchmarks/gpu_check.py (--model-root, and --full as --no-lora, also to rollout.py).
# GPU_CHECK_TIMEOUT (seconds, default 240) bounds each strategy's run, GPU_CHECK_ROLLOUT_TIMEOUT (default 600)
# the engines' run (vLLM's load included); GPU_CHECK_VLLM_PYTHON: the Python with vLLM (default: the one below).
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

# The rollout engines: GPU only (realistic shape, bf16), and only where vLLM is installed.
cpu=0
engine_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) cpu=1 ;;
        --full) engine_args+=(--no-lora) ;;
        --model-root) engine_args+=(--model-root "${2:-}"); shift ;;
        --model-root=*) engine_args+=("$1") ;;
    esac
    shift
done
echo "== gpu_check: rollout engines (fused vs vLLM) =="
vllm_python="${GPU_CHECK_VLLM_PYTHON:-$python}"
if [[ "$cpu" == 1 ]]; then
    echo "gpu_check: skipping the rollout engines (GPU only; on the CPU see benchmarks/rollout.py --engine both)"
elif ! "$vllm_python" -c "import vllm" >/dev/null 2>&1; then
    echo "gpu_check: vLLM is not importable by $vllm_python: skipping the fused-vs-vLLM rollout step" \
         "(pip install vllm, or set GPU_CHECK_VLLM_PYTHON to a Python that has it)"
else
    timeout "${GPU_CHECK_ROLLOUT_TIMEOUT:-600}" "$vllm_python" "$here/rollout.py" --shape realistic --engine both \
        --dtype bfloat16 --reps 5 ${engine_args[@]+"${engine_args[@]}"}
fi
