"""``emorl`` with test rewards registered first (run as a script, so that Lightning's DDP / FSDP2 launcher
re-runs it, registration included, in every rank's process).

``test_rank0_constant``: 0.5 for every completion on global rank 0 (so dynamic sampling drops every
group there), a score that varies with the text on the other ranks (so they keep theirs).
"""

from __future__ import annotations

import torch

from emorl_pl.cli import main
from emorl_pl.rewards import register_reward


@register_reward("test_rank0_constant")
class RankZeroConstantReward:
    def __init__(self, labels, mode="esr"):
        pass

    def __call__(self, completions, labels, **columns):
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            return [0.5] * len(completions)
        return [(sum(map(ord, c)) % 7) / 6 for c in completions]


if __name__ == "__main__":
    main()
