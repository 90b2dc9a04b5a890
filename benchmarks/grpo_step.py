"""Time one GRPO step of ``GRPOModule`` (through ``Trainer.fit``), broken down by phase, against its floors.

    python benchmarks/grpo_step.py                      # toy: tiny random Qwen2-Audio, B=4, G=6, 64 tokens
    python benchmarks/grpo_step.py --shape realistic    # real vocabulary (156,032) and 30 s window, 4 s audio
    python benchmarks/grpo_step.py --model DIR --batch-size 2 --group-size 6 --max-new-tokens 128

Synthetic batches (random waveforms), so no corpus is needed. After ``--warmup`` steps, each of ``--reps``
steps is timed whole (callback span) and by phase (timed wrappers around the public policy / module calls
the step makes, forward hooks on the audio tower and the decoder, the optimizer's step hooks): prompts
(processor), audio encode + merge, rollout, reward, old / reference / policy log-prob passes, backward,
optimizer; the audio tower's and the prefill's own time are shown as shares.

Two floors, each measured in the same run: the roofline (``roofline.py``: each phase's FLOPs and bytes at
this machine's matmul FLOP/s and memory bandwidth, measured after each step) against the step's time per
phase; and, with ``--hf-floor`` (the toy's default), the Hugging Face floor (``_common.floor_seconds``: one
``generate`` of the B*G completions at full length, one policy forward+backward, one reference forward when
beta > 0), measured alone after every step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SHAPES,
    CallCounter,
    PeakMemory,
    PhaseTimer,
    floor_seconds,
    measure_machine,
    model_dir_for,
    print_table,
    quantiles,
    roofline_table,
    step_shape,
    sync,
    synthetic_batch,
)
from roofline import Machine  # noqa: E402

from emorl_pl.modules.grpo_module import GRPOModule  # noqa: E402
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings  # noqa: E402

PHASES = ("prompts (processor)", "audio encode+merge", "rollout (generate)", "reward", "logps old (no grad)",
          "logps ref (no grad)", "logps policy (fwd)", "backward", "optimizer")


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of every benchmark that times GRPO steps: the shape (its model and defaults), B, G,
    tokens, loss, repetitions; options left unset take the shape's values (``_common.SHAPES``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=tuple(SHAPES), default="toy",
                   help="toy (quick default: 1024-token BPE, 2 s window, d=64) or realistic (the real tokenizer, "
                        "156,032-row vocabulary and 30 s window; encoder d=256 x 4, LM d=512 x 4; 4 s audio)")
    p.add_argument("--model", default=None, help="local model dir (default: the shape's model, built once)")
    p.add_argument("--batch-size", type=int, default=None, help="B utterances per step")
    p.add_argument("--group-size", type=int, default=None, help="G completions per utterance")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=None, help="length of the random waveforms")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--hf-floor", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the Hugging Face generate floor after each step (default: toy yes, realistic no)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per trainer (default: torch's); 1 avoids the OpenMP pool's stalls on a "
                        "CPU that other processes share")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 warm-up + 2 reps (smoke test)")
    return p


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_step_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.batch_size, args.group_size, args.max_new_tokens, args.warmup, args.reps = 2, 2, 8, 1, 2
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = step_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: B*G (one pass)")
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    return parse_step_args(p, argv)


def default_model_dir(shape: str = "toy") -> str:
    return model_dir_for(shape)


def build_module(args: argparse.Namespace, model_dir: str) -> GRPOModule:
    # LoRA on the language model unless ``args.full`` (gpu_check's --full): full fine-tuning.
    policy = AudioLMPolicy(model_dir, dtype=args.dtype, lora=None if getattr(args, "full", False) else LoraSettings())
    return GRPOModule(
        policy,
        labels="iemocap4",
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        beta=args.beta,
        loss_type=args.loss_type,
        num_iterations=args.num_iterations,
        micro_batch_size=args.micro_batch_size or args.batch_size * args.group_size,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
    )


def instrument(module: GRPOModule, timer: PhaseTimer) -> None:
    """Timed wrappers on the public calls a GRPO step makes, in the order it makes them; forward hooks on the
    audio tower (its share of the encode) and the decoder (its first call in a rollout: the prefill). The
    optimizer is timed by ``OptimizerTiming`` once Lightning has built it."""
    policy = module.policy
    timer.wrap(policy, "build_prompts", "prompts (processor)")
    timer.wrap(policy, "encode_prompts", "audio encode+merge")
    timer.wrap(policy, "rollout", "rollout (generate)")

    def logps_phase(*args, reference=False, **kwargs):
        if reference:
            return "logps ref (no grad)"
        return "logps policy (fwd)" if torch.is_grad_enabled() else "logps old (no grad)"

    timer.wrap(policy, "completion_logps", logps_phase)
    timer.wrap(module, "manual_backward", "backward")
    modules = policy.direct_call_modules()
    timer.time_module(modules["audio_tower"], "audio tower (share)")
    timer.time_first_call(modules["decoder"], "prefill (share)", within="rollout (generate)")
    rewards = module.reward_set

    class TimedRewards:  # ``self.reward_set(...)`` looks __call__ up on the type: wrap the object
        def __call__(self, *a, **k):
            with timer.span("reward"):
                return rewards(*a, **k)

        def __getattr__(self, name):
            return getattr(rewards, name)

    module.reward_set = TimedRewards()


class OptimizerTiming(L.Callback):
    """Times ``optimizer.step()`` (step hooks on the optimizers Lightning built from the module)."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer

    def on_train_start(self, trainer, module) -> None:
        for opt in trainer.optimizers:
            self.timer.time_optimizer(opt, "optimizer")


def count_rollouts(policy: AudioLMPolicy, sink) -> None:
    """After each rollout, ``sink.last_tokens`` = its completion tokens (for tokens/s) and ``sink.last_width``
    = its completions' width T (the roofline's new tokens)."""
    rollout_fn = policy.rollout

    def counting_rollout(*a, **k):
        out = rollout_fn(*a, **k)
        sink.last_tokens = float(out.completion_mask.sum())
        sink.last_width = int(out.completion_ids.shape[1])
        return out

    policy.rollout = counting_rollout


def prompt_tokens(policy: AudioLMPolicy, batch: dict, instruction: str) -> int:
    """P: the prompt's length (chat template + audio tokens) as the processor builds it, left-padded."""
    return int(policy.build_prompts(batch["waveforms"], batch["sample_rate"], instruction).input_ids.shape[1])


class StepTimer(L.Callback):
    """Times each training step whole; after it (outside the step's span) measures the machine's rates for
    the roofline (``rates``) and, with ``args.hf_floor``, the HF floor alone."""

    def __init__(self, args, timer: PhaseTimer, batch, counter: CallCounter, rates: Callable[[], Machine]) -> None:
        self.args, self.timer, self.batch, self.counter, self.rates = args, timer, batch, counter, rates
        self.memory = PeakMemory()
        self.peaks: list[float] = []
        self.floors: list[dict[str, float]] = []
        self.machines: list[Machine] = []
        self.last_tokens, self.last_width = float("nan"), 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.counts = self.counter.snapshot()
        self._mem = self.memory.measure(self.peaks)
        self._mem.__enter__()
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        sync()
        total = time.perf_counter() - self.start
        self._mem.__exit__(None, None, None)
        calls, rows = self.counter.snapshot()
        self.timer.end_step(step=total, audio_calls=calls - self.counts[0], audio_rows=rows - self.counts[1],
                            tokens=self.last_tokens, width=self.last_width)
        self.machines.append(self.rates())
        if self.args.hf_floor:
            self.floors.append(floor_seconds(module.policy, self.batch, module.instruction, self.args.group_size,
                                             self.args.max_new_tokens, self.args.beta, self.args.temperature))
        self.timer.current.clear()


def phase_rows(measured: list[dict[str, float]], step_median: float) -> list[list]:
    """Median ms and % of the step per phase, and what no phase accounts for."""
    rows = []
    for phase in (*PHASES, "audio tower (share)", "prefill (share)"):
        med = median([s.get(phase, 0.0) for s in measured])
        rows.append([phase, 1e3 * med, 100 * med / step_median])
    accounted = sum(median([s.get(p, 0.0) for s in measured]) for p in PHASES)
    rows.append(["other (clipping, logging, advantages, Lightning)", 1e3 * (step_median - accounted),
                 100 * (step_median - accounted) / step_median])
    rows.append(["step (whole)", 1e3 * step_median, 100.0])
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    set_threads(args)
    torch.manual_seed(0)
    model_dir = args.model or default_model_dir(args.shape)
    module = build_module(args, model_dir)
    policy = module.policy.load()
    timer = PhaseTimer()
    instrument(module, timer)
    steps = args.warmup + args.reps
    batches = [synthetic_batch(args.batch_size, args.seconds, seed=i) for i in range(steps)]
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    cb = StepTimer(args, timer, batches[0], CallCounter(policy.direct_call_modules()["audio_tower"]),
                   lambda: measure_machine(module.device, dtype, quick=args.quick))
    count_rollouts(policy, cb)
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[cb, OptimizerTiming(timer)])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))

    measured = timer.steps[args.warmup :]
    step = quantiles([s["step"] for s in measured])
    print(f"device={trainer.strategy.root_device} shape={args.shape} model={model_dir} B={args.batch_size} "
          f"G={args.group_size} max_new_tokens={args.max_new_tokens} seconds={args.seconds} beta={args.beta} "
          f"reps={args.reps} (after {args.warmup} warm-up)")
    print_table("GRPO step, median over reps", ["phase", "ms", "% of step"], phase_rows(measured, step["median"]))
    tokens = median([s["tokens"] for s in measured])
    summary = {
        "step_s": step["median"],
        "completion_tokens_per_s": tokens / step["median"],
        "audio_encoder_calls_per_step": median([s["audio_calls"] for s in measured]),
        "audio_utterances_per_step": median([s["audio_rows"] for s in measured]),
        "peak_mem_mib": median(cb.peaks[args.warmup :]),
    }
    if args.hf_floor:
        floors = cb.floors[args.warmup :]
        ratio = quantiles([s["step"] / f["floor"] for s, f in zip(measured, floors)])
        print_table("HF floor (each piece alone, same run)", ["piece", "ms"],
                    [[k, 1e3 * median([f[k] for f in floors])] for k in floors[0]])
        summary |= {"floor_s": median([f["floor"] for f in floors]), "step_over_floor": ratio["median"],
                    "step_over_floor_min": ratio["min"], "step_over_floor_max": ratio["max"]}
        print(f"\nstep / floor = {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})")
    geometry, shape = step_shape(args, prompt_tokens(policy, batches[0], module.instruction),
                                 median([s["width"] for s in measured]), model_dir,
                                 bytes_per_value=4 if args.dtype == "float32" else 2)
    roof = roofline_table(geometry, shape, cb.machines[args.warmup :], measured)
    summary |= {"roofline_floor_s": roof["floor_s"], "roofline_floor_over_step": roof["floor_over_step"]}
    print_table("summary", ["metric", "value"], [[k, v] for k, v in summary.items()])
    return summary


def median(values) -> float:
    return quantiles(values)["median"]


if __name__ == "__main__":
    main()
