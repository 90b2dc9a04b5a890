"""``emorl-data``: main([...]) on tiny corpora, and once through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emorl_pl.datamodules.cli import main
from emorl_pl.datamodules.shards import read_index

EMOBOX = Path(__file__).parents[2] / "shared" / "emobox"


def tone(path: Path, seconds: float = 0.1, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * np.sin(np.arange(int(seconds * sr)) * 0.1)).astype(np.float32), sr)


def make_savee(root: Path) -> None:
    for spk in ("DC", "JE", "JK", "KL"):
        for code in ("a01", "n01", "n02", "sa01"):
            tone(root / f"{spk}_{code}.wav", sr=44100)


def test_savee_cli_overwrite_and_strict(tmp_path, capsys):
    make_savee(tmp_path / "savee")
    args = ["savee", "--root", str(tmp_path / "savee"), "--out", str(tmp_path / "out"), "--fold", "2",
            "--valid-speakers", "KL", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test: 4 (neutral 2, angry 1, sad 1)" in out
    # Fold 2 of 4 sorted speakers DC, JE, JK, KL is JE; KL held out as valid.
    assert read_index(tmp_path / "out" / "test")["speaker_counts"] == {"JE": 4}
    assert read_index(tmp_path / "out" / "valid")["speaker_counts"] == {"KL": 4}
    assert read_index(tmp_path / "out" / "train")["label_counts"] == {"neutral": 4, "angry": 2, "sad": 2}

    assert main(args) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--overwrite" in err and str(tmp_path / "out") in err
    (tmp_path / "savee" / "JE_n02.wav").write_bytes(b"not audio")
    assert main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "skipped files (1)" in out and "JE_n02.wav" in out
    assert read_index(tmp_path / "out" / "test")["num_samples"] == 3
    assert main([*args, "--overwrite", "--strict"]) == 1
    assert "JE_n02.wav" in capsys.readouterr().err


def test_interrupted_conversion_leaves_no_index_and_a_rerun_says_so(tmp_path, capsys):
    make_savee(tmp_path / "savee")
    broken = tmp_path / "savee" / "KL_sa01.wav"  # the last of the valid split (KL): 3 written before it
    broken.write_bytes(b"not audio")
    args = ["savee", "--root", str(tmp_path / "savee"), "--out", str(tmp_path / "out"), "--fold", "2",
            "--valid-speakers", "KL", "--no-progress"]
    assert main([*args, "--strict"]) == 1  # stops at the broken file, in the middle of the valid split
    assert "KL_sa01.wav" in capsys.readouterr().err
    train, valid = tmp_path / "out" / "train", tmp_path / "out" / "valid"
    assert read_index(train)["num_samples"] == 8  # the split finished before the stop is complete
    shards = sorted(valid.glob("shard-*.tar"))
    assert shards and not (valid / "index.json").exists(), "an interrupted split must not look complete"
    sizes = [p.stat().st_size for p in shards]

    assert main(args) == 1  # a re-run finds the partial folder, says what to do and touches nothing
    err = capsys.readouterr().err
    assert f"{valid} holds a partial conversion (no index.json)" in err and "rerun with --overwrite" in err
    assert f"refusing to overwrite existing shards in {train}" in err
    assert [p.stat().st_size for p in sorted(valid.glob("shard-*.tar"))] == sizes
    assert not (valid / "index.json").exists()

    tone(broken)
    assert main([*args, "--overwrite"]) == 0
    assert read_index(valid)["label_counts"] == {"neutral": 2, "angry": 1, "sad": 1}
    assert read_index(tmp_path / "out" / "test")["num_samples"] == 4


def test_label_set_and_dry_run(tmp_path, capsys):
    make_savee(tmp_path / "savee")
    assert main(["savee", "--root", str(tmp_path / "savee"), "--out", str(tmp_path / "out"), "--dry-run",
                 "--label-set", "neutral,sad", "--valid-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "dropped: 4 (angry 4)" in out and "train: 9 (neutral 6, sad 3)" in out
    assert not (tmp_path / "out").exists()


def test_table_unknown_label_exit_1(tmp_path, capsys):
    tone(tmp_path / "a.wav")
    (tmp_path / "t.csv").write_text("path,label\na.wav,happy\na.wav,bored\n")
    assert main(["table", "--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 't.csv'}:3" in err and "'bored'" in err and "allowed: neutral" in err


@pytest.mark.skipif(not EMOBOX.is_dir(), reason=f"EmoBox metadata not found at {EMOBOX}")
def test_emobox_dry_run_meld(tmp_path, capsys):
    assert main(["emobox", "--corpus-dir", str(EMOBOX / "meld"), "--audio-root", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 13706 - 2610 test - 1108 valid = 9988 train.
    assert "train: 9988" in out and "valid: 1108" in out and "test: 2610" in out


@pytest.mark.skipif(not EMOBOX.is_dir(), reason=f"EmoBox metadata not found at {EMOBOX}")
def test_emobox_manifest_options_and_missing_audio_root(tmp_path, capsys):
    src = EMOBOX / "iemocap"
    assert main(["emobox", "--manifest", str(src / "iemocap.jsonl"), "--label-map", str(src / "label_map.json"),
                 "--fold", "3", "--audio-root", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "none of the 5531 planned audio files exists" in err and "audio root" in err
    assert not (tmp_path / "out").exists()


def test_synth_passes_options(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("emorl_pl.datamodules.synth")
    fake.write_synth_corpus = lambda out, **kw: calls.append((out, kw)) or {"train": {"num_samples": 3}}
    monkeypatch.setitem(sys.modules, "emorl_pl.datamodules.synth", fake)
    assert main(["synth", "--out", str(tmp_path), "--seed", "7", "--overwrite"]) == 0
    assert calls == [(tmp_path, {"seed": 7, "overwrite": True})]
    assert main(["synth", "--out", str(tmp_path), "--labels", "neutral,sad", "--num-speakers", "3",
                 "--per-label", "2"]) == 0
    assert calls[1][1] == {"seed": 0, "overwrite": False, "labels": ["neutral", "sad"], "num_speakers": 3,
                           "utterances_per_speaker_per_label": 2}
    assert "train: 3" in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path), "--labels", "ravdess8", "--ambiguity", "0.6"]) == 0
    assert calls[2][1] == {"seed": 0, "overwrite": False, "labels": "ravdess8", "ambiguity": 0.6}


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["emobox", "--help"], ["meld", "--help"]):
        with pytest.raises(SystemExit) as ex:
            main(argv)
        assert ex.value.code == 0
    assert "--valid-fraction" in capsys.readouterr().out


def test_installed_console_script(tmp_path):
    script = Path(sys.executable).with_name("emorl-data")
    if not script.exists():
        pytest.skip(f"console script not installed beside {sys.executable}")
    tone(tmp_path / "data" / "x.wav", sr=22050)
    tone(tmp_path / "data" / "y.wav", sr=22050)
    (tmp_path / "data" / "t.jsonl").write_text(
        json.dumps({"path": "x.wav", "label": "joy", "split": "train", "speaker": "s1"}) + "\n"
        + json.dumps({"path": "y.wav", "label": "sad", "split": "test", "text": "hi"}) + "\n")
    proc = subprocess.run([str(script), "table", "--table", str(tmp_path / "data" / "t.jsonl"),
                           "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_index(tmp_path / "out" / "train")["label_counts"] == {"happy": 1}
    test_index = read_index(tmp_path / "out" / "test")
    assert test_index["label_counts"] == {"sad": 1} and test_index["total_duration"] == pytest.approx(0.1)
    proc = subprocess.run([str(script), "table", "--table", str(tmp_path / "data" / "t.jsonl"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr
