"""Training-length arithmetic: how many optimizer steps a run takes, the LR multiplier, RL progress.

Plain functions (no Lightning import) so that every case (``max_steps``, ``max_epochs``, gradient
accumulation, mu > 1 updates per generation, a supervised cold start) is tested by hand.

Step counting, as TRL counts it: one *window* is ``accumulate_grad_batches`` batches (per rank). A
supervised (cold-start) window is one optimizer step; a GRPO window is one generation feeding
``num_iterations`` (mu) optimizer steps. ``global_step`` counts optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``step`` (0-based):

        warm-up (step < W):   (step + 1) / W
        then constant:        1
             linear:          1 - f,                 f = min(1, (step - W) / (total - W))
             cosine:          (1 + cos(pi f)) / 2

    ``total_steps`` is the run's optimizer-step count (``total_optimizer_steps``); 0 (unknown) keeps the
    multiplier at 1 after the warm-up.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


def total_optimizer_steps(
    *,
    max_steps: int | None,
    max_epochs: int | None,
    batches_per_epoch: float | None,
    accumulate_grad_batches: int = 1,
    num_iterations: int = 1,
    sft_steps: int = 0,
) -> int | None:
    """Optimizer steps the run will take, or None when nothing bounds it.

        windows per epoch  w = ceil(batches_per_epoch / accumulate_grad_batches)   (a short last window
                                                                                    still steps)
        by epochs          E * w windows: the first ``sft_steps`` are supervised (1 step each), the rest
                           GRPO (mu steps each):  sft + mu * (E * w - sft)   (all SFT when E * w <= sft)
        total              min(max_steps, by epochs), whichever are given (max_steps <= 0 means unset)
    """
    by_steps = max_steps if max_steps is not None and max_steps > 0 else None
    by_epochs = None
    if max_epochs is not None and max_epochs > 0 and batches_per_epoch is not None and math.isfinite(batches_per_epoch):
        windows = math.ceil(batches_per_epoch / accumulate_grad_batches) * max_epochs
        sft = min(sft_steps, windows)
        by_epochs = sft + num_iterations * (windows - sft)
    candidates = [v for v in (by_steps, by_epochs) if v is not None]
    return min(candidates) if candidates else None


def rl_progress(global_step: int, total_steps: int | None, sft_steps: int = 0) -> float:
    """Fraction of the RL phase done, in [0, 1]: (step - sft) / (total - sft), counted in optimizer steps.

    0 while the total is unknown (the ESWR alpha then stays at its start value).
    """
    if total_steps is None:
        return 0.0
    return min(1.0, max(0, global_step - sft_steps) / max(1, total_steps - sft_steps))
