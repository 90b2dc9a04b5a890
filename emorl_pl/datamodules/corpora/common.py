"""What every corpus converter shares: the planned utterance, label mapping, and deterministic splits.

A converter first *plans* (reads metadata only, no audio) and returns a :class:`Plan`: one
:class:`PlannedUtterance` per kept utterance with its split, canonical label and speaker, plus the
counts of utterances dropped on purpose (labels outside the 4-class set, song files...). Writing the
plan is :func:`emorl_pl.datamodules.corpora.convert.convert_plan`'s job.

Split rules used by all converters (documented once here):

* held-out speakers (``pick_holdout_speakers``): speakers are ordered by ``sha256(f"{seed}:{salt}:{spk}")``
  and taken in that order whenever adding one brings the held-out count closer to
  ``round(fraction * N)``; at least one speaker is held out when ``fraction > 0``, at least one is kept.
  Deterministic, independent of file order, and speaker-disjoint.
* without usable speakers (none known, or just one): the ``round(fraction * N)`` utterances with the
  smallest ``sha256(f"{seed}:{salt}:{key}")`` are held out (utterance-level).
* corpora without official folds: the sorted speakers are cut into ``num_folds`` contiguous, nearly
  equal blocks (``numpy.array_split`` sizes); fold ``k`` tests on block ``k``. Contiguous blocks keep
  RAVDESS's alternating male/female actor ids balanced inside each fold.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorl_pl.emotions import CANONICAL_EMOTIONS, get_label_set, try_normalize_label

UNKNOWN_SPEAKER = "unknown"


class LabelError(ValueError):
    """A corpus label that the converter cannot map; the message names the file, line and allowed labels."""


@dataclass
class PlannedUtterance:
    """One utterance to convert: where its audio is, which split it goes to, and its metadata."""

    key: str
    path: Path
    split: str
    label: str
    corpus_label: str
    corpus: str
    speaker: str = UNKNOWN_SPEAKER
    text: str | None = None
    session: str | None = None
    fold: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The sample's JSON metadata (the writer adds ``duration``); optional fields only when set."""
        meta: dict[str, Any] = {"label": self.label, "corpus_label": self.corpus_label, "corpus": self.corpus,
                                "speaker": self.speaker}
        for name in ("text", "session", "fold"):
            value = getattr(self, name)
            if value is not None:
                meta[name] = value
        meta.update(self.extra)
        return meta


@dataclass
class Plan:
    """The planned conversion of one corpus: kept utterances, dropped counts, and notes for the summary."""

    corpus: str
    utterances: list[PlannedUtterance]
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def splits(self) -> list[str]:
        """Split names in a stable order: train, valid, test first, then any other in first-seen order."""
        seen = list(dict.fromkeys(u.split for u in self.utterances))
        order = [s for s in ("train", "valid", "test") if s in seen]
        return order + [s for s in seen if s not in order]

    def label_counts(self, split: str | None = None) -> dict[str, int]:
        """Canonical label -> count, over one split or all."""
        return dict(Counter(u.label for u in self.utterances if split is None or u.split == split))

    def keys(self, split: str) -> set[str]:
        return {u.key for u in self.utterances if u.split == split}

    def subset(self, keys: Iterable[str]) -> Plan:
        """The same plan restricted to ``keys`` (for partial conversions and tests)."""
        wanted = set(keys)
        return Plan(self.corpus, [u for u in self.utterances if u.key in wanted], Counter(self.dropped),
                    list(self.notes))


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def make_key(*parts: object) -> str:
    """A WebDataset-safe key: parts joined by ``-``, every character outside ``[A-Za-z0-9_-]`` -> ``_``."""
    key = _UNSAFE_KEY_CHARS.sub("_", "-".join(str(p) for p in parts if p is not None and str(p) != ""))
    if not key:
        raise ValueError(f"cannot build a sample key from {parts!r}")
    return key


def check_unique_keys(utterances: Sequence[PlannedUtterance], where: str) -> None:
    """Raise ValueError naming ``where`` and the first duplicated keys (keys must be unique per corpus)."""
    counts = Counter(u.key for u in utterances)
    dups = [k for k, n in counts.items() if n > 1]
    if dups:
        raise ValueError(f"{where}: {len(dups)} duplicate sample key(s), e.g. {dups[:5]}")


def resolve_label_set(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``None`` (keep every label) or the canonical labels of a named set / comma-separated list."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str) and "," in spec:
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    return get_label_set(spec)


def map_label(
    corpus_label: str,
    table: Mapping[str, str] | None,
    *,
    where: str,
    label_set: tuple[str, ...] | None = None,
) -> str | None:
    """Corpus label -> canonical label, or None when it is outside ``label_set`` (the caller counts it).

    ``table`` maps the corpus's labels to names that ``emotions.normalize_label`` understands (EmoBox's
    label_map.json, a corpus's code table); without a table the label itself is normalised. Raises
    LabelError naming ``where`` (file and line, or file name) and the allowed labels when the label is
    not in the table or not an emotion the project knows.
    """
    if table is not None:
        if corpus_label not in table:
            raise LabelError(f"{where}: unknown label {corpus_label!r}; allowed: {', '.join(table)}")
        name = table[corpus_label]
    else:
        name = corpus_label
    canon = try_normalize_label(name)
    if canon is None:
        allowed = ", ".join(table) if table is not None else ", ".join(CANONICAL_EMOTIONS)
        raise LabelError(f"{where}: label {corpus_label!r} ({name!r}) is not a known emotion; allowed: {allowed}")
    if label_set is not None and canon not in label_set:
        return None
    return canon


def _rank(seed: int, salt: str, name: str) -> str:
    return hashlib.sha256(f"{seed}:{salt}:{name}".encode()).hexdigest()


def pick_holdout_speakers(counts: Mapping[str, int], fraction: float, *, seed: int = 0, salt: str = "valid") -> list[str]:
    """Speakers to hold out so that their utterances come closest to ``round(fraction * sum(counts))``.

    Greedy over speakers ordered by ``sha256(f"{seed}:{salt}:{speaker}")``: a speaker is taken when it
    brings the held-out total closer to the target. At least one speaker is taken (if fraction > 0) and
    at least one is left. Returns the chosen speakers, sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    speakers = sorted(counts, key=lambda s: _rank(seed, salt, s))
    if fraction == 0.0 or len(speakers) < 2:
        return []
    target = round(fraction * sum(counts.values()))
    chosen: list[str] = []
    total = 0
    for spk in speakers:
        if len(chosen) == len(speakers) - 1:
            break
        if abs(total + counts[spk] - target) < abs(total - target):
            chosen.append(spk)
            total += counts[spk]
    if not chosen:
        chosen = [min(speakers, key=lambda s: abs(counts[s] - target))]
    return sorted(chosen)


def pick_holdout_keys(keys: Sequence[str], fraction: float, *, seed: int = 0, salt: str = "valid") -> set[str]:
    """The ``round(fraction * len(keys))`` keys with the smallest ``sha256(f"{seed}:{salt}:{key}")``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    return set(sorted(keys, key=lambda k: _rank(seed, salt, k))[: round(fraction * len(keys))])


def hold_out(
    utterances: Sequence[PlannedUtterance],
    *,
    from_split: str,
    to_split: str,
    fraction: float,
    speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> str:
    """Move part of ``from_split`` to ``to_split`` in place; returns a one-line note saying how.

    ``speakers`` names the held-out speakers explicitly (each must occur in ``from_split``); otherwise
    speaker-disjoint by ``pick_holdout_speakers`` when at least two speakers are known there, else
    utterance-level by ``pick_holdout_keys``.
    """
    pool = [u for u in utterances if u.split == from_split]
    counts = Counter(u.speaker for u in pool)
    known = {s: n for s, n in counts.items() if s != UNKNOWN_SPEAKER}
    if speakers:
        absent = [s for s in speakers if s not in counts]
        if absent:
            raise ValueError(f"held-out speaker(s) {absent} are not in the {from_split} split; "
                             f"its speakers: {', '.join(sorted(counts))}")
        chosen = set(speakers)
        how = f"speakers {sorted(chosen)} (given)"
    elif len(known) >= 2 and UNKNOWN_SPEAKER not in counts:
        chosen = set(pick_holdout_speakers(known, fraction, seed=seed, salt=to_split))
        how = f"speakers {sorted(chosen)} (speaker-disjoint, fraction {fraction}, seed {seed})"
    else:
        keys = pick_holdout_keys([u.key for u in pool], fraction, seed=seed, salt=to_split)
        for u in pool:
            if u.key in keys:
                u.split = to_split
        return f"{to_split}: {len(keys)} of {len(pool)} {from_split} utterances (utterance-level, no speakers; " \
               f"fraction {fraction}, seed {seed})"
    moved = 0
    for u in pool:
        if u.speaker in chosen:
            u.split = to_split
            moved += 1
    return f"{to_split}: {moved} of {len(pool)} {from_split} utterances, {how}"


def speaker_folds(speakers: Iterable[str], num_folds: int) -> list[list[str]]:
    """Sorted unique speakers cut into ``num_folds`` contiguous blocks of nearly equal size (first blocks larger)."""
    ordered = sorted(set(speakers))
    if num_folds < 2 or num_folds > len(ordered):
        raise ValueError(f"need 2 <= num_folds <= number of speakers ({len(ordered)}), got {num_folds}")
    base, extra = divmod(len(ordered), num_folds)
    folds, start = [], 0
    for i in range(num_folds):
        size = base + (1 if i < extra else 0)
        folds.append(ordered[start:start + size])
        start += size
    return folds


def assign_speaker_folds(
    utterances: Sequence[PlannedUtterance],
    *,
    fold: int,
    num_folds: int,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Speaker-disjoint train/valid/test in place for corpora without official folds; returns notes.

    test = the speakers of block ``fold`` of ``speaker_folds``; valid = held out of the rest (see ``hold_out``).
    """
    folds = speaker_folds((u.speaker for u in utterances), num_folds)
    if not 1 <= fold <= num_folds:
        raise ValueError(f"fold must be in 1..{num_folds}, got {fold}")
    test = set(folds[fold - 1])
    for u in utterances:
        u.split = "test" if u.speaker in test else "train"
        u.fold = fold
    notes = [f"test: speakers {sorted(test)} (fold {fold} of {num_folds} contiguous speaker blocks)"]
    if valid_fraction > 0 or valid_speakers:
        notes.append(hold_out(utterances, from_split="train", to_split="valid", fraction=valid_fraction,
                              speakers=valid_speakers, seed=seed))
    return notes


def parse_speaker_list(spec: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or a list -> list of names; None/empty -> None."""
    if spec is None:
        return None
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    return names or None


def audio_files(root: Path, suffixes: Sequence[str] = (".wav", ".flac")) -> list[Path]:
    """Audio files under ``root`` (recursive, sorted), ignoring macOS ``._*`` resource forks."""
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("._")
                  and p.is_file())


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming file and line for bad JSON."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    return rows


def plan_named_files(
    corpus: str,
    display: str,
    root: str | Path,
    utterance: Callable[[Path], PlannedUtterance | str],
    *,
    label_set: tuple[str, ...] | None,
    fold: int,
    num_folds: int,
    valid_fraction: float,
    valid_speakers: Sequence[str] | None,
    seed: int,
) -> Plan:
    """Plan a corpus whose label and speaker are in each file name (RAVDESS, CREMA-D, SAVEE).

    ``utterance(path)`` gives the file's utterance, or a reason (a string) to drop it. Utterances whose
    label is outside ``label_set`` are dropped and counted under that label; the rest are split into
    speaker-disjoint folds (``assign_speaker_folds``).
    """
    root = Path(root)
    utterances, dropped = [], Counter()
    for path in audio_files(root):
        u = utterance(path)
        if isinstance(u, str):
            dropped[u] += 1
        elif label_set is not None and u.label not in label_set:
            dropped[u.label] += 1
        else:
            utterances.append(u)
    if not utterances:
        raise FileNotFoundError(f"no {display} audio files kept under {root} (dropped: {dict(dropped)})")
    check_unique_keys(utterances, str(root))
    notes = assign_speaker_folds(utterances, fold=fold, num_folds=num_folds, valid_fraction=valid_fraction,
                                 valid_speakers=valid_speakers, seed=seed)
    return Plan(corpus, utterances, dropped, notes)
