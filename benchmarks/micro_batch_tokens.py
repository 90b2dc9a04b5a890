"""Token-budget micro-batches (``micro_batch_tokens``) against fixed rows (``micro_batch_size``) on batches of
mixed-length audio: the time and peak memory of a GRPO step's scoring passes (old / reference / policy
log-probs and backward: all the setting changes) and of the whole step, as ratios token budget / fixed rows.

    python benchmarks/micro_batch_tokens.py                       # realistic shape, B=4, G=6, 1-20 s of audio
    python benchmarks/micro_batch_tokens.py --micro-batch-size 6 --reps 3
    python benchmarks/micro_batch_tokens.py --quick               # toy model, tiny sizes (smoke test)

Paired in one process: each repetition samples one window (one GRPO step through ``Trainer.fit``), then runs
that window's update ``--inner`` times in each mode back to back, alternating which goes first (learning rate
0, so every run sees the same weights and completions; RSS read after a larger span can read low, see
``_common.PeakMemory``). The ratios are medians of each pair's ratio, so a machine whose load drifts between
repetitions is compared with itself. A step in a mode = the step's time outside the updates + that mode's
update. The gradient norms of the two modes are compared too (the same gradient, to float rounding). The
token budget defaults to what the fixed rows need at worst: ``micro_batch_size`` x (the prompt of the
longest audio + ``max_new_tokens``), so both bound a pass's memory alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, SAMPLE_RATE, PeakMemory, model_dir_for, print_table, quantiles, sync  # noqa: E402

from emorl_pl.modules.grpo_module import GRPOModule  # noqa: E402
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings  # noqa: E402
from emorl_pl.rewards import REWARDS, register_reward  # noqa: E402

MODES = ("fixed", "token")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("toy", "realistic"), default="realistic")
    p.add_argument("--model", default=None, help="local model dir (default: the shape's model, built once)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per pass of the fixed mode")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="the budget (default: micro_batch_size x (longest prompt + max_new_tokens))")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="GRPO steps (each samples a window)")
    p.add_argument("--inner", type=int, default=2, help="update runs per mode and step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="toy model, tiny sizes, 1 warm-up + 1 rep (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.batch_size, args.group_size, args.max_new_tokens = "toy", 3, 2, 8
        args.min_seconds, args.max_seconds, args.micro_batch_size, args.warmup, args.reps = 0.1, 2.0, 2, 1, 1
        args.inner = 1
    return args


def mixed_batch(batch_size: int, low: float, high: float, seed: int) -> dict:
    """B random waveforms of lengths spread over [low, high] s: the shortest and the longest always in it."""
    g = torch.Generator().manual_seed(seed)
    seconds = [low, high] + (low + (high - low) * torch.rand(max(0, batch_size - 2), generator=g)).tolist()
    seconds = seconds[:batch_size]
    return {
        "waveforms": [0.1 * torch.randn(int(s * SAMPLE_RATE), generator=g) for s in seconds],
        "sample_rate": SAMPLE_RATE,
        "labels": [LABELS[(seed + j) % len(LABELS)] for j in range(batch_size)],
        "keys": [f"mixed_{seed}_{j}" for j in range(batch_size)],
        "texts": [None] * batch_size,
        "corpus": ["synthetic"] * batch_size,
    }


if "bench_text_hash" not in REWARDS:

    @register_reward("bench_text_hash")
    class TextHash:
        """A reward that varies with the sampled text, so that the gradient is not zero (the random model's
        answers fail the built-in rewards alike)."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [(sum(map(ord, c)) % 7) / 6 for c in completions]


class PairedUpdates(L.Callback):
    """Runs each step's window update ``inner`` times per mode, alternating, and records per run its time,
    peak memory, gradient norm, passes and the tokens they ran (rows x (prompt + completion width))."""

    def __init__(self, module: GRPOModule, budget: int, inner: int) -> None:
        self.memory = PeakMemory()
        self.runs: list[dict[str, float]] = []  # one per update run, with its mode and repetition
        self.steps: list[float] = []  # whole step times
        self.rep = 0
        update, logps = module._update, module.policy.completion_logps
        self.current: dict[str, float] = {}

        def paired_update(window):
            order = MODES if self.rep % 2 == 0 else MODES[::-1]
            out = None
            for i in range(inner):
                for mode in order if i % 2 == 0 else order[::-1]:
                    module.hparams.micro_batch_tokens = budget if mode == "token" else None
                    self.current, peaks = {"mode": mode, "rep": self.rep}, []
                    with self.memory.measure(peaks):
                        sync()
                        start = time.perf_counter()
                        out = update(window)
                        sync()
                        self.current["update_s"] = time.perf_counter() - start
                    self.current["peak_mib"], self.current["grad_norm"] = peaks[-1], out[2]
                    self.runs.append(self.current)
            return out

        def counted_logps(rollout, rows=None, **kw):
            width = rollout.prompt.attention_mask.shape[1] + rollout.completion_ids.shape[1]
            self.current["passes"] = self.current.get("passes", 0) + 1
            self.current["pass_tokens"] = self.current.get("pass_tokens", 0) + len(rows) * width
            self.current["largest_pass"] = max(self.current.get("largest_pass", 0), len(rows) * width)
            return logps(rollout, rows, **kw)

        module._update, module.policy.completion_logps = paired_update, counted_logps

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        sync()
        self.steps.append(time.perf_counter() - self.start)
        self.rep += 1


def longest_prompt(policy: AudioLMPolicy, module: GRPOModule, seconds: float) -> int:
    """Prompt tokens of one utterance of ``seconds`` (chat template + audio tokens)."""
    wave = torch.zeros(int(seconds * SAMPLE_RATE))
    return int(policy.build_prompts([wave], SAMPLE_RATE, module.instruction).attention_mask.sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = args.model or model_dir_for(args.shape)
    module = GRPOModule(
        AudioLMPolicy(model_dir, lora=LoraSettings()), labels="iemocap4", rewards={"bench_text_hash": 1.0},
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, beta=args.beta, loss_type=args.loss_type,
        micro_batch_size=args.micro_batch_size, gradient_clip_val=1e9,  # a norm to compare, no clipping
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
    )
    policy = module.policy.load()
    with torch.no_grad():  # LoRA's B starts at 0, where every adapter's A has no gradient: give B a value
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    prompt = longest_prompt(policy, module, args.max_seconds)
    budget = args.micro_batch_tokens or args.micro_batch_size * (prompt + args.max_new_tokens)
    probe = PairedUpdates(module, budget, args.inner)
    for rep in range(args.warmup + args.reps):
        batch = mixed_batch(args.batch_size, args.min_seconds, args.max_seconds, seed=rep)
        trainer = L.Trainer(max_steps=1, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[probe])
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))

    keys = ("update_s", "peak_mib", "passes", "pass_tokens", "largest_pass")
    measured = [r for r in probe.runs if r["rep"] >= args.warmup]
    rows, summary = [], {}
    for key in keys:
        per_rep = []
        for rep in range(args.warmup, args.warmup + args.reps):
            mine = {m: quantiles([r[key] for r in measured if r["rep"] == rep and r["mode"] == m])["median"]
                    for m in MODES}
            per_rep.append((mine["fixed"], mine["token"]))
        ratio = quantiles([t / f for f, t in per_rep if f > 0])
        rows.append([key, quantiles([f for f, _ in per_rep])["median"], quantiles([t for _, t in per_rep])["median"],
                     ratio["median"], ratio["min"], ratio["max"]])
        summary[f"{key}_ratio"] = ratio["median"]
    # the whole step in each mode: its time outside the updates (sampling, rewards, ...) + that mode's update
    steps = []
    for rep in range(args.warmup, args.warmup + args.reps):
        runs = [r for r in probe.runs if r["rep"] == rep]
        rest = probe.steps[rep] - sum(r["update_s"] for r in runs)
        steps.append({m: rest + quantiles([r["update_s"] for r in runs if r["mode"] == m])["median"] for m in MODES})
    step = quantiles([s["token"] / s["fixed"] for s in steps])
    rows.append(["step_s", quantiles([s["fixed"] for s in steps])["median"],
                 quantiles([s["token"] for s in steps])["median"], step["median"], step["min"], step["max"]])
    summary["step_s_ratio"] = step["median"]
    grad = max(abs(a["grad_norm"] - b["grad_norm"]) / max(abs(b["grad_norm"]), 1e-30)
               for rep in range(args.warmup, args.warmup + args.reps)
               for a in measured if a["rep"] == rep and a["mode"] == "token"
               for b in measured if b["rep"] == rep and b["mode"] == "fixed")
    summary["grad_norm_rel_diff"] = grad
    print(f"device={module.device} shape={args.shape} model={model_dir} B={args.batch_size} G={args.group_size} "
          f"max_new_tokens={args.max_new_tokens} audio {args.min_seconds:g}-{args.max_seconds:g} s (longest prompt "
          f"{prompt} tokens) beta={args.beta} loss={args.loss_type} reps={args.reps} x {args.inner} update runs per "
          f"mode (after {args.warmup} warm-up)")
    print(f"fixed: micro_batch_size={args.micro_batch_size} rows; token: micro_batch_tokens={budget}")
    print_table("per repetition, then the median (ratios: of each repetition's pair)",
                ["metric", "fixed rows", "token budget", "token / fixed", "min", "max"], rows)
    print(f"\ngradient norm, |token - fixed| / fixed, max over runs = {grad:.3g} (gradient norm "
          f"{quantiles([r['grad_norm'] for r in measured])['median']:.3g})")
    print_table("summary (token budget / fixed rows)", ["metric", "value"], [[k, v] for k, v in summary.items()])
    return summary


if __name__ == "__main__":
    main()
