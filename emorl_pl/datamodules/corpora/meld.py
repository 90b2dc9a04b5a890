"""MELD's own release layout -> plan (official train/dev/test = our train/valid/test).

``root`` holds ``train_sent_emo.csv``, ``dev_sent_emo.csv``, ``test_sent_emo.csv`` (columns ``Sr No.,
Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, ...``) and one media folder per split
with ``dia{D}_utt{U}.mp4`` (or pre-extracted ``.wav``/``.flac`` of the same stem): the release's
``train_splits``, ``dev_splits_complete``, ``output_repeated_splits_test``, or plain ``train``/``dev``/
``test``. ``.mp4`` needs FFmpeg unless a same-stem ``.wav``/``.flac`` is beside it (see ``convert``).

Keys follow EmoBox: ``meld-dia0_utt0-train``. Speaker = the CSV's ``Speaker`` name; session = the
split-qualified dialogue (``train-dia0``).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from emorl_pl.datamodules.corpora.common import (
    LabelError,
    Plan,
    PlannedUtterance,
    check_unique_keys,
    make_key,
    map_label,
)

MELD_LABELS: dict[str, str] = {"neutral": "neutral", "joy": "happy", "sadness": "sad", "surprise": "surprise",
                               "disgust": "disgust", "anger": "angry", "fear": "fear"}
MELD_SPLITS = (("train", "train", ("train_splits", "train")),
               ("dev", "valid", ("dev_splits_complete", "dev_splits", "dev")),
               ("test", "test", ("output_repeated_splits_test", "test_splits", "test")))
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
MEDIA_SUFFIXES = (".mp4", ".wav", ".flac")


def find_media_dir(root: Path, names: tuple[str, ...]) -> Path:
    """The first existing folder among ``names`` under ``root`` (or the first name, which will be missing)."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def media_path(folder: Path, stem: str) -> Path:
    """``folder/stem.mp4``, or the pre-extracted .wav/.flac when only that exists."""
    for suffix in MEDIA_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return folder / f"{stem}.mp4"


def read_meld_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a MELD ``*_sent_emo.csv``; ValueError naming the file and missing columns."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; MELD CSVs have {list(MELD_COLUMNS)} ...")
        # reader.line_num is the physical line of the row's end (utterances may hold newlines).
        return [(reader.line_num, row) for row in reader]


def plan_meld(root: str | Path, *, label_set: tuple[str, ...] | None = None) -> Plan:
    """Plan MELD from its release folder (module docstring); reads the CSVs only."""
    root = Path(root)
    utterances, dropped = [], Counter()
    for name, split, folders in MELD_SPLITS:
        table = root / f"{name}_sent_emo.csv"
        if not table.is_file():
            raise FileNotFoundError(f"MELD table not found: {table} (expected {name}_sent_emo.csv in {root})")
        media = find_media_dir(root, folders)
        for n, row in read_meld_csv(table):
            emotion = (row["Emotion"] or "").strip().lower()
            try:
                label = map_label(emotion, MELD_LABELS, where=f"{table}:{n}", label_set=label_set)
            except LabelError:
                raise LabelError(f"{table}:{n}: unknown MELD emotion {row['Emotion']!r}; allowed: "
                                 f"{', '.join(MELD_LABELS)}") from None
            if label is None:
                dropped[emotion] += 1
                continue
            dia, utt = row["Dialogue_ID"].strip(), row["Utterance_ID"].strip()
            if not (dia.isdigit() and utt.isdigit()):
                raise ValueError(f"{table}:{n}: Dialogue_ID/Utterance_ID must be integers, got {dia!r}/{utt!r}")
            stem = f"dia{dia}_utt{utt}"
            path = media_path(media, stem)
            utterances.append(PlannedUtterance(
                key=make_key("meld", stem, name), path=path, split=split, label=label, corpus_label=emotion,
                corpus="meld", speaker=(row["Speaker"] or "").strip() or "unknown", text=row["Utterance"],
                session=f"{name}-dia{dia}",
                extra={"source": str(path.relative_to(root)), "sentiment": (row.get("Sentiment") or "").strip()}))
    check_unique_keys(utterances, str(root))
    return Plan("meld", utterances, dropped, ["official MELD splits: train, dev -> valid, test"])
