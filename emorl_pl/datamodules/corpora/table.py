"""A generic table (CSV or JSONL) -> plan.

Columns ``path``, ``label`` and optionally ``text``, ``speaker``, ``split``, ``key``; ``path`` is relative
to the table's folder (or absolute). Labels are any emotion name or alias ``emotions.normalize_label``
knows; ``split`` values ``dev``/``validation`` mean ``valid``.

Without a ``split`` column: ``test_fraction`` then ``valid_fraction`` are held out, speaker-disjoint when
the table gives at least two speakers, else utterance-level (``common.hold_out``). The key is the
``key`` column, else ``<corpus>-<path without suffix>`` made WebDataset-safe.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from emorl_pl.datamodules.corpora.common import (
    UNKNOWN_SPEAKER,
    Plan,
    PlannedUtterance,
    check_unique_keys,
    hold_out,
    make_key,
    map_label,
    read_jsonl,
)

SPLIT_ALIASES = {"dev": "valid", "validation": "valid", "val": "valid"}


def read_table(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) of a ``.csv``/``.tsv`` (header line 1) or ``.jsonl``; ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = read_jsonl(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = [(reader.line_num, row) for row in reader]
    else:
        raise ValueError(f"{path}: unsupported table type {path.suffix!r}; use .csv, .tsv or .jsonl")
    for n, row in rows:
        missing = [c for c in ("path", "label") if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{path}:{n}: row lacks {missing}; tables need columns path,label[,text,speaker,split]")
    return rows


def plan_table(
    table: str | Path,
    *,
    corpus: str | None = None,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> Plan:
    """Plan a corpus described by a CSV/JSONL table (module docstring)."""
    table = Path(table)
    corpus = corpus or make_key(table.stem)
    rows = read_table(table)
    has_split = any(row.get("split") not in (None, "") for _, row in rows)
    utterances, dropped = [], Counter()
    for n, row in rows:
        label = map_label(str(row["label"]), None, where=f"{table}:{n}", label_set=label_set)
        if label is None:
            dropped[str(row["label"])] += 1
            continue
        split = str(row.get("split") or "").strip()
        if has_split and not split:
            raise ValueError(f"{table}:{n}: empty split while other rows have one")
        split = SPLIT_ALIASES.get(split.lower(), split) if split else "train"
        rel = Path(str(row["path"]))
        path = rel if rel.is_absolute() else table.parent / rel
        key = make_key(row["key"]) if row.get("key") else make_key(corpus, rel.with_suffix("").as_posix())
        text = row.get("text")
        utterances.append(PlannedUtterance(
            key=key, path=path, split=split, label=label, corpus_label=str(row["label"]), corpus=corpus,
            speaker=str(row.get("speaker") or "").strip() or UNKNOWN_SPEAKER,
            text=str(text) if text not in (None, "") else None, extra={"source": str(row["path"])}))
    check_unique_keys(utterances, str(table))
    notes = []
    if has_split:
        notes.append(f"splits from the table's split column: {sorted({u.split for u in utterances})}")
    else:
        if test_fraction > 0:
            notes.append(hold_out(utterances, from_split="train", to_split="test", fraction=test_fraction, seed=seed))
        if valid_fraction > 0 or valid_speakers:
            notes.append(hold_out(utterances, from_split="train", to_split="valid", fraction=valid_fraction,
                                  speakers=valid_speakers, seed=seed))
    return Plan(corpus, utterances, dropped, notes)
