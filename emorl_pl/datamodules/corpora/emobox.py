"""EmoBox manifests -> plan (github.com/emo-box/EmoBox ``data/<corpus>/``).

Layout: ``<corpus>.jsonl`` (``key``, ``dataset``, ``wav`` relative to the user's download root,
``sample_rate``, ``num_frame``, ``length``, ``emo``, ``channel``), ``label_map.json`` (corpus label ->
unified name such as ``Happy``), ``fold_N/<corpus>_test_fold_N.jsonl`` and, for MELD,
``fold_N/<corpus>_valid_fold_N.jsonl``.

Splits of fold N: test = the keys of the test file; valid = the keys of the valid file when there is
one, else held out of the rest (``valid_speakers`` or ``valid_fraction``, speaker-disjoint where speakers
are known; see ``common.hold_out``; ``valid_fraction=0`` gives EmoBox's train exactly); train = the rest.

Speakers from the key (``emobox_speaker``):

* iemocap ``iemocap-Ses01F_impro04_M000``: session + the gender of the utterance's own suffix,
  ``Ses01M`` (the ``F``/``M`` after ``Ses01`` names who wore the markers in that dialog, not the speaker);
* ravdess ``ravdess-03-01-05-01-02-01-18``: the actor id, ``18``;
* cremad ``cremad-1087-IWL-ANG-XX``: the actor id, ``1087``;
* savee ``savee-JE-n23``: the speaker initials, ``JE``;
* meld and any other corpus: ``unknown`` (MELD's names are not in the manifest; its dialogue id goes
  to ``session``, e.g. ``train-dia0``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
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

_IEMOCAP_KEY = re.compile(r"^Ses(\d\d)[FM]_.+_([FM])\d+$")
_MELD_KEY = re.compile(r"^dia(\d+)_utt(\d+)-(\w+)$")
REQUIRED_FIELDS = ("key", "wav", "emo")


@dataclass
class EmoBoxFiles:
    """The metadata files of one EmoBox corpus and fold."""

    manifest: Path
    label_map: Path
    test: Path
    valid: Path | None = None


def find_emobox_files(corpus_dir: str | Path, fold: int, manifest: str | Path | None = None) -> EmoBoxFiles:
    """Locate ``<corpus>.jsonl``, ``label_map.json`` and fold N's test/valid files in an EmoBox corpus folder.

    Raises FileNotFoundError naming what is missing and what the folder holds.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"EmoBox corpus folder not found: {corpus_dir}")
    if manifest is None:
        candidates = [p for p in sorted(corpus_dir.glob("*.jsonl")) if not p.name.startswith("._")]
        preferred = corpus_dir / f"{corpus_dir.name}.jsonl"
        if preferred.is_file():
            manifest = preferred
        elif len(candidates) == 1:
            manifest = candidates[0]
        else:
            raise FileNotFoundError(f"cannot tell the manifest in {corpus_dir}: expected {preferred.name} "
                                    f"(found {[p.name for p in candidates]}); pass --manifest")
    manifest = Path(manifest)
    corpus = manifest.stem
    label_map = corpus_dir / "label_map.json"
    fold_dir = corpus_dir / f"fold_{fold}"
    test = fold_dir / f"{corpus}_test_fold_{fold}.jsonl"
    valid = fold_dir / f"{corpus}_valid_fold_{fold}.jsonl"
    for path, what in ((manifest, "manifest"), (label_map, "label map")):
        if not path.is_file():
            raise FileNotFoundError(f"EmoBox {what} not found: {path}")
    if not test.is_file():
        folds = sorted(p.name for p in corpus_dir.glob("fold_*") if p.is_dir())
        raise FileNotFoundError(f"EmoBox test file for fold {fold} not found: {test} (folds here: {folds})")
    return EmoBoxFiles(manifest, label_map, test, valid if valid.is_file() else None)


def read_label_map(path: str | Path) -> dict[str, str]:
    """EmoBox's ``label_map.json``: corpus label -> unified name (a JSON object of strings)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f"{path}: expected a JSON object mapping corpus labels to emotion names")
    return {str(k): v for k, v in table.items()}


def _body(corpus: str, key: str) -> str:
    prefix = f"{corpus}-"
    return key[len(prefix):] if key.startswith(prefix) else key


def emobox_speaker(corpus: str, key: str) -> str:
    """The speaker encoded in an EmoBox key (module docstring), or ``unknown``."""
    body = _body(corpus, key)
    if corpus == "iemocap":
        m = _IEMOCAP_KEY.match(body)
        return f"Ses{m.group(1)}{m.group(2)}" if m else UNKNOWN_SPEAKER
    if corpus == "ravdess":
        parts = body.split("-")
        return parts[-1] if len(parts) == 7 and parts[-1].isdigit() else UNKNOWN_SPEAKER
    if corpus == "cremad":
        head = body.split("-")[0]
        return head if head.isdigit() else UNKNOWN_SPEAKER
    if corpus == "savee":
        head = body.split("-")[0]
        return head if head.isalpha() and head.isupper() else UNKNOWN_SPEAKER
    return UNKNOWN_SPEAKER


def emobox_session(corpus: str, key: str) -> str | None:
    """IEMOCAP's session (``Ses01``) or MELD's split-qualified dialogue (``train-dia0``) from the key."""
    body = _body(corpus, key)
    if corpus == "iemocap":
        m = _IEMOCAP_KEY.match(body)
        return f"Ses{m.group(1)}" if m else None
    if corpus == "meld":
        m = _MELD_KEY.match(body)
        return f"{m.group(3)}-dia{m.group(1)}" if m else None
    return None


def _split_keys(path: Path, manifest_keys: set[str]) -> set[str]:
    keys = set()
    for n, row in read_jsonl(path):
        if "key" not in row:
            raise ValueError(f"{path}:{n}: row lacks 'key'")
        if row["key"] not in manifest_keys:
            raise ValueError(f"{path}:{n}: key {row['key']!r} is not in the manifest")
        keys.add(row["key"])
    return keys


def _strip(rel: str, n: int) -> Path:
    parts = Path(rel).parts
    return Path(*parts[n:]) if n < len(parts) else Path(parts[-1])


def plan_emobox(
    manifest: str | Path,
    *,
    label_map: str | Path,
    test_file: str | Path,
    valid_file: str | Path | None = None,
    audio_root: str | Path = ".",
    fold: int | None = None,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
    strip_components: int = 0,
) -> Plan:
    """Plan fold ``fold`` of an EmoBox corpus (splits and speakers: module docstring); reads metadata only.

    Audio path = ``audio_root / wav`` (after dropping ``strip_components`` leading parts of ``wav``).
    Raises LabelError naming manifest line and allowed labels for a label missing from the label map,
    ValueError naming file and line for bad rows or fold keys absent from the manifest.
    """
    manifest, audio_root = Path(manifest), Path(audio_root)
    table = read_label_map(label_map)
    rows = read_jsonl(manifest)
    corpus = next((str(r["dataset"]) for _, r in rows if r.get("dataset")), manifest.stem)
    keys = set()
    for n, row in rows:
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{manifest}:{n}: row lacks field(s) {missing}; EmoBox rows need {list(REQUIRED_FIELDS)}")
        keys.add(row["key"])
    test = _split_keys(Path(test_file), keys)
    valid = _split_keys(Path(valid_file), keys) if valid_file is not None else set()
    if test & valid:
        raise ValueError(f"{test_file} and {valid_file} share {len(test & valid)} key(s), e.g. {sorted(test & valid)[:3]}")
    utterances, dropped = [], Counter()
    for n, row in rows:
        label = map_label(str(row["emo"]), table, where=f"{manifest}:{n}", label_set=label_set)
        if label is None:
            dropped[str(row["emo"])] += 1
            continue
        key = row["key"]
        extra = {"source": str(row["wav"])}
        if "length" in row:
            extra["source_duration"] = row["length"]
        utterances.append(PlannedUtterance(
            key=make_key(key), path=audio_root / _strip(str(row["wav"]), strip_components),
            split="test" if key in test else "valid" if key in valid else "train",
            label=label, corpus_label=str(row["emo"]), corpus=corpus, speaker=emobox_speaker(corpus, key),
            session=emobox_session(corpus, key), fold=fold, extra=extra))
    check_unique_keys(utterances, str(manifest))
    notes = [f"test: {len(test)} keys of {Path(test_file).name}"]
    if valid_file is not None:
        notes.append(f"valid: {len(valid)} keys of {Path(valid_file).name}")
    elif valid_fraction > 0 or valid_speakers:
        notes.append(hold_out(utterances, from_split="train", to_split="valid", fraction=valid_fraction,
                              speakers=valid_speakers, seed=seed))
    return Plan(corpus, utterances, dropped, notes)
