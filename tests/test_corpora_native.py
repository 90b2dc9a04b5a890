"""Native-layout converters on tiny fake corpus trees, and the shared split helpers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emorl_pl.datamodules.corpora.common import (
    LabelError,
    PlannedUtterance,
    hold_out,
    pick_holdout_keys,
    pick_holdout_speakers,
    speaker_folds,
)
from emorl_pl.datamodules.corpora.convert import ConversionError, convert_plan, format_summary
from emorl_pl.datamodules.corpora.cremad import plan_cremad
from emorl_pl.datamodules.corpora.iemocap import plan_iemocap
from emorl_pl.datamodules.corpora.meld import plan_meld
from emorl_pl.datamodules.corpora.ravdess import plan_ravdess
from emorl_pl.datamodules.corpora.savee import plan_savee
from emorl_pl.datamodules.corpora.table import plan_table
from emorl_pl.datamodules.shards import read_index


def tone(path: Path, seconds: float = 0.3, sr: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.2 * np.sin(2 * np.pi * 300.0 * np.arange(int(seconds * sr)) / sr).astype(np.float32)
    sf.write(path, np.repeat(x[:, None], channels, axis=1) if channels > 1 else x, sr, subtype="PCM_16")
    return path


# --- split helpers -------------------------------------------------------------------------------

def test_speaker_folds_are_contiguous_blocks():
    speakers = [f"{i:02d}" for i in range(1, 25)]
    folds = speaker_folds(reversed(speakers), 6)
    assert folds == [speakers[i:i + 4] for i in range(0, 24, 4)]
    # 7 speakers in 3 folds: sizes 3, 2, 2 (first blocks larger), like numpy.array_split.
    assert [len(f) for f in speaker_folds("abcdefg", 3)] == [len(a) for a in np.array_split(np.arange(7), 3)]
    with pytest.raises(ValueError, match="num_folds"):
        speaker_folds(["a", "b"], 3)


def test_pick_holdout_speakers_closest_to_target():
    counts = {"a": 50, "b": 30, "c": 20, "d": 100}
    chosen = pick_holdout_speakers(counts, 0.25)  # target 50 of 200
    total = sum(counts[s] for s in chosen)
    # Greedy closest-to-target: never further from 50 than the smallest speaker (20); d alone overshoots.
    assert abs(total - 50) <= 20 and "d" not in chosen
    assert pick_holdout_speakers(counts, 0.25) == chosen  # deterministic
    assert pick_holdout_speakers(counts, 0.0) == []
    assert pick_holdout_speakers({"a": 10}, 0.5) == []  # never all speakers
    assert len(pick_holdout_speakers({"a": 10, "b": 10}, 0.9)) == 1


def test_pick_holdout_keys_exact_count():
    keys = [f"k{i}" for i in range(101)]
    held = pick_holdout_keys(keys, 0.1)
    assert len(held) == round(0.1 * 101) and held <= set(keys)
    assert pick_holdout_keys(list(reversed(keys)), 0.1) == held  # independent of order


def test_hold_out_explicit_speakers_and_errors():
    utts = [PlannedUtterance(f"k{i}", Path("x"), "train", "happy", "h", "c", speaker=s)
            for i, s in enumerate("aabbcc")]
    note = hold_out(utts, from_split="train", to_split="valid", fraction=0.1, speakers=["b"])
    assert [u.split for u in utts] == ["train", "train", "valid", "valid", "train", "train"]
    assert "['b']" in note
    with pytest.raises(ValueError, match="'zz'.*speakers: a, c"):
        hold_out(utts, from_split="train", to_split="valid", fraction=0.1, speakers=["zz"])


# --- IEMOCAP -------------------------------------------------------------------------------------

IEMOCAP_LINES = {
    1: [("Ses01F_impro01_F000", "neu"), ("Ses01F_impro01_M000", "exc"), ("Ses01F_impro01_F001", "fru"),
        ("Ses01F_impro01_M001", "ang")],
    2: [("Ses02M_impro01_F000", "sad"), ("Ses02M_impro01_M000", "hap"), ("Ses02M_impro01_F001", "neu"),
        ("Ses02M_impro01_M001", "xxx")],
    3: [("Ses03F_impro01_F000", "ang"), ("Ses03F_impro01_M000", "neu")],
}


def make_iemocap(root: Path, bad: tuple[int, str] | None = None) -> None:
    for session, utts in IEMOCAP_LINES.items():
        sdir = root / f"Session{session}"
        dialog = utts[0][0].rsplit("_", 1)[0]
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        trans = []
        for i, (utt, code) in enumerate(utts):
            if bad and bad[0] == session and i == 1:
                code = bad[1]
            lines += [f"[{i + 0.5:.4f} - {i + 1.2:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 2.0000]",
                      f"C-E1:\t{code};\t()", ""]
            trans.append(f"{utt} [{i:07.4f}-{i + 1:07.4f}]: words of {utt}.")
            tone(sdir / "sentences" / "wav" / dialog / f"{utt}.wav", 0.2)
        (sdir / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (sdir / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
        (sdir / "dialog" / "transcriptions").mkdir(parents=True)
        (sdir / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(trans) + "\n")


def test_iemocap_native(tmp_path):
    make_iemocap(tmp_path / "IEMOCAP")
    plan = plan_iemocap(tmp_path / "IEMOCAP", fold=1, valid_speakers=["Ses03M"])
    by_key = {u.key: u for u in plan.utterances}
    assert dict(plan.dropped) == {"fru": 1, "xxx": 1}
    assert plan.keys("test") == {"iemocap-Ses01F_impro01_F000", "iemocap-Ses01F_impro01_M000",
                                 "iemocap-Ses01F_impro01_M001"}
    assert plan.keys("valid") == {"iemocap-Ses03F_impro01_M000"}
    u = by_key["iemocap-Ses01F_impro01_M000"]
    assert (u.label, u.corpus_label, u.speaker, u.session) == ("happy", "exc", "Ses01M", "Ses01")
    assert u.text == "words of Ses01F_impro01_M000." and u.extra["vad"] == [2.5, 3.0, 2.0]
    indexes = convert_plan(plan, tmp_path / "out", progress=False)
    assert indexes["test"]["label_counts"] == {"neutral": 1, "happy": 1, "angry": 1}
    assert indexes["train"]["label_counts"] == {"sad": 1, "happy": 1, "neutral": 1, "angry": 1}
    assert read_index(tmp_path / "out" / "valid")["speaker_counts"] == {"Ses03M": 1}


def test_iemocap_unknown_label(tmp_path):
    make_iemocap(tmp_path / "IEMOCAP", bad=(2, "bored"))
    with pytest.raises(LabelError) as err:
        plan_iemocap(tmp_path / "IEMOCAP")
    msg = str(err.value)
    # Header, blank, first utterance line (3), C-E1 (4), blank (5), second utterance line (6).
    assert "Ses02M_impro01.txt:6" in msg and "'bored'" in msg and "neu, hap, exc, ang, sad" in msg


def test_iemocap_fold_must_exist(tmp_path):
    make_iemocap(tmp_path / "IEMOCAP")
    with pytest.raises(ValueError, match="Session5"):
        plan_iemocap(tmp_path / "IEMOCAP", fold=5)


# --- MELD ----------------------------------------------------------------------------------------

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime"


def make_meld(root: Path, bad_emotion: str | None = None) -> None:
    rows = {
        "train": [("Oh, hi!", "Monica", "joy", 0, 0), ("No.", "Ross", "anger", 0, 1), ("What", "Rachel", "neutral", 1, 0)],
        "dev": [("Hmm", "Joey", "sadness", 0, 0)],
        "test": [("Wow", "Phoebe", "surprise", 0, 0), ("Ew", "Chandler", "disgust", 2, 3)],
    }
    folders = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
    for split, items in rows.items():
        lines = [MELD_HEADER]
        for i, (text, spk, emo, dia, utt) in enumerate(items, 1):
            if bad_emotion and split == "dev":
                emo = bad_emotion
            lines.append(f'{i},"{text}",{spk},{emo},positive,{dia},{utt},1,1,"00:00:01,000","00:00:02,000"')
            if (split, dia, utt) != ("train", 1, 0):  # dia1_utt0 of train is missing
                tone(root / folders[split] / f"dia{dia}_utt{utt}.wav", 0.25, sr=48000, channels=2)
        (root / f"{split}_sent_emo.csv").write_text("\n".join(lines) + "\n")


def test_meld_native_with_preextracted_audio(tmp_path):
    make_meld(tmp_path / "MELD")
    plan = plan_meld(tmp_path / "MELD")
    assert plan.keys("valid") == {"meld-dia0_utt0-dev"}
    assert plan.keys("test") == {"meld-dia0_utt0-test", "meld-dia2_utt3-test"}
    u = next(u for u in plan.utterances if u.key == "meld-dia0_utt0-train")
    assert (u.label, u.speaker, u.text, u.session) == ("happy", "Monica", "Oh, hi!", "train-dia0")
    indexes = convert_plan(plan, tmp_path / "out", progress=False)
    assert indexes["train"]["label_counts"] == {"happy": 1, "angry": 1}
    assert indexes["train"]["skipped"] == 1
    assert "dia1_utt0" in indexes["train"]["skipped_files"][0]["path"]
    summary = format_summary(plan, indexes)
    assert "skipped files (1)" in summary and "dia1_utt0" in summary
    # Stereo 48 kHz, 0.25 s -> mono 16 kHz, 4000 samples.
    assert indexes["valid"]["total_duration"] == pytest.approx(0.25)


def test_meld_unknown_emotion_names_file_and_line(tmp_path):
    make_meld(tmp_path / "MELD", bad_emotion="confused")
    with pytest.raises(LabelError, match=r"dev_sent_emo\.csv:2: .*'confused'.*neutral, joy, sadness"):
        plan_meld(tmp_path / "MELD")


def test_meld_mp4_without_ffmpeg_or_sibling(tmp_path, monkeypatch):
    make_meld(tmp_path / "MELD")
    video = tmp_path / "MELD" / "output_repeated_splits_test" / "dia2_utt3.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    video.with_suffix(".wav").unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    plan = plan_meld(tmp_path / "MELD")
    with pytest.raises(ConversionError) as err:
        convert_plan(plan, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "dia2_utt3.mp4" in msg and "ffmpeg is not on PATH" in msg and "install FFmpeg" in msg
    assert not (tmp_path / "out").exists()  # checked before anything is written


# --- RAVDESS, CREMA-D, SAVEE ---------------------------------------------------------------------

def test_ravdess_native_folds_and_song(tmp_path):
    root = tmp_path / "RAVDESS"
    for actor in ("01", "02", "03", "04"):
        for emo in ("01", "03", "05", "08"):
            tone(root / f"Actor_{actor}" / f"03-01-{emo}-01-01-01-{actor}.wav", 0.1, sr=48000)
        tone(root / f"Actor_{actor}" / f"03-02-03-01-01-01-{actor}.wav", 0.1, sr=48000)  # song
    plan = plan_ravdess(root, fold=2, num_folds=2, valid_fraction=0.0)
    assert dict(plan.dropped) == {"song": 4}
    assert {u.speaker for u in plan.utterances if u.split == "test"} == {"03", "04"}
    assert plan.label_counts("test") == {"neutral": 2, "happy": 2, "angry": 2, "surprise": 2}
    iem = plan_ravdess(root, fold=1, num_folds=2, label_set=("neutral", "happy", "angry", "sad"))
    assert iem.dropped == Counter({"song": 4, "surprise": 4})
    assert {u.speaker for u in iem.utterances if u.split == "valid"} in ({"03"}, {"04"})
    indexes = convert_plan(iem, tmp_path / "out", progress=False)
    assert {s: ix["label_counts"] for s, ix in indexes.items()} == {s: iem.label_counts(s) for s in iem.splits()}
    (root / "Actor_01" / "03-01-09-01-01-01-01.wav").write_bytes(b"")
    with pytest.raises(LabelError, match=r"03-01-09-01-01-01-01\.wav.*'09'.*08 \(surprise\)"):
        plan_ravdess(root)


def test_cremad_empty_file_skipped_or_strict(tmp_path):
    root = tmp_path / "CREMA-D" / "AudioWAV"
    for actor in ("1001", "1002", "1003"):
        for emo in ("ANG", "NEU", "SAD"):
            tone(root / f"{actor}_DFA_{emo}_XX.wav", 0.1)
    (root / "1002_DFA_NEU_XX.wav").write_bytes(b"")  # CREMA-D really ships an empty file
    plan = plan_cremad(root.parent, fold=3, num_folds=3, valid_fraction=0.0)
    assert plan.keys("test") == {f"cremad-1003_DFA_{e}_XX" for e in ("ANG", "NEU", "SAD")}
    indexes = convert_plan(plan, tmp_path / "out", progress=False)
    assert indexes["train"]["num_samples"] == 5
    assert indexes["train"]["skipped_files"][0]["path"].endswith("1002_DFA_NEU_XX.wav")
    with pytest.raises(ConversionError, match=r"1002_DFA_NEU_XX\.wav.*--strict"):
        convert_plan(plan, tmp_path / "out2", strict=True, progress=False)


def test_savee_both_layouts_and_overwrite(tmp_path):
    root = tmp_path / "SAVEE"
    tone(root / "JE_sa01.wav", 0.1, sr=44100)
    tone(root / "JE_n01.wav", 0.1, sr=44100)
    tone(root / "AudioData" / "KL" / "a01.wav", 0.1, sr=44100)
    tone(root / "AudioData" / "KL" / "su02.wav", 0.1, sr=44100)
    plan = plan_savee(root, fold=1, num_folds=2, valid_fraction=0.0)
    assert {u.key: (u.speaker, u.label, u.split) for u in plan.utterances} == {
        "savee-JE-sa01": ("JE", "sad", "test"), "savee-JE-n01": ("JE", "neutral", "test"),
        "savee-KL-a01": ("KL", "angry", "train"), "savee-KL-su02": ("KL", "surprise", "train")}
    convert_plan(plan, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="refusing to overwrite.*out/t"):
        convert_plan(plan, tmp_path / "out", progress=False)
    indexes = convert_plan(plan, tmp_path / "out", overwrite=True, progress=False)
    assert indexes["test"]["num_samples"] == 2
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert summary["corpus"] == "savee" and set(summary["splits"]) == {"train", "test"}


# --- table ---------------------------------------------------------------------------------------

def test_table_csv_speaker_disjoint_and_jsonl_splits(tmp_path):
    rows = ["path,label,text,speaker"]
    for spk in "ABCDEFGHIJ":
        for i, lab in enumerate(("joy", "anger")):
            tone(tmp_path / "wav" / f"{spk}{i}.wav", 0.05)
            rows.append(f"wav/{spk}{i}.wav,{lab},hello {spk},{spk}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    plan = plan_table(tmp_path / "t.csv", valid_fraction=0.1, test_fraction=0.2)
    spk = {s: {u.speaker for u in plan.utterances if u.split == s} for s in ("train", "valid", "test")}
    assert len(spk["test"]) == 2 and len(spk["valid"]) == 1 and len(spk["train"]) == 7
    assert not (spk["train"] & spk["test"]) and not (spk["valid"] & spk["test"])
    assert {u.key for u in plan.utterances} >= {"t-wav_A0", "t-wav_J1"}
    assert plan.label_counts() == {"happy": 10, "angry": 10}
    lines = [{"path": str(tmp_path / "wav" / "A0.wav"), "label": "sad", "split": "dev"},
             {"path": "wav/A1.wav", "label": "Neutral", "split": "train"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    plan = plan_table(tmp_path / "t.jsonl", corpus="mine")
    assert [(u.split, u.label, u.corpus) for u in plan.utterances] == [("valid", "sad", "mine"), ("train", "neutral", "mine")]
    (tmp_path / "bad.csv").write_text("path,label\nwav/A0.wav,happy\nwav/A1.wav,meh\n")
    with pytest.raises(LabelError, match=r"bad\.csv:3: label 'meh'.*allowed: neutral, happy"):
        plan_table(tmp_path / "bad.csv")
