"""One GPU check of the realistic shape: step time, rollout tokens/s, peak memory against the memory plan,
and the step's share of the roofline floor, for one strategy. ``gpu_check.sh`` runs it for each.

    python benchmarks/gpu_check.py --strategy single     # one device, bf16-mixed (configs/trainer/single_gpu.yaml)
    python benchmarks/gpu_check.py --strategy fsdp2      # FSDP2Strategy(param_dtype: bfloat16), one process
    python benchmarks/gpu_check.py --cpu --smoke ...     # on the CPU, toy sizes (the test)

The model is built locally (``_common.model_dir_for``: the real tokenizer, 156,032-row vocabulary and 30 s
window; encoder d=256 x 4, LM d=512 x 4), so nothing is downloaded. The fp32 policy (LoRA r = 8, or full
fine-tuning with ``--full``) computes in bf16: under Lightning's ``bf16-mixed`` on one device, under FSDP2's
mixed-precision policy (weights gathered in bf16, fp32 masters) with ``fsdp2``, as the shipped recipes.
Printed: a ``key: value`` block, the roofline per phase, and a last ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SHAPES,
    TMP,
    CallCounter,
    PhaseTimer,
    measure_machine,
    model_dir_for,
    quantiles,
    roofline_table,
    step_shape,
    synthetic_batch,
)
from grpo_step import (  # noqa: E402
    OptimizerTiming,
    StepTimer,
    build_module,
    count_rollouts,
    instrument,
    prompt_tokens,
)

from emorl_pl.memory_plan import Plan, plan  # noqa: E402
from emorl_pl.modules.policy import LoraSettings  # noqa: E402
from emorl_pl.plan_cli import geometry_from_config, settings_from_config  # noqa: E402

GiB = 2**30
PRECISION = {"single": "bf16-mixed", "fsdp2": "32-true"}  # fsdp2: bf16 through the strategy's param_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=tuple(PRECISION), default="single")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA needed)")
    p.add_argument("--smoke", action="store_true", help="toy model, B=2, G=2, 8 tokens, 1 warm-up + 1 step")
    p.add_argument("--full", action="store_true", help="full fine-tuning of the language model (default: LoRA)")
    p.add_argument("--model-root", default=None, help="where the model is built once (default: the temp dir)")
    p.add_argument("--build-only", action="store_true", help="build the model and exit")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    shape = "toy" if args.smoke else "realistic"
    run = {**SHAPES[shape], "warmup": 1, "reps": 3}
    if args.smoke:
        run |= {"batch_size": 2, "group_size": 2, "max_new_tokens": 8, "reps": 1}
    for key in ("warmup", "reps"):
        run[key] = getattr(args, key) if getattr(args, key) is not None else run[key]
    # What grpo_step.build_module and the roofline read, as the benchmarks' options would set them.
    vars(args).update(run, shape=shape, beta=0.04, loss_type="grpo", temperature=1.0, num_iterations=1,
                      micro_batch_size=None, dtype="float32", hf_floor=False, quick=args.smoke)
    return args


def device_of(args: argparse.Namespace) -> torch.device:
    if args.cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; pass --cpu to run on the CPU")
    return torch.device("cuda", 0)


def trainer_for(args: argparse.Namespace, callbacks: list[L.Callback]) -> L.Trainer:
    strategy = "auto"
    if args.strategy == "fsdp2":
        from emorl_pl.strategies import FSDP2Strategy

        strategy = FSDP2Strategy(param_dtype="bfloat16")
    return L.Trainer(max_steps=args.warmup + args.reps, accelerator="cpu" if args.cpu else "gpu", devices=1,
                     strategy=strategy, precision=PRECISION[args.strategy], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks)


def memory_plan(args: argparse.Namespace, model_dir: str, device: str) -> Plan:
    """``emorl-plan``'s prediction for this run: the same settings as a LightningCLI config (see
    ``emorl_pl.plan_cli.settings_from_config``), no validation stage (this run has none)."""
    lora = None if args.full else {"r": LoraSettings.r, "dropout": LoraSettings.dropout}
    trainer: dict = {"devices": 1, "precision": PRECISION[args.strategy]}
    if args.strategy == "fsdp2":
        trainer["strategy"] = {"class_path": "emorl_pl.strategies.FSDP2Strategy",
                               "init_args": {"param_dtype": "bfloat16"}}
    config = {
        "model": {"init_args": {
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "beta": args.beta,
            "micro_batch_size": args.batch_size * args.group_size,
            "policy": {"init_args": {"model_dir": model_dir, "dtype": args.dtype, "lora": lora}}}},
        "data": {"init_args": {"batch_size": args.batch_size, "max_duration": args.seconds}},
        "trainer": trainer,
    }
    geometry = geometry_from_config(Path(model_dir) / "config.json")
    settings, _ = settings_from_config(config, {}, device=device, window_seconds=geometry.feature_seconds)
    return plan(geometry, dataclasses.replace(settings, eval_batch_size=0))


def tensor_bytes(p: Plan) -> float:
    """The plan's peak without its CUDA runtime allowance: what ``torch.cuda.max_memory_allocated`` counts."""
    return p.peak_bytes - sum(piece.bytes for piece in p.always if piece.name.startswith("CUDA context"))


def main(argv: list[str] | None = None) -> dict[str, float | str]:
    args = parse_args(argv)
    model_dir = model_dir_for(args.shape, Path(args.model_root) if args.model_root else TMP)
    if args.build_only:
        print(f"gpu_check: model ready in {model_dir}")
        return {}
    device = device_of(args)
    torch.manual_seed(0)
    module = build_module(args, model_dir)
    # FSDP2: no unsharded reference copy now (full fine-tuning); configure_model shards and builds one.
    policy = module.policy.load(reference=args.strategy != "fsdp2")
    timer = PhaseTimer()
    instrument(module, timer)
    batches = [synthetic_batch(args.batch_size, args.seconds, seed=i) for i in range(args.warmup + args.reps)]
    # The rates in bf16, as the step computes; measured after each step, outside it.
    steps = StepTimer(args, timer, batches[0], CallCounter(policy.direct_call_modules()["audio_tower"]),
                      lambda: measure_machine(module.device, torch.bfloat16, quick=args.smoke))
    count_rollouts(policy, steps)
    trainer = trainer_for(args, [steps, OptimizerTiming(timer)])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))

    measured = timer.steps[args.warmup :]
    step = quantiles([s["step"] for s in measured])["median"]
    rollout = quantiles([s["rollout (generate)"] for s in measured])["median"]
    tokens = quantiles([s["tokens"] for s in measured])["median"]
    width = quantiles([s["width"] for s in measured])["median"]
    predicted = memory_plan(args, model_dir, device.type)
    geometry, shape = step_shape(args, prompt_tokens(policy, batches[0], module.instruction), width, model_dir,
                                 bytes_per_value=2, lora_rank=None if args.full else LoraSettings.r)
    machines = steps.machines[args.warmup :]
    roof = roofline_table(geometry, shape, machines, measured)
    peak = steps.memory.high  # CUDA: max_memory_allocated over the steps; CPU: the process's peak RSS
    result = {
        "strategy": args.strategy,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "tuning": "full" if args.full else "lora",
        "step_s": step,
        "rollout_tokens_per_s": tokens / rollout,
        "peak_mem_gib": peak / GiB,
        "peak_mem_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS (not the plan's)",
        "plan_peak_gib": predicted.peak_gib,
        "plan_tensors_gib": tensor_bytes(predicted) / GiB,
        "peak_over_plan_tensors": peak / tensor_bytes(predicted),
        "plan_peak_stage": predicted.peak_stage.name,
        "floor_s": roof["floor_s"],
        "floor_over_step": roof["floor_over_step"],
        "matmul_tflops": quantiles([m.flops_per_s / 1e12 for m in machines])["median"],
        "memory_gbps": quantiles([m.bytes_per_s / 1e9 for m in machines])["median"],
    }
    print(f"\ngpu_check {args.strategy} ({PRECISION[args.strategy]}"
          f"{', FSDP2 param_dtype bfloat16' if args.strategy == 'fsdp2' else ''}; "
          f"B={args.batch_size} G={args.group_size} T={args.max_new_tokens} {args.seconds:g} s audio; "
          f"{args.reps} steps after {args.warmup} warm-up)")
    for key, value in result.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
