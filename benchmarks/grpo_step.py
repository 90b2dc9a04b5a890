"""Time one GRPO step of ``GRPOModule._grpo_step`` (through ``Trainer.fit``), broken down by phase.

    python benchmarks/grpo_step.py                      # tiny random Qwen2-Audio, B=4, G=6, 64 tokens
    python benchmarks/grpo_step.py --model DIR --batch-size 2 --group-size 6 --max-new-tokens 128

Synthetic batches (random waveforms), so no corpus is needed. After ``--warmup`` steps, each of ``--reps``
steps is timed whole (callback span) and by phase (timed wrappers around the policy / module calls the
step makes): prompts (processor), audio encode + merge, rollout (generate), reward, old / reference /
policy log-prob passes, backward, optimizer; the audio tower's own time is shown as a share. After every
step the floor (``_common.floor_seconds``: one generate of the B*G completions at full length, one policy
forward+backward, one reference forward when beta > 0) is measured alone, and the step is reported as a
ratio to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CallCounter,
    PeakMemory,
    PhaseTimer,
    floor_seconds,
    print_table,
    quantiles,
    sync,
    synthetic_batch,
)

from emorl_pl.modules.grpo_module import GRPOModule  # noqa: E402
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings  # noqa: E402
from emorl_pl.modules.tiny import ensure_tiny_model  # noqa: E402

PHASES = ("prompts (processor)", "audio encode+merge", "rollout (generate)", "reward", "logps old (no grad)",
          "logps ref (no grad)", "logps policy (fwd)", "backward", "optimizer")


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of every benchmark that times GRPO steps: the model, B, G, tokens, loss, repetitions."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="local model dir (default: the tiny model, built once)")
    p.add_argument("--batch-size", type=int, default=4, help="B utterances per step")
    p.add_argument("--group-size", type=int, default=6, help="G completions per utterance")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=1.5, help="length of the random waveforms")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 warm-up + 2 reps (smoke test)")
    return p


def parse_step_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.group_size, args.max_new_tokens, args.warmup, args.reps = 2, 2, 8, 1, 2
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = step_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: B*G (one pass)")
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    return parse_step_args(p, argv)


def default_model_dir() -> str:
    return str(ensure_tiny_model(Path(tempfile.gettempdir()) / "emorl_tiny_bench"))


def build_module(args: argparse.Namespace, model_dir: str) -> GRPOModule:
    policy = AudioLMPolicy(model_dir, dtype=args.dtype, lora=LoraSettings())
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
    """Timed wrappers on the calls ``_grpo_step`` makes, in the order it makes them."""
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
    timer.wrap(module, "_optimizer_step", "optimizer")
    rewards = module.reward_set

    class TimedRewards:  # ``self.reward_set(...)`` looks __call__ up on the type: wrap the object
        def __call__(self, *a, **k):
            with timer.span("reward"):
                return rewards(*a, **k)

        def __getattr__(self, name):
            return getattr(rewards, name)

    module.reward_set = TimedRewards()


class StepTimer(L.Callback):
    """Times each training step whole; after it, measures the floor alone (outside the step's span)."""

    def __init__(self, args, timer: PhaseTimer, batch, warmup: int) -> None:
        self.args, self.timer, self.batch, self.warmup = args, timer, batch, warmup
        self.memory = PeakMemory()
        self.peaks: list[float] = []
        self.floors: list[dict[str, float]] = []
        self.tokens: list[float] = []

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
                            tokens=self.last_tokens)
        policy = module.policy
        self.floors.append(floor_seconds(policy, self.batch, module.instruction, self.args.group_size,
                                         self.args.max_new_tokens, self.args.beta, self.args.temperature))
        self.timer.current.clear()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(0)
    model_dir = args.model or default_model_dir()
    module = build_module(args, model_dir)
    module.policy.load()
    timer = PhaseTimer()
    instrument(module, timer)
    timer.time_module(module.policy._audio_tower(module.policy.hf_model), "audio tower (share)")
    steps = args.warmup + args.reps
    batches = [synthetic_batch(args.batch_size, args.seconds, seed=i) for i in range(steps)]
    cb = StepTimer(args, timer, batches[0], args.warmup)
    cb.counter = CallCounter(module.policy._audio_tower(module.policy.hf_model))

    rollout_fn = module.policy.rollout

    def counting_rollout(*a, **k):  # completion tokens per step, for tokens/s
        out = rollout_fn(*a, **k)
        cb.last_tokens = float(out.completion_mask.sum())
        return out

    module.policy.rollout = counting_rollout
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[cb])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))

    measured = timer.steps[args.warmup :]
    floors = cb.floors[args.warmup :]
    step = quantiles([s["step"] for s in measured])
    floor = quantiles([f["floor"] for f in floors])
    ratio = quantiles([s["step"] / f["floor"] for s, f in zip(measured, floors)])
    print(f"device={trainer.strategy.root_device} model={model_dir} B={args.batch_size} G={args.group_size} "
          f"max_new_tokens={args.max_new_tokens} beta={args.beta} reps={args.reps} (after {args.warmup} warm-up)")
    rows = []
    for phase in (*PHASES, "audio tower (share)"):
        med = statistics_median([s.get(phase, 0.0) for s in measured])
        rows.append([phase, 1e3 * med, 100 * med / step["median"]])
    accounted = sum(statistics_median([s.get(p, 0.0) for s in measured]) for p in PHASES)
    rows.append(["other (logging, advantages, Lightning)", 1e3 * (step["median"] - accounted),
                 100 * (step["median"] - accounted) / step["median"]])
    rows.append(["step (whole)", 1e3 * step["median"], 100.0])
    print_table("GRPO step, median over reps", ["phase", "ms", "% of step"], rows)
    frows = [[k, 1e3 * statistics_median([f[k] for f in floors])] for k in floors[0]]
    print_table("floor (each piece alone, same run)", ["piece", "ms"], frows)
    tokens = statistics_median([s["tokens"] for s in measured])
    summary = {
        "step_s": step["median"],
        "floor_s": floor["median"],
        "step_over_floor": ratio["median"],
        "step_over_floor_min": ratio["min"],
        "step_over_floor_max": ratio["max"],
        "completion_tokens_per_s": tokens / step["median"],
        "audio_encoder_calls_per_step": statistics_median([s["audio_calls"] for s in measured]),
        "audio_utterances_per_step": statistics_median([s["audio_rows"] for s in measured]),
        "peak_mem_mib": statistics_median(cb.peaks[args.warmup :]),
    }
    print_table("summary", ["metric", "value"], [[k, v] for k, v in summary.items()])
    print(f"\nstep / floor = {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})")
    return summary


def statistics_median(values):
    return quantiles(values)["median"]


if __name__ == "__main__":
    main()
