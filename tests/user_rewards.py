"""A researcher's own rewards, outside the package, named in configs by ``class_path`` (no registration).

Importable as ``user_rewards`` with ``tests/`` on the path (pytest puts it there; the ``emorl`` subprocess
gets ``PYTHONPATH=tests``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def mentioned(transcript: str, completion: str, min_chars: int) -> bool:
    """Whether a word of ``transcript`` with at least ``min_chars`` letters occurs in ``completion``."""
    wanted = [w for w in re.findall(r"[a-z']+", transcript.lower()) if len(w) >= min_chars]
    return any(w in completion.lower() for w in wanted)


class TranscriptWordReward:
    """1 if the completion mentions a word (of ``min_chars`` letters or more) of its utterance's
    transcript, 0 if not, None when the utterance has no transcript. Each call appends one JSON line to
    ``log_path``: what it saw (keys, transcripts, gold labels, group indices, completions, the other
    columns' names) and what it returned."""

    def __init__(self, log_path: str, labels, min_chars: int = 3) -> None:
        self.log_path = Path(log_path)
        self.labels = tuple(labels)
        self.min_chars = min_chars

    def __call__(self, completions, labels, *, transcript, key, group, **columns):
        values = [None if said is None else float(mentioned(said, text, self.min_chars))
                  for text, said in zip(completions, transcript)]
        seen = {"key": list(key), "transcript": list(transcript), "gold": list(labels), "group": list(group),
                "completions": list(completions), "label_set": list(self.labels), "columns": sorted(columns),
                "values": values}
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(seen) + "\n")
        return values


class ConstantReward:
    """A class without ``labels`` / ``mode``: gets only its init_args."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, completions, labels, **columns):
        return [self.value] * len(completions)


class GoldInLabelSet:
    """A class that takes ``labels`` and ``mode``: 1 when the gold label's index in the label set is even."""

    def __init__(self, labels, mode="esr") -> None:
        self.labels, self.mode = tuple(labels), mode

    def __call__(self, completions, labels, **columns):
        return [float(self.labels.index(g) % 2 == 0) for g in labels]


def mentions_gold(completions, labels, bonus: float = 1.0, **columns):
    """A plain function: ``bonus`` when the completion names its gold label."""
    return [bonus if g in c else 0.0 for c, g in zip(completions, labels)]


def no_columns(completions, labels):
    """Wrong: the trainer passes every batch column, so a reward must take **columns."""
    return [0.0] * len(completions)


class NotARewardValue:
    def __init__(self) -> None:
        pass

    def __call__(self, completions, labels, **columns):
        return ["high"] * len(completions)


NOT_A_REWARD = 0.5

