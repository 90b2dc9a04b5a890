"""Sampled evaluation: k answers per utterance, reduced to one prediction (maj@k) or scored as pass@k.

Plain functions over parsed labels (None = no label could be read), so the reductions are tested by hand;
``SERMetrics`` then gives WA / UA / F1 of the reduced predictions.

    maj@k:  the most frequent readable label among the k answers; ties go to the label whose first
            answer came first; None when no answer is readable (counted as wrong, as greedy's None is)
    pass@k: the gold label when any of the k answers is it (the utterance is solved), else the maj@k
            prediction; its WA is the fraction of utterances solved by some answer (pass@k), and UA / F1
            follow from the same confusion matrix
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def majority_vote(labels: Sequence[str | None]) -> str | None:
    """The maj@k prediction of one utterance's k parsed answers (see the module docstring)."""
    readable = [label for label in labels if label is not None]
    if not readable:
        return None
    counts = Counter(readable)
    best = max(counts.values())
    return next(label for label in readable if counts[label] == best)


def pass_at_k(labels: Sequence[str | None], gold: str) -> str | None:
    """The pass@k prediction: ``gold`` when any answer is gold, else ``majority_vote(labels)``."""
    return gold if gold in labels else majority_vote(labels)
