"""RAVDESS's own layout -> plan.

Files ``Actor_18/03-01-05-01-02-01-18.wav`` (found recursively under ``root``): modality (01 AV, 02
video, 03 audio) - vocal channel (01 speech, 02 song) - emotion (01 neutral, 02 calm, 03 happy, 04 sad,
05 angry, 06 fearful, 07 disgust, 08 surprised) - intensity (01 normal, 02 strong) - statement -
repetition - actor (odd male, even female). Speech only unless ``include_song``.

RAVDESS has no official folds: fold k of ``num_folds`` (default 6, 4 actors each) tests on the k-th
contiguous block of sorted actor ids (``common.speaker_folds``: 01-04, 05-08, ..., two male and two
female actors each); valid is held out of the other actors (speaker-disjoint). These folds are not
EmoBox's (use ``emorl-data emobox`` for those). Speaker = the two-digit actor id.
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

RAVDESS_EMOTIONS: dict[str, str] = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                                    "06": "fear", "07": "disgust", "08": "surprise"}
_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def parse_ravdess_name(path: str | Path) -> dict[str, str]:
    """The fields of a RAVDESS file name; ValueError/LabelError naming the file for a bad name or emotion code."""
    path = Path(path)
    m = _NAME.match(path.stem)
    if m is None:
        raise ValueError(f"{path}: not a RAVDESS file name (expected MM-VV-EE-II-SS-RR-AA.wav, "
                         "e.g. 03-01-05-01-02-01-18.wav)")
    modality, vocal, emotion, intensity, statement, repetition, actor = m.groups()
    if emotion not in RAVDESS_EMOTIONS:
        raise LabelError(f"{path}: unknown RAVDESS emotion code {emotion!r}; allowed: "
                         + ", ".join(f"{k} ({v})" for k, v in RAVDESS_EMOTIONS.items()))
    return {"modality": modality, "vocal_channel": vocal, "emotion": emotion, "intensity": intensity,
            "statement": statement, "repetition": repetition, "actor": actor}


def plan_ravdess(
    root: str | Path,
    *,
    fold: int = 1,
    num_folds: int = 6,
    include_song: bool = False,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> Plan:
    """Plan RAVDESS from a folder of its .wav files (module docstring)."""
    root = Path(root)

    def utterance(path: Path) -> PlannedUtterance | str:
        f = parse_ravdess_name(path)
        if f["vocal_channel"] == "02" and not include_song:
            return "song"
        return PlannedUtterance(
            key=make_key("ravdess", path.stem), path=path, split="train", label=RAVDESS_EMOTIONS[f["emotion"]],
            corpus_label=f["emotion"], corpus="ravdess", speaker=f["actor"],
            extra={"source": str(path.relative_to(root)), "intensity": "strong" if f["intensity"] == "02" else "normal",
                   "statement": f["statement"], "vocal_channel": "song" if f["vocal_channel"] == "02" else "speech"})

    return plan_named_files("ravdess", "RAVDESS", root, utterance, label_set=label_set, fold=fold,
                            num_folds=num_folds, valid_fraction=valid_fraction, valid_speakers=valid_speakers,
                            seed=seed)
