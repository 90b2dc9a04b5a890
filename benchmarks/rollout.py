"""Rollout time of each decoding path, alternating in one process, as ratios to Hugging Face ``generate``.

    python benchmarks/rollout.py                      # tiny random Qwen2-Audio, LoRA, B=4, G=6, 64 tokens
    python benchmarks/rollout.py --model DIR --dtype bfloat16 --max-new-tokens 256

Paths: ``generate`` (HF, on the shared prompt prefill), ``off`` (our decode loop, the decoder's forward
per token), ``adapters`` (the fused step, the policy's default) and ``merged`` (fused, LoRA merged). Each
repetition runs every path once on the same prompts with EOS suppressed, so all decode exactly
``--max-new-tokens`` tokens (equal work). Prints median ms per rollout and the ratio to ``generate``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, quantiles, sync, synthetic_batch  # noqa: E402
from grpo_step import default_model_dir  # noqa: E402

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings  # noqa: E402

PATHS = ("generate", "off", "adapters", "merged")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local Qwen2-Audio dir (default: the tiny model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-lora", action="store_true", help="full fine-tuning: no adapters")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = AudioLMPolicy(args.model or default_model_dir(), dtype=args.dtype,
                           lora=None if args.no_lora else LoraSettings()).load().to(device)
    with torch.no_grad():  # non-zero adapters, as after training has started
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    batch = synthetic_batch(args.batch_size)
    prompts = policy.build_prompts(batch["waveforms"], batch["sample_rate"], "What is the emotion?").to(device)
    policy.audio_token_ids = [*policy.audio_token_ids, *policy.eos_token_ids]  # equal work: EOS never sampled
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    with torch.no_grad():
        pe = policy.encode_prompts(prompts)
        for rep in range(args.reps + 1):  # the first round warms up
            for path in PATHS:
                policy.decoding = "generate" if path == "generate" else "loop"
                policy.fused_decode = path if path in ("adapters", "merged") else "off"
                sync()
                start = time.perf_counter()
                out = policy.rollout(pe, args.group_size, max_new_tokens=args.max_new_tokens)
                sync()
                if rep:
                    times[path].append(time.perf_counter() - start)
                assert out.completion_ids.shape[1] == args.max_new_tokens
    base = quantiles(times["generate"])["median"]
    print(f"device={device} dtype={args.dtype} B={args.batch_size} G={args.group_size} "
          f"tokens={args.max_new_tokens} lora={not args.no_lora} reps={args.reps}")
    rows = []
    for path in PATHS:
        q = quantiles(times[path])
        rows.append([path, 1e3 * q["median"], 1e3 * q["min"], 1e3 * q["max"], q["median"] / base])
    print_table("rollout, median over reps", ["path", "ms", "min ms", "max ms", "/ generate"], rows)
    return {f"{path}_over_generate": quantiles(times[path])["median"] / base for path in PATHS}


if __name__ == "__main__":
    main()
