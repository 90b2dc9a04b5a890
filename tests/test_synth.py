"""The generated prosody-coded corpus: balance, speaker disjointness, determinism, truthful metadata, and
separability by simple acoustic features computed from the decoded audio (not from the metadata)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from shard_reader import read_split
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emorl_pl.datamodules.synth import SynthDataModule, write_synth_corpus


def _read(split_dir) -> list[tuple[np.ndarray, dict]]:
    return [(entry["audio"], entry["meta"]) for _, entry in sorted(read_split(split_dir).items())]


def features(x: np.ndarray, sr: int = 16000) -> list[float]:
    """(log2 median f0 by autocorrelation, mean level dB, zero-crossing rate, onsets/s) over active frames.

    Active frames: 30 ms frames within 15 dB of the loudest; onsets: inactive -> active transitions.
    """
    frame, hop = int(0.03 * sr), int(0.01 * sr)
    n = 1 + (len(x) - frame) // hop
    fr = x[np.arange(frame)[None, :] + hop * np.arange(n)[:, None]]
    level = 10 * np.log10(np.mean(fr**2, axis=1) + 1e-12)
    act = level > level.max() - 15
    w = fr[act] * np.hanning(frame)
    ac = np.fft.irfft(np.abs(np.fft.rfft(w, 2 * frame)) ** 2)[:, :frame]
    lo, hi = sr // 450, sr // 70
    f0 = sr / (lo + np.argmax(ac[:, lo:hi], axis=1))
    zcr = np.mean(np.abs(np.diff(np.sign(fr[act]), axis=1)) > 0)
    onsets = np.sum(act[1:] & ~act[:-1]) + act[0]
    return [float(np.log2(np.median(f0))), float(np.mean(level[act])), float(zcr), onsets / (len(x) / sr)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    indexes = write_synth_corpus(root, num_speakers=12, utterances_per_speaker_per_label=10, seed=0)
    return root, indexes


def test_balance_and_speaker_disjointness(corpus):
    root, indexes = corpus
    assert {s: ix["num_samples"] for s, ix in indexes.items()} == {"train": 320, "valid": 80, "test": 80}
    speakers = {}
    for split, ix in indexes.items():
        assert ix["label_counts"] == {lab: ix["num_samples"] // 4 for lab in ("angry", "happy", "neutral", "sad")}
        speakers[split] = set(ix["speaker_counts"])
        assert all(n == 40 for n in ix["speaker_counts"].values())  # 10 per label per speaker
        assert ix["corpora"] == ["synth"] and ix["sample_rate"] == 16000
    assert len(speakers["train"]) == 8 and len(speakers["valid"]) == len(speakers["test"]) == 2
    assert not (speakers["train"] & speakers["valid"] or speakers["train"] & speakers["test"]
                or speakers["valid"] & speakers["test"])
    samples = _read(root / "test")
    durations = [len(a) / 16000 for a, _ in samples]
    assert 0.8 - 1e-3 <= min(durations) and max(durations) <= 1.8 + 1e-3
    assert all(abs(m["duration"] - len(a) / 16000) < 1e-3 for a, m in samples)
    assert max(np.max(np.abs(a)) for a, _ in samples) < 1.0  # no hard clipping


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(num_speakers=3, utterances_per_speaker_per_label=2, labels=["angry", "sad"])
    write_synth_corpus(tmp_path / "a", seed=3, **kw)
    write_synth_corpus(tmp_path / "b", seed=3, **kw)
    write_synth_corpus(tmp_path / "c", seed=4, **kw)
    a, b, c = (_read(tmp_path / x / "train") for x in "abc")
    assert [m for _, m in a] == [m for _, m in b]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert [m["prosody"] for _, m in a] != [m["prosody"] for _, m in c]  # another seed, another corpus
    with pytest.raises(FileExistsError):
        write_synth_corpus(tmp_path / "a", seed=3, **kw)
    with pytest.raises(ValueError, match="contempt"):
        write_synth_corpus(tmp_path / "d", labels=["angry", "contempt"], num_speakers=3)


def test_prosody_metadata_is_truthful(corpus):
    root, _ = corpus
    samples = _read(root / "train")
    feats = np.array([features(a) for a, _ in samples])
    meta_f0 = np.log2([m["prosody"]["f0_mean_hz"] for _, m in samples])
    # f0 estimated from the audio (crude autocorrelation: some octave errors) tracks the metadata
    assert np.corrcoef(feats[:, 0], meta_f0)[0, 1] > 0.75
    meta_db = [m["prosody"]["loudness_db"] for _, m in samples]
    assert np.corrcoef(feats[:, 1], meta_db)[0, 1] > 0.9
    words = {lab: Counter() for lab in ("angry", "happy", "neutral", "sad")}
    for _, m in samples:
        p = m["prosody"]
        assert set(p["words"]) == {"pitch", "range", "rate", "loudness", "voice", "contour"}
        words[m["label"]].update(f"{k}={v}" for k, v in p["words"].items())
    n = len(samples) // 4
    assert words["angry"]["loudness=loud"] > 0.7 * n and words["sad"]["loudness=soft"] > 0.7 * n
    assert words["sad"]["rate=slow"] > 0.5 * n and words["sad"]["voice=breathy"] > 0.5 * n
    assert words["happy"]["contour=rising"] == n and words["happy"]["range=wide"] > 0.5 * n
    assert words["neutral"]["pitch=mid"] > 0.5 * n


def test_simple_features_separate_classes_on_held_out_speakers(corpus):
    root, _ = corpus
    train = _read(root / "train")
    held_out = _read(root / "valid") + _read(root / "test")
    x_tr = np.array([features(a) for a, _ in train])
    y_tr = [m["label"] for _, m in train]
    x_te = np.array([features(a) for a, _ in held_out])
    y_te = [m["label"] for _, m in held_out]

    def accuracy(cols):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_tr[:, cols], y_tr)
        return clf.score(x_te[:, cols], y_te)

    all_features, energy_only = accuracy([0, 1, 2, 3]), accuracy([1])
    print(f"held-out accuracy: all features {all_features:.3f}, energy only {energy_only:.3f} (chance 0.25)")
    assert all_features > 0.6
    assert energy_only < 0.9  # not trivially separable by one feature
    assert all_features > energy_only


def test_synth_datamodule_generates_once(tmp_path):
    dm = SynthDataModule(root=str(tmp_path / "s"), num_speakers=3, utterances_per_speaker_per_label=2, batch_size=4)
    dm.prepare_data()
    index = tmp_path / "s" / "valid" / "index.json"
    stamp = index.stat().st_mtime_ns
    dm.prepare_data()  # already there: not regenerated
    assert index.stat().st_mtime_ns == stamp
    batches = list(dm.val_dataloader())
    assert sum(len(b["keys"]) for b in batches) == 8
    assert all("prosody" in m for b in batches for m in b["meta"])
    assert len(list(dm.train_dataloader())) == 2  # 1 train speaker x 4 labels x 2 = 8 samples, batch 4
