"""CREMA-D's own layout -> plan.

Files ``AudioWAV/1001_DFA_ANG_XX.wav`` (found recursively under ``root``): actor (1001-1091) _ sentence
(IEO, TIE, ...) _ emotion (ANG, DIS, FEA, HAP, NEU, SAD) _ level (LO, MD, HI, XX unspecified).

No official folds: fold k of ``num_folds`` (default 5) tests on the k-th contiguous block of sorted
actor ids (``common.speaker_folds``); valid is held out of the other actors (speaker-disjoint). Speaker
= the actor id. (EmoBox's CREMA-D fold is not speaker-disjoint; use ``emorl-data emobox`` for it.)
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

CREMAD_EMOTIONS: dict[str, str] = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy",
                                   "NEU": "neutral", "SAD": "sad"}
_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def parse_cremad_name(path: str | Path) -> dict[str, str]:
    """actor, sentence, emotion, level of a CREMA-D file; ValueError/LabelError naming the file."""
    path = Path(path)
    m = _NAME.match(path.stem)
    if m is None:
        raise ValueError(f"{path}: not a CREMA-D file name (expected ACTOR_SEN_EMO_LV.wav, e.g. 1001_DFA_ANG_XX.wav)")
    actor, sentence, emotion, level = m.groups()
    if emotion not in CREMAD_EMOTIONS:
        raise LabelError(f"{path}: unknown CREMA-D emotion {emotion!r}; allowed: {', '.join(CREMAD_EMOTIONS)}")
    return {"actor": actor, "sentence": sentence, "emotion": emotion, "level": level}


def plan_cremad(
    root: str | Path,
    *,
    fold: int = 1,
    num_folds: int = 5,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> Plan:
    """Plan CREMA-D from a folder of its .wav files (module docstring)."""
    root = Path(root)

    def utterance(path: Path) -> PlannedUtterance:
        f = parse_cremad_name(path)
        return PlannedUtterance(
            key=make_key("cremad", path.stem), path=path, split="train", label=CREMAD_EMOTIONS[f["emotion"]],
            corpus_label=f["emotion"], corpus="cremad", speaker=f["actor"],
            extra={"source": str(path.relative_to(root)), "sentence": f["sentence"], "level": f["level"]})

    return plan_named_files("cremad", "CREMA-D", root, utterance, label_set=label_set, fold=fold, num_folds=num_folds,
                            valid_fraction=valid_fraction, valid_speakers=valid_speakers, seed=seed)
