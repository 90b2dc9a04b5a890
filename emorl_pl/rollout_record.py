"""``RolloutRecord``: what a GRPO window sampled and how it was scored, for logging callbacks.

Plain data, no Lightning: ``GRPOModule.last_rollout`` holds one, ``emorl_pl.callbacks`` read its fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emorl_pl.rewards import RewardOutput


@dataclass(frozen=True)
class RolloutRecord:
    """The completions of one GRPO window (every batch of it on this rank, in order), G per utterance.

    ``keys``: one per utterance (None when the batches carry no keys); ``golds`` and ``texts``: one per
    completion, row ``b * group_size + g`` being sample g of utterance b; ``scored``: the rewards of each
    completion; ``advantages``: the advantage each completion's loss used (None: none computed).
    """

    keys: tuple[str | None, ...] | None
    golds: tuple[str, ...]
    texts: tuple[str, ...]
    scored: RewardOutput
    advantages: tuple[float, ...] | None
    group_size: int

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.group_size < 1 or len(self.golds) != n or n % self.group_size:
            raise ValueError(f"RolloutRecord: {n} completions and {len(self.golds)} gold labels; expected equal "
                             f"counts, a multiple of the group size {self.group_size}")
        if len(self.scored.total) != n or any(len(v) != n for v in self.scored.per_reward.values()):
            raise ValueError(f"RolloutRecord: the rewards must have one value per completion ({n})")
        if self.advantages is not None and len(self.advantages) != n:
            raise ValueError(f"RolloutRecord: {len(self.advantages)} advantages for {n} completions")
        if self.keys is not None and len(self.keys) != n // self.group_size:
            raise ValueError(f"RolloutRecord: {len(self.keys)} keys for {n // self.group_size} utterances")

    @property
    def reward_names(self) -> list[str]:
        return list(self.scored.per_reward)

    @classmethod
    def of_batches(cls, parts: Sequence[tuple[Sequence[Any] | None, Sequence[str], Sequence[str], RewardOutput,
                                              Sequence[float] | None]], group_size: int) -> RolloutRecord:
        """One record from the ``(keys, golds, texts, scored, advantages)`` of consecutive batches."""
        names = list(parts[0][3].per_reward) if parts else []
        keys = None
        if any(p[0] is not None for p in parts):  # a batch without keys gets None per utterance
            keys = tuple(k for p in parts for k in (p[0] if p[0] is not None else [None] * (len(p[1]) // group_size)))
        advantages = (None if any(p[4] is None for p in parts)
                      else tuple(float(a) for p in parts for a in p[4]))
        scored = RewardOutput(total=[t for p in parts for t in p[3].total],
                              per_reward={n: [v for p in parts for v in p[3].per_reward[n]] for n in names})
        return cls(keys=keys, golds=tuple(g for p in parts for g in p[1]), texts=tuple(t for p in parts for t in p[2]),
                   scored=scored, advantages=advantages, group_size=group_size)
