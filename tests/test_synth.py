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


# ---------------------------------------------------------------- RAVDESS-8 with ambiguous neighbours

RAVDESS8 = ("neutral", "calm", "happy", "sad", "angry", "fear", "disgust", "surprise")
PLUTCHIK_NEIGHBOURS = {("sad", "disgust"), ("sad", "surprise"), ("angry", "disgust"), ("fear", "surprise")}


class _Recorder:
    """Stands in for SplitWriter: keeps what the generator hands over, before any encoding (so the digest
    is of the generator's own float32 output, whatever the shard format does)."""

    samples: list = []

    def __init__(self, out_dir, split, **kwargs) -> None:
        self.split = split

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def write(self, sample) -> None:
        _Recorder.samples.append((self.split, sample))

    def close(self) -> dict:
        return {}


def generated_digest(monkeypatch, tmp_path, **kwargs) -> str:
    """sha256 over (split, key, rate, float32 audio, JSON meta) of every utterance, in writing order."""
    import hashlib
    import json

    import emorl_pl.datamodules.synth as synth

    _Recorder.samples = []
    monkeypatch.setattr(synth, "SplitWriter", _Recorder)
    write_synth_corpus(tmp_path, **kwargs)
    h = hashlib.sha256()
    for split, s in _Recorder.samples:
        h.update(f"{split}/{s.key}/{s.sample_rate}".encode())
        h.update(np.ascontiguousarray(s.audio, dtype=np.float32).tobytes())
        h.update(json.dumps(s.meta, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("kwargs, digest", [
    (dict(labels="ravdess8", seed=0), "f8d780303a486bed72b45f371cd75c080cc820fe6d011730401a5452b3889df2"),
    (dict(seed=5), "0dc29f2e682306bdd9ef4b7ed5741cebd9884647f28e035ca34273e71364d712"),
], ids=["ravdess8", "iemocap4"])
def test_default_corpus_is_byte_identical_to_before_ambiguity(monkeypatch, tmp_path, kwargs, digest):
    # Digests recorded with the generator as it was before the ambiguity option existed (commit e269c26), on
    # this venv's numpy: a numpy whose RNG streams or FFT rounding differ would change them too (then record
    # them again from e269c26's synth.py, not from this one).
    small = dict(num_speakers=3, utterances_per_speaker_per_label=2)
    assert generated_digest(monkeypatch, tmp_path, **small, **kwargs) == digest
    assert generated_digest(monkeypatch, tmp_path, **small, **kwargs, ambiguity=0.0) == digest


def test_neighbour_pairs_come_from_the_similarity_and_gamma():
    from emorl_pl.datamodules.synth import neighbour_pairs
    from emorl_pl.emotions import plutchik_similarity

    pairs = neighbour_pairs(RAVDESS8)
    assert {tuple(sorted(p)) for p in pairs} == {tuple(sorted(p)) for p in PLUTCHIK_NEIGHBOURS}
    assert all(plutchik_similarity(a, b) == pytest.approx(0.854, abs=1e-3) for a, b in pairs)
    assert neighbour_pairs(RAVDESS8, gamma=0.9) == []
    assert neighbour_pairs("iemocap4") == []  # S <= 0.5 for every IEMOCAP-4 pair: nothing to share
    assert neighbour_pairs(["angry", "sad"], similarity={"angry": {"sad": 0.8}}) == [("angry", "sad")]


def prosody_features(x: np.ndarray, sr: int = 16000) -> list[float]:
    """Measured from the waveform alone (numpy): median F0 (octaves, autocorrelation), F0 spread (semitones,
    10th-90th percentile over voiced frames), level of active frames (dB), onsets per second, energy above
    2 kHz relative to 100 Hz-1 kHz (dB: spectral tilt and breath noise), zero-crossing rate."""
    frame, hop = int(0.03 * sr), int(0.01 * sr)
    n = 1 + (len(x) - frame) // hop
    fr = x[np.arange(frame)[None, :] + hop * np.arange(n)[:, None]]
    level = 10 * np.log10(np.mean(fr**2, axis=1) + 1e-12)
    act = level > level.max() - 15
    spec = np.abs(np.fft.rfft(fr[act] * np.hanning(frame), 2 * frame)) ** 2
    ac = np.fft.irfft(spec)[:, :frame]
    lo, hi = sr // 450, sr // 70
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    voiced = ac[np.arange(len(ac)), lag] > 0.5 * ac[:, 0]
    semitones = 12 * np.log2(sr / (lag[voiced] if voiced.sum() > 2 else lag))
    freqs = np.fft.rfftfreq(2 * frame, 1 / sr)
    high = spec[:, freqs >= 2000].sum() / (spec[:, (freqs >= 100) & (freqs < 1000)].sum() + 1e-12)
    zcr = np.mean(np.abs(np.diff(np.sign(fr[act]), axis=1)) > 0)
    onsets = np.sum(act[1:] & ~act[:-1]) + act[0]
    return [float(np.median(semitones) / 12), float(np.percentile(semitones, 90) - np.percentile(semitones, 10)),
            float(np.mean(level[act])), onsets / (len(x) / sr), float(10 * np.log10(high + 1e-12)), float(zcr)]


def _measured(root) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Features of every utterance of every split, minus its speaker's mean (emotion = offsets from a
    speaker's baseline); labels; metas."""
    samples = [s for split in ("train", "valid", "test") for s in _read(root / split)]
    x = np.array([prosody_features(a) for a, _ in samples])
    speakers = np.array([m["speaker"] for _, m in samples])
    for spk in set(speakers):
        x[speakers == spk] -= x[speakers == spk].mean(0)
    return x, np.array([m["label"] for _, m in samples]), [m for _, m in samples]


@pytest.fixture(scope="module")
def ravdess8_corpora(tmp_path_factory):
    """The same 8-class corpus (6 speakers, 6 utterances per speaker and label) without and with ambiguity 1."""
    root = tmp_path_factory.mktemp("ravdess8")
    kw = dict(labels="ravdess8", num_speakers=6, utterances_per_speaker_per_label=6, seed=0)
    plain = write_synth_corpus(root / "plain", **kw)
    ambiguous = write_synth_corpus(root / "ambiguous", ambiguity=1.0, **kw)
    return root, plain, ambiguous


def test_ravdess8_counts_per_split_label_and_speaker(ravdess8_corpora):
    _, plain, ambiguous = ravdess8_corpora
    for indexes in (plain, ambiguous):
        assert {s: ix["num_samples"] for s, ix in indexes.items()} == {"train": 192, "valid": 48, "test": 48}
        speakers = {}
        for split, ix in indexes.items():
            assert ix["label_counts"] == {lab: ix["num_samples"] // 8 for lab in RAVDESS8}
            assert all(n == 48 for n in ix["speaker_counts"].values())  # 6 per label x 8 labels
            speakers[split] = set(ix["speaker_counts"])
        assert [len(speakers[s]) for s in ("train", "valid", "test")] == [4, 1, 1]
        assert not (speakers["train"] & speakers["valid"] or speakers["train"] & speakers["test"]
                    or speakers["valid"] & speakers["test"])
    counts = ("num_samples", "label_counts", "speaker_counts")
    # ambiguity changes sounds, never labels, speakers or counts
    assert all(plain[s][k] == ambiguous[s][k] for s in plain for k in counts)


def test_ambiguity_respeaks_only_labels_with_neighbours(ravdess8_corpora):
    root, _, _ = ravdess8_corpora
    plain = dict(sorted(read_split(root / "plain" / "test").items()))
    ambiguous = dict(sorted(read_split(root / "ambiguous" / "test").items()))
    respoken = Counter()
    for key, entry in ambiguous.items():
        label, meta = entry["meta"]["label"], entry["meta"]
        same = np.array_equal(entry["audio"], plain[key]["audio"])
        if "spoken_as" in meta:
            assert not same and {(label, meta["spoken_as"]), (meta["spoken_as"], label)} & PLUTCHIK_NEIGHBOURS
            respoken[label] += 1
        else:  # everything else, including every neutral, calm and happy utterance, is untouched
            assert same and meta == plain[key]["meta"]
    assert set(respoken) <= {"sad", "angry", "fear", "disgust", "surprise"} and sum(respoken.values()) > 0


def test_ambiguity_pulls_neighbours_together_and_leaves_other_pairs_apart(ravdess8_corpora):
    """Measured on the audio with numpy (prosody_features), not read from the metadata.

    Neighbours: the distance between the two labels' mean feature vectors shrinks, and the share of their
    utterances that sound like the other label (nearest label centroid of the unambiguous corpus) rises.
    Other pairs: that share does not rise on average. (Their mean distance is no criterion: a label with
    neighbours becomes a mixture of its own and its neighbours' sounds, whose mean can land near a third
    label without any utterance sounding like it; and by the triangle inequality angry/sad, 7.1 apart
    against 4.4 + 3.1 via disgust, must come closer when both of disgust's pairs do.)
    """
    root, _, _ = ravdess8_corpora
    x0, y0, _ = _measured(root / "plain")
    x1, y1, _ = _measured(root / "ambiguous")
    scale = np.mean([x0[y0 == lab].std(0) for lab in RAVDESS8], axis=0)
    centroids = np.array([x0[y0 == lab].mean(0) / scale for lab in RAVDESS8])

    def mean_distance(x, y, a, b):
        return float(np.linalg.norm((x[y == a].mean(0) - x[y == b].mean(0)) / scale))

    def sounds_alike(x, y, a, b):
        """Share of a's utterances nearest to b's centroid plus the share of b's nearest to a's."""
        nearest = np.array(RAVDESS8)[np.argmin(((x[:, None] / scale - centroids[None]) ** 2).sum(-1), 1)]
        return float(np.mean(nearest[y == a] == b) + np.mean(nearest[y == b] == a))

    rises, others = {}, []
    for i, a in enumerate(RAVDESS8):
        for b in RAVDESS8[i + 1:]:
            rise = sounds_alike(x1, y1, a, b) - sounds_alike(x0, y0, a, b)
            if (a, b) in PLUTCHIK_NEIGHBOURS or (b, a) in PLUTCHIK_NEIGHBOURS:
                ratio = mean_distance(x1, y1, a, b) / mean_distance(x0, y0, a, b)
                print(f"{a}/{b}: mean distance x{ratio:.2f}, sounds-alike {rise:+.2f}")
                assert ratio < 0.9, (a, b, ratio)
                rises[a, b] = rise
            else:
                others.append(rise)
    print(f"other pairs: sounds-alike {np.mean(others):+.3f} on average (max {max(others):+.2f})")
    assert min(rises.values()) > 0.1, rises
    assert abs(np.mean(others)) < 0.05


def test_ambiguity_is_checked(tmp_path):
    with pytest.raises(ValueError, match="no effect"):  # IEMOCAP-4 has no pair above gamma
        write_synth_corpus(tmp_path / "a", num_speakers=3, utterances_per_speaker_per_label=1, ambiguity=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_synth_corpus(tmp_path / "b", labels="ravdess8", num_speakers=3, ambiguity=1.5)
    with pytest.raises(ValueError, match="no effect"):  # at construction, before any model loads
        SynthDataModule(root=str(tmp_path / "c"), ambiguity=0.5)


def test_synth_datamodule_refuses_a_corpus_made_with_other_options(tmp_path):
    kw = dict(root=str(tmp_path / "s"), label_set="ravdess8", num_speakers=3, utterances_per_speaker_per_label=1)
    SynthDataModule(**kw, ambiguity=0.5).prepare_data()
    SynthDataModule(**kw, ambiguity=0.5).prepare_data()  # the same options: used as it is
    with pytest.raises(ValueError, match=r"ambiguity: corpus 0.5, config 0.0"):
        SynthDataModule(**kw).prepare_data()
