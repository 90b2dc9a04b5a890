"""Bad audio and filtered labels are never dropped silently (issue 21): samples outside the label set are
counted per label and summarised; a WAV with NaN/inf samples is skipped and listed by a conversion,
skipped and counted in training/validation, and an error line in predictions; audio cropped to the data
module's ``max_duration`` is counted, warned about and added to a prediction's ``seconds_ignored``; the
encoder-window warning reports its running totals, not only the first batch's."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from emorl_pl.callbacks.prediction_writer import JSONLPredictionWriter
from emorl_pl.datamodules.cli import main as emorl_data
from emorl_pl.datamodules.files import AudioFilesDataModule
from emorl_pl.datamodules.shards import AudioSample, SplitWriter, read_index
from emorl_pl.datamodules.webdataset import ShardDataModule
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy

SR = 16000
IEMOCAP4 = ["neutral", "happy", "angry", "sad"]


def _meta(label: str, i: int) -> dict:
    return {"label": label, "corpus_label": label, "corpus": "toy", "speaker": f"s{i % 3}"}


def _write_split(root: Path, labels: list[str], seconds: list[float] | None = None, max_count: int = 4) -> Path:
    with SplitWriter(root, "train", max_count=max_count) as w:
        for i, label in enumerate(labels):
            n = int(SR * (seconds[i] if seconds else 0.05))
            w.write(AudioSample(f"k{i:03d}", np.full(n, 0.01 * (i % 7 + 1), np.float32), SR, _meta(label, i)))
    return root / "train"


def _float_wav(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, values.astype(np.float32), SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _bad(kind: str, n: int = 1600) -> np.ndarray:
    x = np.full(n, 0.1, np.float32)
    x[n // 4 : n // 4 + 10] = np.nan if kind == "nan" else np.inf
    return x


# ------------------------------------------------------------------------------------ label filter
@pytest.mark.parametrize("workers", [0, 2])
def test_label_set_drops_are_counted_per_label_and_summarised(tmp_path, caplog, workers):
    # 24 samples over 6 shards: iemocap4 keeps neutral 5 + angry 4 and drops fear 12 + disgust 3.
    labels = ["neutral"] * 5 + ["angry"] * 4 + ["fear"] * 12 + ["disgust"] * 3
    labels = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]
    split = _write_split(tmp_path, labels)
    dm = ShardDataModule(train=str(split), valid=str(split), label_set="iemocap4", batch_size=4,
                         num_workers=workers, shuffle_buffer=0)
    dropped = {"fear": 12, "disgust": 3}
    with caplog.at_level(logging.INFO, logger="emorl_pl.datamodules.webdataset"):
        loader = dm.build_eval_loader(str(split), "valid", rank=0, world_size=1)
        kept = Counter(lab for b in loader for lab, pad in zip(b["labels"], b["is_pad"]) if not pad)
        assert kept == {"neutral": 5, "angry": 4}
        assert dm.dropped_labels["valid"] == dropped and dm.skipped["valid"] == 15
        summary = [r for r in caplog.records if "sample(s) skipped" in r.getMessage()]
        assert [(r.levelname, r.getMessage()) for r in summary] == [(
            "WARNING", "valid: 15 sample(s) skipped on rank 0: 15 with a label outside the label set "
                       "['neutral', 'happy', 'angry', 'sad'] ({'fear': 12, 'disgust': 3})")]
        # expected drops: warned once per loader, later epochs' summaries at info level, still counted
        caplog.clear()
        assert sum(len(b["keys"]) for b in loader) == 9
        assert [r.levelname for r in caplog.records if "sample(s) skipped" in r.getMessage()] == ["INFO"]
        assert dm.dropped_labels["valid"] == {"fear": 24, "disgust": 6}

    # training on 2 ranks: each dropped record is counted once per pass, by one of the ranks
    for rank in range(2):
        list(dm.build_train_loader(rank=rank, world_size=2))
    assert dm.dropped_labels["train"] == dropped and dm.skipped["train"] == 15


# ------------------------------------------------------------------------------------ NaN / inf audio
def _make_savee(root: Path) -> dict[str, str]:
    """4 speakers x 3 files; two of JE's (the test fold) hold NaN / inf samples. Returns bad name -> kind."""
    rng = np.random.default_rng(0)
    bad = {"JE_a01.wav": "nan", "JE_sa01.wav": "inf"}
    root.mkdir(parents=True)
    for spk in ("DC", "JE", "JK", "KL"):
        for code in ("a01", "n01", "sa01"):
            name = f"{spk}_{code}.wav"
            audio = _bad(bad[name]) if name in bad else (0.1 * rng.standard_normal(1600)).astype(np.float32)
            sf.write(root / name, audio, SR, subtype="FLOAT")
    return bad


def test_conversion_skips_and_lists_nan_and_inf_files(tmp_path, capsys):
    bad = _make_savee(tmp_path / "savee")
    out = tmp_path / "out"
    args = ["savee", "--root", str(tmp_path / "savee"), "--out", str(out), "--fold", "2", "--valid-speakers", "KL",
            "--no-progress"]
    assert emorl_data(args) == 0  # the conversion finishes
    printed = capsys.readouterr().out
    assert "test: 1 (neutral 1)" in printed and "skipped files (2):" in printed
    for name, kind in bad.items():
        assert f"{tmp_path / 'savee' / name}: audio has {10 if kind == 'nan' else 0} NaN and " \
               f"{0 if kind == 'nan' else 10} inf value(s) among 1600 samples" in printed
    test = read_index(out / "test")
    assert test["num_samples"] == 1 and test["skipped"] == 2 and test["label_counts"] == {"neutral": 1}
    listed = json.loads((out / "conversion.json").read_text())["splits"]["test"]["skipped_files"]
    assert sorted(Path(f["path"]).name for f in listed) == sorted(bad)
    assert all("NaN" in f["reason"] for f in listed)
    assert read_index(out / "train")["num_samples"] == 6 and read_index(out / "valid")["num_samples"] == 3
    # --strict still stops at the first such file, naming it
    assert emorl_data([*args, "--overwrite", "--strict"]) == 1
    assert "JE_a01.wav: audio has 10 NaN" in capsys.readouterr().err


def _append_nonfinite_shard(split: Path) -> None:
    """A shard as another tool might write it: .flac members holding float WAV bytes (soundfile reads the
    format from the content); one with NaN samples, one with inf, one fine."""
    members = {"nan_sample": _bad("nan"), "inf_sample": _bad("inf"), "fine": np.full(1600, 0.1, np.float32)}
    with tarfile.open(split / "shard-000099.tar", "w") as tar:
        for key, audio in members.items():
            for ext, data in (("flac", _float_wav(audio)), ("json", json.dumps(_meta("sad", 0)).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = json.loads((split / "index.json").read_text())
    index["shards"].append("shard-000099.tar")
    index["num_samples"] += len(members)
    index["label_counts"]["sad"] += len(members)
    (split / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 2])
def test_nonfinite_samples_are_skipped_and_counted_in_training_and_validation(tmp_path, workers):
    labels = [IEMOCAP4[i % 4] for i in range(10)]
    split = _write_split(tmp_path, labels)
    _append_nonfinite_shard(split)
    dm = ShardDataModule(train=str(split), valid=str(split), batch_size=4, num_workers=workers, shuffle_buffer=0)
    good = sorted([f"k{i:03d}" for i in range(10)] + ["fine"])

    batches = list(dm.val_dataloader())
    assert sorted(k for b in batches for k, pad in zip(b["keys"], b["is_pad"]) if not pad) == good
    errors = {e["key"]: e["error"] for b in batches for e in b["errors"]}
    assert sorted(errors) == ["inf_sample", "nan_sample"]
    assert "audio has 10 NaN and 0 inf value(s) among 1600 samples" in errors["nan_sample"]
    assert "audio has 0 NaN and 10 inf value(s) among 1600 samples" in errors["inf_sample"]
    assert all(torch.isfinite(w).all() for b in batches for w in b["waveforms"])
    assert dm.skipped["valid"] == 2

    batches = list(dm.train_dataloader())
    assert len(batches) == math.ceil(13 / 4)  # the 13 usable records still set the epoch's length
    assert sorted(k for b in batches for k, pad in zip(b["keys"], b["is_pad"]) if not pad) == good
    assert all(torch.isfinite(w).all() for b in batches for w in b["waveforms"])
    assert dm.skipped["train"] == 2


def test_predict_writes_an_error_line_for_nan_audio_and_counts_the_data_crop(tmp_path, toy_model_dir, caplog):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    seconds = {"long.wav": 4.0, "short.wav": 1.0}
    for name, s in seconds.items():
        sf.write(audio / name, (0.1 * rng.standard_normal(int(SR * s))).astype(np.float32), SR)
    sf.write(audio / "nan.wav", _bad("nan", SR), SR, subtype="FLOAT")
    sf.write(audio / "inf.wav", _bad("inf", SR), SR, subtype="FLOAT")
    out = tmp_path / "pred.jsonl"
    # The toy model's encoder window is 2 s: long.wav loses 1.5 s to max_duration=2.5, then 0.5 s to the window.
    dm = AudioFilesDataModule(paths=str(audio), batch_size=2, max_duration=2.5)
    module = GRPOModule(AudioLMPolicy(toy_model_dir), labels="iemocap4", max_new_tokens=3, eval_max_new_tokens=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[JSONLPredictionWriter(str(out))])
    with caplog.at_level(logging.WARNING):
        trainer.predict(module, datamodule=dm, return_predictions=False)

    rows = {row["key"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == sorted(str(audio / n) for n in ("inf.wav", "long.wav", "nan.wav", "short.wav"))
    for name, kind in (("nan.wav", "nan"), ("inf.wav", "inf")):
        row = rows[str(audio / name)]
        n_nan, n_inf = (10, 0) if kind == "nan" else (0, 10)
        assert set(row) == {"key", "error"} and "emotion" not in row  # no label predicted
        assert row["error"] == f"{audio / name}: audio has {n_nan} NaN and {n_inf} inf value(s) among {SR} " \
                               "samples; not predicted"
    assert rows[str(audio / "long.wav")]["seconds_ignored"] == 2.0
    assert rows[str(audio / "short.wav")]["seconds_ignored"] == 0.0
    assert all("emotion" in rows[str(audio / n)] and "error" not in rows[str(audio / n)] for n in seconds)
    cropped = dm.cropped["predict"]
    assert (cropped.utterances, cropped.seen, cropped.seconds) == (1, 2, 1.5)
    # sorted files: batch 0 = inf.wav (a placeholder row, not counted) and long.wav
    assert "1 of 1 waveforms are longer than max_duration=2.5 s of the predict data: 1.50 s" in caplog.text


# ------------------------------------------------------------------------------------ cropping
@pytest.mark.parametrize("workers", [0, 2])
def test_training_audio_cropped_to_max_duration_is_counted_and_warned_once(tmp_path, caplog, workers):
    # 12 samples, every third 1.0 s long (cropped by 0.75 s at max_duration 0.25), the others 0.2 s.
    lengths = [1.0 if i % 3 == 0 else 0.2 for i in range(12)]
    split = _write_split(tmp_path, [IEMOCAP4[i % 4] for i in range(12)], lengths)
    dm = ShardDataModule(train=str(split), batch_size=5, num_workers=workers, max_duration=0.25, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="emorl_pl.modules.prompting"):
        batches = list(dm.train_dataloader())  # 3 batches: 12 samples and 3 padding rows (not counted)
    real = [(k, w, m) for b in batches for k, w, m, pad in zip(b["keys"], b["waveforms"], b["meta"], b["is_pad"])
            if not pad]
    assert len(real) == 12 and all(w.numel() <= 0.25 * SR for _, w, _ in real)
    assert sorted(k for k, _, m in real if m.get("seconds_cropped") == 0.75) == ["k000", "k003", "k006", "k009"]
    cropped = dm.cropped["train"]
    assert (cropped.utterances, cropped.seen) == (4, 12) and cropped.seconds == pytest.approx(3.0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "longer than max_duration=0.25 s of the train data" in warnings[0], warnings
    assert "cropped['train']" in warnings[0]


def test_encoder_window_warning_reports_running_totals(toy_model_dir, caplog):
    # The toy encoder's window is 2 s: each batch holds a 3 s waveform (1 s ignored) and a 0.5 s one.
    policy = AudioLMPolicy(toy_model_dir).load()
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="emorl_pl.modules.prompting"):
        for _ in range(10):
            waves = [0.1 * torch.randn(3 * SR, generator=g), 0.1 * torch.randn(SR // 2, generator=g)]
            prompts = policy.build_prompts(waves, SR, "Which emotion?")
            assert prompts.seconds_ignored == (1.0, 0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("1 of 2 waveforms are longer than the encoder's 2 s window: 1.00 s of audio "
                                  "ignored (cropped) in this batch")
    # the totals when the count of cropped waveforms reached 10, not the first batch's figures again
    assert messages[1].startswith("10 of 20 waveforms longer than the encoder's 2 s window: 10.00 s of audio "
                                  "ignored (cropped) so far")
    assert (policy.cropped_utterances, policy.cropped_seconds) == (10, 10.0)
