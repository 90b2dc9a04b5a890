"""Audio helpers and the shard writer: round trip, resampling, mono mix-down, overlong handling, index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
from shard_reader import read_split

from emorl_pl.audio import AudioReadError, load_audio, resample, to_mono
from emorl_pl.datamodules.shards import (
    AudioSample,
    SplitWriter,
    count_shard_labels,
    is_partial_split,
    read_index,
)


def _meta(label: str = "ang", speaker: str = "s1") -> dict:
    return {"label": label, "corpus_label": label.upper(), "corpus": "toy", "speaker": speaker}


def test_load_audio_errors_name_the_path(tmp_path):
    with pytest.raises(AudioReadError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really audio")
    with pytest.raises(AudioReadError, match="bad.wav"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioReadError, match="empty.wav"):
        load_audio(empty)
    ok = tmp_path / "ok.wav"
    sf.write(ok, np.full(100, 0.25, dtype=np.float32), 8000)
    audio, sr = load_audio(ok)
    assert sr == 8000 and audio.shape == (100,) and np.allclose(audio, 0.25, atol=1 / 32768)


def test_to_mono_averages_channels():
    x = np.stack([np.ones(50), -np.ones(50) * 0.5], axis=1).astype(np.float32)  # (frames, 2)
    assert np.allclose(to_mono(x), 0.25)
    assert np.allclose(to_mono(x.T), 0.25)  # channel-first is recognised too
    assert to_mono(np.zeros(7)).shape == (7,)


def test_resample_keeps_a_tone_and_length():
    sr_in, sr_out, f = 44100, 16000, 440.0
    t = np.arange(sr_in) / sr_in
    y = resample(np.sin(2 * np.pi * f * t).astype(np.float32), sr_in, sr_out)
    assert len(y) == math.ceil(sr_in * sr_out / sr_in)
    # away from the edges the output is the same tone sampled at 16 kHz
    t_out = np.arange(len(y)) / sr_out
    mid = slice(200, -200)
    assert np.max(np.abs(y[mid] - np.sin(2 * np.pi * f * t_out[mid]))) < 0.01


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mono = (0.3 * rng.standard_normal(16000)).clip(-1, 1).astype(np.float32)
    stereo_8k = np.stack([np.full(8000, 0.4), np.full(8000, 0.2)], axis=1).astype(np.float32)
    with SplitWriter(tmp_path, "train", max_count=2) as w:
        assert w.write(AudioSample("utt.one", mono, 16000, _meta("ang", "s1") | {"text": "hi", "fold": 3}))
        assert w.write(AudioSample("utt2", stereo_8k, 8000, _meta("excited", "s2")))
        assert w.write(AudioSample("utt3", mono[:4000], 16000, _meta("neu", "s1")))
    index = w.close()
    got = read_split(tmp_path / "train")
    assert set(got) == {"utt_one", "utt2", "utt3"}  # dots replaced
    one = got["utt_one"]
    assert one["sr"] == 16000 and one["subtype"] == "PCM_16"
    assert np.max(np.abs(one["audio"] - mono)) <= 1 / 32768 + 1e-7  # 16-bit precision
    assert one["meta"] == {"label": "angry", "corpus_label": "ANG", "corpus": "toy", "speaker": "s1",
                           "text": "hi", "fold": 3, "duration": 1.0}
    two = got["utt2"]
    assert two["audio"].ndim == 1 and len(two["audio"]) == 16000  # 1 s at 8 kHz -> 16000 samples, mono
    assert np.allclose(two["audio"][500:-500], 0.3, atol=2e-3)  # (0.4 + 0.2) / 2
    assert two["meta"]["label"] == "happy" and two["meta"]["duration"] == 1.0
    assert index["num_samples"] == 3 and index["label_counts"] == {"angry": 1, "happy": 1, "neutral": 1}
    assert index["speaker_counts"] == {"s1": 2, "s2": 1}
    assert index["shards"] == ["shard-000000.tar", "shard-000001.tar"]  # max_count=2
    assert index["corpora"] == ["toy"] and index["sample_rate"] == 16000
    # per-shard label counts, checked against the oracle reader's view of each shard
    assert index["shard_label_counts"] == {"shard-000000.tar": {"angry": 1, "happy": 1},
                                           "shard-000001.tar": {"neutral": 1}}
    for name, counts in index["shard_label_counts"].items():
        assert count_shard_labels(tmp_path / "train" / name) == counts
    assert index["total_duration"] == pytest.approx(2.25)
    on_disk = read_index(tmp_path / "train")
    assert on_disk == {k: v for k, v in index.items() if k != "skipped_files"}


def test_overlong_crop_and_skip_are_counted(tmp_path):
    long = np.zeros(16000 * 3, dtype=np.float32)
    with SplitWriter(tmp_path, "crop", max_duration=1.5) as w:
        assert w.write(AudioSample("a", long, 16000, _meta()))
    index = w.close()
    assert index["cropped"] == 1 and index["total_duration"] == pytest.approx(1.5)
    assert len(read_split(tmp_path / "crop")["a"]["audio"]) == 24000
    with SplitWriter(tmp_path, "skip", max_duration=1.5, overlong="skip") as w:
        assert not w.write(AudioSample("a", long, 16000, _meta()))
        assert w.write(AudioSample("b", long[:16000], 16000, _meta()))
        w.skip("unreadable", "/data/c.wav")
    index = w.close()
    assert index["num_samples"] == 1 and index["skipped"] == 2
    assert {"path": "/data/c.wav", "reason": "unreadable"} in index["skipped_files"]


def test_writer_refuses_overwrite_and_bad_samples(tmp_path):
    with SplitWriter(tmp_path, "train") as w:
        w.write(AudioSample("a", np.zeros(160, dtype=np.float32), 16000, _meta()))
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.write(AudioSample("a", np.zeros(160, dtype=np.float32), 16000, _meta()))
        with pytest.raises(ValueError, match="'b'.*speaker"):
            w.write(AudioSample("b", np.zeros(160, dtype=np.float32), 16000, {"label": "sad", "corpus": "x",
                                                                              "corpus_label": "s"}))
        with pytest.raises(ValueError, match="'c'.*'grumpy'"):
            w.write(AudioSample("c", np.zeros(160, dtype=np.float32), 16000, _meta("grumpy")))
    with pytest.raises(FileExistsError, match=str(tmp_path / "train")):
        SplitWriter(tmp_path, "train")
    with SplitWriter(tmp_path, "train", overwrite=True) as w:
        pass
    assert read_index(tmp_path / "train")["num_samples"] == 0
    assert not list((tmp_path / "train").glob("*.tar"))


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text('{"split": "x"}')
    with pytest.raises(ValueError, match="num_samples"):
        read_index(tmp_path)


def test_writer_interrupted_by_an_exception_writes_no_index(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        with SplitWriter(tmp_path, "train", max_count=1) as w:
            for i in range(3):
                w.write(AudioSample(f"a{i}", np.zeros(160, dtype=np.float32), 16000, _meta()))
            raise RuntimeError("disk on fire")
    folder = tmp_path / "train"
    assert len(list(folder.glob("shard-*.tar"))) == 3 and not (folder / "index.json").exists()
    assert is_partial_split(folder)
    assert len(read_split_tars(folder)) == 3  # the shards were closed: readable tars
    with pytest.raises(FileExistsError, match=r"partial conversion \(3 shard\(s\), no index.json\).*overwrite"):
        SplitWriter(tmp_path, "train")
    with SplitWriter(tmp_path, "train", overwrite=True) as w:
        w.write(AudioSample("b", np.zeros(160, dtype=np.float32), 16000, _meta()))
    assert read_index(folder)["num_samples"] == 1 and not is_partial_split(folder)
    assert sorted(p.name for p in folder.glob("shard-*.tar")) == ["shard-000000.tar"]


def read_split_tars(folder) -> list[str]:
    """Keys of every shard in ``folder`` (no index needed), read with tarfile."""
    import tarfile

    keys = []
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def test_count_shard_labels_reads_like_the_stream(tmp_path):
    """Records without audio, with bad JSON or an unknown label are not counted; aliases are mapped."""
    import io
    import json
    import tarfile

    members = [("a.flac", b"x"), ("a.json", json.dumps({"label": "ang"}).encode()),
               ("b.json", json.dumps({"label": "sad"}).encode()),  # no audio member
               ("c.flac", b"x"), ("c.json", b"{broken"),
               ("d.flac", b"x"), ("d.json", json.dumps({"label": "grumpy"}).encode()),
               ("e.FLAC", b"x"), ("e.json", json.dumps({"label": "sad", "text": "hi"}).encode()),
               ("f.flac", b"x"), ("f.json", json.dumps({"label": "angry"}).encode())]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_shard_labels(path) == {"angry": 2, "sad": 1}
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(OSError, match="bad.tar"):
        count_shard_labels(tmp_path / "bad.tar")
