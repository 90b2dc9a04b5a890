"""EmoBox converter against the real EmoBox manifests in ../shared/emobox (metadata only, no audio).

Expected numbers come from shared/emobox/README.md (hand-mapped to canonical labels) and from reading
the fold files directly with json, not from the converter.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emorl_pl.datamodules.corpora.common import LabelError
from emorl_pl.datamodules.corpora.convert import convert_plan
from emorl_pl.datamodules.corpora.emobox import emobox_speaker, find_emobox_files, plan_emobox
from emorl_pl.datamodules.shards import read_index
from emorl_pl.emotions import LABEL_SETS

EMOBOX = Path(__file__).parents[2] / "shared" / "emobox"
pytestmark = pytest.mark.skipif(not EMOBOX.is_dir(), reason=f"EmoBox metadata not found at {EMOBOX}")

# README table, corpus labels mapped by hand through each label_map.json to canonical names.
EXPECTED = {
    "iemocap": {"neutral": 1708, "happy": 595 + 1041, "angry": 1103, "sad": 1084},
    "meld": {"neutral": 6434, "happy": 2308, "surprise": 1636, "angry": 1607, "sad": 1002, "disgust": 361,
             "fear": 358},
    "ravdess": {"neutral": 96, **{k: 192 for k in ("calm", "happy", "sad", "angry", "fear", "disgust", "surprise")}},
    "savee": {"neutral": 120, **{k: 60 for k in ("angry", "disgust", "fear", "happy", "sad", "surprise")}},
    "cremad": {"neutral": 1087, **{k: 1271 for k in ("angry", "disgust", "fear", "happy", "sad")}},
}
TOTALS = {"iemocap": 5531, "meld": 13706, "ravdess": 1440, "savee": 480, "cremad": 7442}


def _keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


def _plan(corpus: str, fold: int = 1, audio_root: Path | str = "/nonexistent", **kw):
    f = find_emobox_files(EMOBOX / corpus, fold)
    return plan_emobox(f.manifest, label_map=f.label_map, test_file=f.test, valid_file=f.valid,
                       audio_root=audio_root, fold=fold, **kw)


def _folds(corpus: str) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (EMOBOX / corpus).glob("fold_*"))


@pytest.mark.parametrize("corpus", sorted(EXPECTED))
def test_full_manifest_label_counts(corpus):
    plan = _plan(corpus)
    assert len(plan.utterances) == TOTALS[corpus]
    assert plan.label_counts() == EXPECTED[corpus]
    assert not plan.dropped


@pytest.mark.parametrize("corpus,fold", [(c, k) for c in sorted(EXPECTED) for k in _folds(c)] if EMOBOX.is_dir() else [])
def test_fold_splits_match_fold_files(corpus, fold):
    plan = _plan(corpus, fold)
    all_keys = set(_keys(EMOBOX / corpus / f"{corpus}.jsonl"))
    test_file = EMOBOX / corpus / f"fold_{fold}" / f"{corpus}_test_fold_{fold}.jsonl"
    valid_file = test_file.with_name(f"{corpus}_valid_fold_{fold}.jsonl")
    train, valid, test = plan.keys("train"), plan.keys("valid"), plan.keys("test")
    assert test == set(_keys(test_file))
    if valid_file.is_file():
        assert valid == set(_keys(valid_file))
    assert train | valid | test == all_keys
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(train) > len(test) > 0 and len(valid) > 0


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_iemocap_folds_are_sessions(fold):
    plan = _plan("iemocap", fold)
    all_keys = _keys(EMOBOX / "iemocap" / "iemocap.jsonl")
    session = {k for k in all_keys if k.startswith(f"iemocap-Ses0{fold}")}
    assert plan.keys("test") == session
    assert {u.session for u in plan.utterances if u.split == "test"} == {f"Ses0{fold}"}


@pytest.mark.parametrize("corpus", ["iemocap", "ravdess", "savee", "cremad"])
def test_held_out_valid_is_speaker_disjoint_and_deterministic(corpus):
    plan = _plan(corpus)
    spk = {s: {u.speaker for u in plan.utterances if u.split == s} for s in ("train", "valid")}
    assert spk["valid"] and not (spk["train"] & spk["valid"])
    assert "unknown" not in spk["train"]
    assert plan.keys("valid") == _plan(corpus).keys("valid")
    no_valid = _plan(corpus, valid_fraction=0.0)
    assert not no_valid.keys("valid")
    assert no_valid.keys("train") == plan.keys("train") | plan.keys("valid")


def test_speakers_from_keys():
    # The last segment's gender is the speaker's: in Ses01F_impro01 the M utterances are the man's.
    assert emobox_speaker("iemocap", "iemocap-Ses01F_impro01_M003") == "Ses01M"
    assert emobox_speaker("iemocap", "iemocap-Ses05M_script01_1_F012") == "Ses05F"
    assert emobox_speaker("ravdess", "ravdess-03-01-05-01-02-01-18") == "18"
    assert emobox_speaker("cremad", "cremad-1087-IWL-ANG-XX") == "1087"
    assert emobox_speaker("savee", "savee-JE-n23") == "JE"
    assert emobox_speaker("meld", "meld-dia0_utt0-train") == "unknown"
    iemocap = _plan("iemocap")
    assert len({u.speaker for u in iemocap.utterances}) == 10
    assert len({u.speaker for u in _plan("cremad").utterances}) == 91


def test_label_set_restriction_drops_and_counts():
    plan = _plan("ravdess", label_set=LABEL_SETS["iemocap4"])
    assert plan.label_counts() == {"neutral": 96, "happy": 192, "sad": 192, "angry": 192}
    assert dict(plan.dropped) == {"Calm": 192, "Fearful": 192, "Disgust": 192, "Surprised": 192}


def test_unknown_label_names_file_line_and_allowed(tmp_path):
    src = EMOBOX / "savee"
    lines = (src / "savee.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["emo"] = "xx"
    lines[2] = json.dumps(row)
    manifest = tmp_path / "savee.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelError) as err:
        plan_emobox(manifest, label_map=src / "label_map.json", test_file=src / "fold_1" / "savee_test_fold_1.jsonl")
    msg = str(err.value)
    assert f"{manifest}:3" in msg and "'xx'" in msg and "a, d, f, h, n, sa, su" in msg


def _write_stand_in(plan, rows_by_key: dict[str, dict], audio_root: Path, seed: int = 0) -> None:
    """A short tone + noise at each planned path, with the manifest's frame count, rate and channels.

    MELD's .mp4 paths get a same-stem .wav (the pre-extracted-audio route of the converter).
    """
    rng = np.random.default_rng(seed)
    for u in plan.utterances:
        row = rows_by_key[u.key]
        sr, frames, ch = int(row["sample_rate"]), int(row["num_frame"]), int(row["channel"])
        t = np.arange(frames) / sr
        x = 0.2 * np.sin(2 * np.pi * 220.0 * t) + 0.01 * rng.standard_normal(frames)
        x = np.repeat(x[:, None], ch, axis=1) if ch > 1 else x
        path = u.path.with_suffix(".wav") if u.path.suffix == ".mp4" else u.path
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")


def _rows(corpus: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in (EMOBOX / corpus / f"{corpus}.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in rows}


def _check_shards(plan, out: Path, rows: dict[str, dict]) -> None:
    for split in plan.splits():
        index = read_index(out / split)
        assert index["label_counts"] == plan.label_counts(split)
        assert index["num_samples"] == len(plan.keys(split))
        # Duration after resampling to 16 kHz: ceil(frames * 16000 / sr) samples.
        expected = sum(np.ceil(rows[k]["num_frame"] * 16000 / rows[k]["sample_rate"]) / 16000 for k in plan.keys(split))
        assert index["total_duration"] == pytest.approx(expected, abs=1e-3 * index["num_samples"] + 1e-3)
        metas = {}
        for shard in index["shards"]:
            with tarfile.open(out / split / shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        metas[m.name[:-5]] = json.loads(tar.extractfile(m).read())
        assert set(metas) == plan.keys(split)
        by_key = {u.key: u for u in plan.utterances}
        for key, meta in metas.items():
            assert meta["label"] == by_key[key].label and meta["speaker"] == by_key[key].speaker
            assert meta["corpus_label"] == rows[key]["emo"]


def test_savee_end_to_end_full(tmp_path):
    rows = _rows("savee")
    plan = _plan("savee", audio_root=tmp_path / "audio")
    _write_stand_in(plan, rows, tmp_path / "audio")
    indexes = convert_plan(plan, tmp_path / "out", progress=False)
    assert sum(ix["num_samples"] for ix in indexes.values()) == 480
    assert all(ix["skipped"] == 0 for ix in indexes.values())
    _check_shards(plan, tmp_path / "out", rows)


@pytest.mark.parametrize("corpus", ["iemocap", "meld", "ravdess", "cremad"])
def test_end_to_end_subset(tmp_path, corpus):
    rows = _rows(corpus)
    full = _plan(corpus, audio_root=tmp_path / "audio")
    # Deterministic subset: the 2 shortest utterances of every (split, label), so every label and
    # every split (test keys included) is covered.
    groups: dict[tuple[str, str], list] = {}
    for u in full.utterances:
        groups.setdefault((u.split, u.label), []).append(u)
    keys = [u.key for g in groups.values() for u in sorted(g, key=lambda u: (rows[u.key]["num_frame"], u.key))[:2]]
    plan = full.subset(keys)
    assert set(plan.splits()) == {"train", "valid", "test"}
    assert set(plan.label_counts()) == set(EXPECTED[corpus])
    _write_stand_in(plan, rows, tmp_path / "audio")
    convert_plan(plan, tmp_path / "out", progress=False)
    _check_shards(plan, tmp_path / "out", rows)
    assert Counter(u.split for u in plan.utterances)["test"] == len(plan.keys("test")) > 0
