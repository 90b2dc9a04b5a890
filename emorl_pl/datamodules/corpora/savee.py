"""SAVEE's own layout -> plan.

Files ``JE_sa01.wav`` (flat) or ``JE/sa01.wav`` (the release's ``AudioData/<speaker>/``), found
recursively under ``root``: speaker initials (DC, JE, JK, KL) + emotion code (a anger, d disgust,
f fear, h happiness, n neutral, sa sadness, su surprise) + sentence number.

No official folds: fold k of ``num_folds`` (default 4, one speaker each, as EmoBox) tests on the k-th
block of sorted speakers (DC, JE, JK, KL); valid is held out of the other speakers (speaker-disjoint, so
one whole speaker). Speaker = the initials.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from emorl_pl.datamodules.corpora.common import (
    LabelError,
    Plan,
    PlannedUtterance,
    make_key,
    plan_named_files,
)

SAVEE_EMOTIONS: dict[str, str] = {"a": "angry", "d": "disgust", "f": "fear", "h": "happy", "n": "neutral",
                                  "sa": "sad", "su": "surprise"}
_FLAT = re.compile(r"^([A-Z]{2})_([a-z]+)(\d+)$")
_NESTED = re.compile(r"^([a-z]+)(\d+)$")


def parse_savee_name(path: str | Path) -> dict[str, str]:
    """speaker, emotion code, sentence of ``JE_sa01.wav`` or ``JE/sa01.wav``; errors name the file."""
    path = Path(path)
    m = _FLAT.match(path.stem)
    if m:
        speaker, code, number = m.groups()
    else:
        m = _NESTED.match(path.stem)
        if m is None or not re.fullmatch(r"[A-Z]{2}", path.parent.name):
            raise ValueError(f"{path}: not a SAVEE file (expected SP_code##.wav or SP/code##.wav, e.g. JE_sa01.wav)")
        speaker, (code, number) = path.parent.name, m.groups()
    if code not in SAVEE_EMOTIONS:
        raise LabelError(f"{path}: unknown SAVEE emotion code {code!r}; allowed: {', '.join(SAVEE_EMOTIONS)}")
    return {"speaker": speaker, "emotion": code, "sentence": number}


def plan_savee(
    root: str | Path,
    *,
    fold: int = 1,
    num_folds: int = 4,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> Plan:
    """Plan SAVEE from a folder of its .wav files (module docstring)."""
    root = Path(root)

    def utterance(path: Path) -> PlannedUtterance:
        f = parse_savee_name(path)
        return PlannedUtterance(
            key=make_key("savee", f["speaker"], f"{f['emotion']}{f['sentence']}"), path=path, split="train",
            label=SAVEE_EMOTIONS[f["emotion"]], corpus_label=f["emotion"], corpus="savee", speaker=f["speaker"],
            extra={"source": str(path.relative_to(root))})

    return plan_named_files("savee", "SAVEE", root, utterance, label_set=label_set, fold=fold, num_folds=num_folds,
                            valid_fraction=valid_fraction, valid_speakers=valid_speakers, seed=seed)
