"""A generated emotional-speech corpus: speech-like babble whose emotion is carried by prosody only.

Each utterance is a sequence of syllables (optional noise-burst consonant + voiced vowel nucleus). The
voiced source is a sawtooth glottal pulse train following an f0 contour in semitones,

    f0(t) = f0_target * 2 ** (st(t) / 12),   st(t) = trend(t) + accent_i(t),

with per-period jitter (relative period noise) and shimmer (relative amplitude noise), plus breath noise.
Each syllable is filtered in the frequency domain by a spectral tilt of ``tilt`` dB/octave above 500 Hz
(the sawtooth alone gives -6 dB/oct) and three vowel formants (resonance bumps, scaled by
the speaker's vocal-tract factor, see _formant_gain), then shaped by a raised-cosine envelope. The utterance is scaled to an
RMS of ``ref * 10 ** (loudness_db / 20)`` and soft-limited with tanh.

Emotion = offsets from the speaker's baseline, as acted speech shows them (angry: high, loud, fast, tense,
falling; happy: high, wide range, rising; sad: low, narrow, slow, soft, breathy, falling; neutral: mid,
flat). Speakers differ in base f0 (sex), speaking rate, loudness, vocal tract and expressiveness (a scale
on the emotion offsets), and every utterance adds noise to each parameter, so classes overlap.

Each sample's JSON holds ``prosody``: the realised values (f0_mean_hz, f0_range_semitones, contour,
rate_syll_per_s, loudness_db, loudness_rel_db, jitter, shimmer, breathiness, tilt) and coarse words
relative to the speaker's baseline (pitch/range/rate/loudness/voice/contour), for truthful reasoning text.

Ambiguity (``ambiguity`` in [0, 1], default 0: the corpus is byte-identical to one made without it).
Two labels of the label set are *neighbours* when their similarity exceeds ``gamma`` (``similarity`` and
``gamma`` as ESWR's, default Plutchik's wheel and 0.7: exactly the pairs ESWR gives partial credit to).
On RAVDESS-8 that is angry/disgust, fear/surprise, sad/disgust and sad/surprise (S = 0.854; every other
pair has S <= 0.5): a chain angry - disgust - sad - surprise - fear. A share ``ambiguity / 2`` of the
utterances of a label with neighbours is spoken with the profile of one of them (drawn uniformly) and
keeps its label, as annotators of real corpora split between neighbouring emotions. So the same sound is
labelled either way: at 0.6 an angry utterance sounds disgusted 30% of the time, a sad one like disgust
or surprise 15% of the time each, and an isolated pair (two labels with one neighbour each) could not be
told apart at all at 1. Each label's distribution of prosody moves toward its neighbours' (their mean
profiles get closer), while the other labels' utterances are unchanged: neutral, calm and happy on
RAVDESS-8 keep their audio exactly (the share's draws come from a random stream of their own), and no
utterance is spoken halfway between two profiles, because that halfway point can be a third label's
place (sad + surprise averaged sounds calm), which would blur pairs that must stay apart. A pair that
shares a neighbour (angry and sad share disgust) overlaps only through utterances that sound like that
neighbour, which a classifier labels as the neighbour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emorl_pl.datamodules.shards import INDEX_NAME, AudioSample, SplitWriter
from emorl_pl.datamodules.webdataset import ShardDataModule
from emorl_pl.emotions import SimilarityMatrix, SimilaritySpec, get_label_set

CORPUS = "synth"
SPLITS = ("train", "valid", "test")
REF_RMS = 0.05  # speaker baseline loudness, about -26 dBFS
DURATION = (0.8, 1.8)  # default utterance length range, seconds
OPTIONS_NAME = "synth_options.json"  # the generator's arguments, next to the splits
AMBIGUITY_STREAM = 104729  # last entry of the ambiguity draws' seed: a stream apart from the audio's

# Emotion offsets from the speaker baseline: pitch (semitones), f0 range (semitones), contour, rate factor,
# loudness (dB), jitter, shimmer, breath noise level, spectral tilt (dB/octave, total).
PROFILES: dict[str, dict[str, Any]] = {
    "neutral": dict(pitch=0.0, range=3.0, contour="flat", rate=1.00, loud=0.0, jitter=0.005, shimmer=0.03,
                    breath=0.05, tilt=-11.0),
    "happy": dict(pitch=5.0, range=9.0, contour="rising", rate=1.15, loud=4.0, jitter=0.008, shimmer=0.05,
                  breath=0.05, tilt=-7.5),
    "angry": dict(pitch=3.0, range=6.0, contour="falling", rate=1.25, loud=9.0, jitter=0.015, shimmer=0.08,
                  breath=0.02, tilt=-4.0),
    "sad": dict(pitch=-2.0, range=1.5, contour="falling", rate=0.70, loud=-6.0, jitter=0.010, shimmer=0.06,
                breath=0.30, tilt=-15.0),
    "fear": dict(pitch=6.0, range=5.0, contour="rising", rate=1.30, loud=1.0, jitter=0.025, shimmer=0.10,
                 breath=0.20, tilt=-9.0),
    "surprise": dict(pitch=5.0, range=11.0, contour="rising", rate=1.00, loud=5.0, jitter=0.008, shimmer=0.05,
                     breath=0.08, tilt=-8.0),
    "disgust": dict(pitch=-2.5, range=4.0, contour="falling", rate=0.80, loud=-1.0, jitter=0.012,
                    shimmer=0.07, breath=0.10, tilt=-9.0),
    "calm": dict(pitch=-1.0, range=2.0, contour="flat", rate=0.80, loud=-4.0, jitter=0.004, shimmer=0.03,
                 breath=0.10, tilt=-13.0),
}
NEUTRAL_TILT = PROFILES["neutral"]["tilt"]

# (F1, F2, F3) in Hz of five vowels for an adult male vocal tract (Peterson & Barney style averages).
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                   [570, 840, 2410]], dtype=np.float64)
FORMANT_BW = np.array([90.0, 110.0, 170.0])


@dataclass(frozen=True)
class Speaker:
    name: str
    sex: str
    f0_hz: float  # baseline mean f0
    rate: float  # baseline syllables per second
    loud_db: float  # baseline loudness offset from REF_RMS
    vtl: float  # formant scale (shorter vocal tract -> higher formants)
    expressiveness: float  # scale on the emotion offsets


def make_speakers(num_speakers: int, seed: int) -> list[Speaker]:
    """Speakers alternate female/male; parameters drawn from seed (speaker i's draw depends only on i)."""
    speakers = []
    for i in range(num_speakers):
        rng = np.random.default_rng([seed, i, 7919])
        female = i % 2 == 0
        speakers.append(Speaker(
            name=f"synth_{'f' if female else 'm'}{i:02d}", sex="female" if female else "male",
            f0_hz=float(rng.uniform(180, 235) if female else rng.uniform(95, 135)),
            rate=float(rng.uniform(3.8, 5.2)), loud_db=float(rng.uniform(-2, 2)),
            vtl=float(rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.05)),
            expressiveness=float(rng.uniform(0.8, 1.2)),
        ))
    return speakers


def _formant_gain(freqs: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Parallel formant bumps on a floor: 0.1 + sum_i w_i / (1 + ((f - F_i) / (B_i / 2))^2), w = (1, .7, .5).

    Parallel (not cascade) so that the overall slope stays the source's tilt: a cascade's -12 dB/oct per
    resonator would swamp the voice-quality differences the emotions carry.
    """
    gain = np.full_like(freqs, 0.1)
    for formant, bw, w in zip(formants, FORMANT_BW, (1.0, 0.7, 0.5)):
        gain += w / (1.0 + ((freqs - formant) / (bw / 2)) ** 2)
    return gain


def _filter_segment(x: np.ndarray, sr: int, formants: np.ndarray, tilt_db_oct: float) -> np.ndarray:
    """Apply the extra tilt (beyond the sawtooth's -6 dB/oct) and formants in the frequency domain."""
    n = 1 << int(math.ceil(math.log2(2 * len(x))))  # zero-padded: no circular wrap of the resonances
    spec = np.fft.rfft(x, n)
    f = np.fft.rfftfreq(n, 1.0 / sr)
    gain_db = (tilt_db_oct + 6.0) * np.log2(np.maximum(f, 500.0) / 500.0)
    h = 10.0 ** (gain_db / 20.0) * _formant_gain(f, formants)
    return np.fft.irfft(spec * h, n)[: len(x)]


def _raised_cosine_env(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack > 0:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release > 0:
        env[n - release:] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, release + 1) / release)
    return env


def _highpass_noise(rng: np.random.Generator, n: int, sr: int, cutoff: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[np.fft.rfftfreq(n, 1.0 / sr) < cutoff] = 0.0
    return np.fft.irfft(spec, n)


def _words(pitch_st: float, range_st: float, rate_ratio: float, loud_rel: float, tilt: float, breath: float,
           jitter: float, contour: str) -> dict[str, str]:
    """Coarse descriptions relative to the speaker's baseline (thresholds in the units of each value)."""
    if tilt >= NEUTRAL_TILT + 3.0:
        voice = "tense"
    elif breath >= 0.18:
        voice = "breathy"
    elif jitter >= 0.02:
        voice = "trembling"
    else:
        voice = "modal"
    return {
        "pitch": "high" if pitch_st >= 2.0 else "low" if pitch_st <= -1.0 else "mid",
        "range": "wide" if range_st >= 6.0 else "narrow" if range_st <= 2.5 else "moderate",
        "rate": "fast" if rate_ratio >= 1.1 else "slow" if rate_ratio <= 0.85 else "moderate",
        "loudness": "loud" if loud_rel >= 3.0 else "soft" if loud_rel <= -3.0 else "moderate",
        "voice": voice,
        "contour": contour,
    }


def synthesize_utterance(speaker: Speaker, label: str, rng: np.random.Generator, *, duration: float,
                         sample_rate: int = 16000) -> tuple[np.ndarray, dict[str, Any]]:
    """One utterance of ``duration`` seconds: (float32 audio, prosody dict). See the module docstring."""
    prof = PROFILES[label]
    sr, e = sample_rate, speaker.expressiveness
    # emotion offsets scaled by the speaker's expressiveness, plus per-utterance variation
    pitch_st = e * prof["pitch"] + rng.normal(0, 1.5)
    range_st = max(0.5, prof["range"] * (0.6 + 0.4 * e) * float(np.exp(rng.normal(0, 0.25))))
    rate = speaker.rate * (1 + e * (prof["rate"] - 1)) * float(np.exp(rng.normal(0, 0.1)))
    loud_rel = speaker.loud_db + e * prof["loud"] + rng.normal(0, 2.0)
    jitter = prof["jitter"] * float(np.exp(rng.normal(0, 0.25)))
    shimmer = prof["shimmer"] * float(np.exp(rng.normal(0, 0.25)))
    breath = prof["breath"] * float(np.exp(rng.normal(0, 0.3)))
    tilt = NEUTRAL_TILT + e * (prof["tilt"] - NEUTRAL_TILT) + rng.normal(0, 1.0)
    contour = prof["contour"]
    f0_target = speaker.f0_hz * 2 ** (pitch_st / 12)

    n_total = int(round(duration * sr))
    lead, trail = (int(rng.uniform(0.04, 0.1) * sr) for _ in range(2))
    speech = max(n_total - lead - trail, int(0.2 * sr))
    n_syll = max(1, int(round(rate * speech / sr)))
    slots = rng.uniform(0.8, 1.2, n_syll)
    bounds = lead + np.concatenate([[0], np.cumsum(slots / slots.sum() * speech)]).astype(int)

    out = np.zeros(n_total, dtype=np.float64)
    f0_voiced: list[np.ndarray] = []
    accents = rng.normal(0, range_st / 5, n_syll)
    for i in range(n_syll):
        start, stop = int(bounds[i]), int(min(bounds[i + 1], n_total))
        slot_len = stop - start
        if slot_len < int(0.04 * sr):
            continue
        cons = int(0.2 * slot_len) if rng.random() < 0.7 else 0
        gap = int(0.2 * slot_len)
        v0, v1 = start + cons, stop - gap
        if cons:  # a fricative/plosive-like noise burst before the vowel
            burst = _highpass_noise(rng, cons, sr, 2500.0) * _raised_cosine_env(cons, cons // 3, cons // 3)
            out[start:v0] += 0.1 * burst
        n = v1 - v0
        t = (np.arange(v0, v1) - lead) / speech  # position in the utterance, 0..1
        if contour == "rising":
            trend = range_st * (t - 0.5)
        elif contour == "falling":
            trend = -range_st * (t - 0.5)
        else:
            trend = 0.25 * range_st * np.sin(2 * np.pi * t) - 0.5  # flat with slight declination
        hump = np.sin(np.pi * np.linspace(0, 1, n))
        f0 = f0_target * 2 ** ((trend + accents[i] * hump) / 12)
        # jitter: each glottal period's length gets relative noise ~ N(0, jitter)
        periods = np.floor(np.cumsum(f0 / sr)).astype(int)
        noise = rng.standard_normal(periods[-1] + 2)
        f0 = f0 * (1 + jitter * noise[periods])
        phase = np.cumsum(f0 / sr)
        periods = np.floor(phase).astype(int)
        amp = 1 + shimmer * rng.standard_normal(periods[-1] + 2)
        source = ((phase % 1.0) - 0.5) * amp[periods]
        # breath: aspiration noise above 1 kHz, ``breath`` = its RMS relative to the pulse train's
        aspiration = _highpass_noise(rng, n, sr, 1000.0)
        source = source + breath * np.std(source) / (np.std(aspiration) + 1e-12) * aspiration
        vowel = VOWELS[rng.integers(len(VOWELS))] * speaker.vtl
        seg = _filter_segment(source, sr, vowel, tilt)
        seg = seg / (np.sqrt(np.mean(seg**2)) + 1e-9)
        out[v0:v1] += seg * _raised_cosine_env(n, int(0.03 * sr), int(0.05 * sr))
        f0_voiced.append(f0)

    target_rms = REF_RMS * 10 ** (loud_rel / 20)
    active = np.abs(out) > 0
    out *= target_rms / (np.sqrt(np.mean(out[active] ** 2)) + 1e-12)
    out += rng.standard_normal(n_total) * 10 ** (-60 / 20)  # room noise floor, -60 dBFS
    out = 0.98 * np.tanh(out / 0.98)  # soft limiter keeps loud (angry) speech from clipping
    f0_all = np.concatenate(f0_voiced) if f0_voiced else np.array([f0_target])
    f0_mean = float(np.mean(f0_all))
    p5, p95 = np.percentile(f0_all, [5, 95])
    realised_range = float(12 * np.log2(p95 / p5))
    realised_rate = n_syll / (speech / sr)
    rms_active = float(np.sqrt(np.mean(out[active] ** 2)))
    loud_abs = 20 * math.log10(rms_active + 1e-12)
    loud_rel_real = loud_abs - 20 * math.log10(REF_RMS * 10 ** (speaker.loud_db / 20))
    pitch_rel = 12 * math.log2(f0_mean / speaker.f0_hz)
    prosody = {
        "f0_mean_hz": round(f0_mean, 2),
        "f0_range_semitones": round(realised_range, 2),
        "contour": contour,
        "rate_syll_per_s": round(realised_rate, 3),
        "loudness_db": round(loud_abs, 2),
        "loudness_rel_db": round(loud_rel_real, 2),
        "jitter": round(jitter, 5),
        "shimmer": round(shimmer, 5),
        "breathiness": round(breath, 4),
        "tilt": round(tilt, 2),
        "speaker_f0_hz": round(speaker.f0_hz, 2),
        "speaker_rate": round(speaker.rate, 3),
        "words": _words(pitch_rel, realised_range, realised_rate / speaker.rate, loud_rel_real, tilt, breath,
                        jitter, contour),
    }
    return out.astype(np.float32), prosody


def neighbour_pairs(labels: Sequence[str], similarity: SimilaritySpec = "plutchik",
                    gamma: float = 0.7) -> list[tuple[str, str]]:
    """Label pairs (in label-set order) whose similarity exceeds ``gamma`` either way round.

    Strictly greater, as ESWR's partial credit; either way round because a user matrix may be asymmetric
    while acoustic closeness is not.
    """
    sim = SimilarityMatrix.build(similarity, labels)
    return [(a, b) for i, a in enumerate(sim.labels) for b in sim.labels[i + 1:]
            if max(sim(a, b), sim(b, a)) > gamma]


def neighbours_of(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """label -> its neighbours, in the order the pairs list them."""
    out: dict[str, tuple[str, ...]] = {}
    for a, b in pairs:
        out[a] = (*out.get(a, ()), b)
        out[b] = (*out.get(b, ()), a)
    return out


def spoken_as(label: str, neighbours: Sequence[str], ambiguity: float, rng: np.random.Generator) -> str:
    """The label whose profile an utterance of ``label`` is spoken with: with probability ``ambiguity / 2``
    a neighbour drawn uniformly, else ``label`` itself (always, without neighbours or ambiguity)."""
    if ambiguity <= 0 or not neighbours or rng.random() >= ambiguity / 2:
        return label
    return neighbours[int(rng.integers(len(neighbours)))]


def split_speakers(num_speakers: int) -> dict[str, list[int]]:
    """Disjoint speaker indices: valid and test get round(num_speakers / 6) each (>= 1), train the rest."""
    if num_speakers < 3:
        raise ValueError(f"num_speakers must be >= 3 (one per split), got {num_speakers}")
    n_eval = max(1, round(num_speakers / 6))
    n_train = num_speakers - 2 * n_eval
    return {"train": list(range(n_train)), "valid": list(range(n_train, n_train + n_eval)),
            "test": list(range(n_train + n_eval, num_speakers))}


def write_synth_corpus(
    out_dir: str | Path,
    *,
    labels: str | Sequence[str] = "iemocap4",
    num_speakers: int = 24,
    utterances_per_speaker_per_label: int = 30,
    duration: tuple[float, float] = DURATION,
    sample_rate: int = 16000,
    seed: int = 0,
    ambiguity: float = 0.0,
    similarity: SimilaritySpec = "plutchik",
    gamma: float = 0.7,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Write ``out_dir/{train,valid,test}`` shards (speakers disjoint, label-balanced); returns the indexes.

    Utterance (speaker i, label l, n) is drawn from a generator seeded with (seed, i, l, n), so the corpus
    is a pure function of the arguments. ``ambiguity`` > 0 speaks a share ``ambiguity / 2`` of each
    label's utterances with a neighbour's profile (similarity > ``gamma``; see the module docstring),
    drawn with the seed (seed, i, l, n, AMBIGUITY_STREAM). The arguments are saved in
    ``out_dir/synth_options.json`` (next to the splits, whose shards the option leaves unchanged at 0).
    """
    label_set = get_label_set(labels)
    unknown = [lab for lab in label_set if lab not in PROFILES]
    if unknown:
        raise ValueError(f"synth corpus has no prosody profile for {unknown}; available: {list(PROFILES)}")
    lo, hi = duration
    if not 0.3 <= lo <= hi:
        raise ValueError(f"duration must be (min, max) seconds with 0.3 <= min <= max, got {duration}")
    neighbours = ambiguity_neighbours(label_set, ambiguity, similarity, gamma)
    speakers = make_speakers(num_speakers, seed)
    indexes = {}
    for split, members in split_speakers(num_speakers).items():
        with SplitWriter(out_dir, split, sample_rate=sample_rate, max_count=500, overwrite=overwrite) as writer:
            for si in members:
                spk = speakers[si]
                for li, label in enumerate(label_set):
                    for n in range(utterances_per_speaker_per_label):
                        rng = np.random.default_rng([seed, si, li, n])
                        voice = spoken_as(label, neighbours.get(label, ()), ambiguity,
                                          np.random.default_rng([seed, si, li, n, AMBIGUITY_STREAM]))
                        audio, prosody = synthesize_utterance(
                            spk, voice, rng, duration=float(rng.uniform(lo, hi)), sample_rate=sample_rate)
                        meta = {"label": label, "corpus_label": label, "corpus": CORPUS, "speaker": spk.name,
                                "sex": spk.sex, "text": None, "prosody": prosody}
                        if voice != label:  # only in an ambiguous corpus: the default's JSON is unchanged
                            meta["spoken_as"] = voice
                        writer.write(AudioSample(f"{spk.name}_{label}_{n:04d}", audio, sample_rate, meta))
        indexes[split] = writer.close()
        indexes[split].pop("skipped_files", None)
    options = synth_options(label_set, num_speakers, utterances_per_speaker_per_label, duration, sample_rate,
                            seed, ambiguity, similarity, gamma)
    (Path(out_dir) / OPTIONS_NAME).write_text(json.dumps(options, indent=1) + "\n")
    return indexes


def ambiguity_neighbours(labels: Sequence[str], ambiguity: float, similarity: SimilaritySpec,
                         gamma: float) -> dict[str, tuple[str, ...]]:
    """label -> the neighbours some of its utterances are spoken like ({} without ambiguity). An ambiguity
    that would change nothing (no pair above gamma in this label set, e.g. IEMOCAP-4 on Plutchik's wheel)
    is an error, not a silent no-op."""
    if not 0.0 <= ambiguity <= 1.0:
        raise ValueError(f"ambiguity must be in [0, 1], got {ambiguity}")
    if ambiguity == 0:
        return {}
    pairs = neighbour_pairs(labels, similarity, gamma)
    if not pairs:
        raise ValueError(f"ambiguity {ambiguity} has no effect: no two labels of {list(labels)} have "
                         f"{similarity if isinstance(similarity, str) else 'the given'} similarity > gamma {gamma}")
    return neighbours_of(pairs)


def synth_options(labels: Sequence[str], num_speakers: int, per_label: int, duration: Sequence[float],
                  sample_rate: int, seed: int, ambiguity: float, similarity: SimilaritySpec,
                  gamma: float) -> dict[str, Any]:
    """The arguments that determine a corpus, as JSON values (what ``synth_options.json`` holds)."""
    return {"labels": list(labels), "num_speakers": num_speakers, "utterances_per_speaker_per_label": per_label,
            "duration": [float(d) for d in duration], "sample_rate": sample_rate, "seed": seed,
            "ambiguity": float(ambiguity), "similarity": similarity if isinstance(similarity, str) else "custom",
            "gamma": float(gamma)}


class SynthDataModule(ShardDataModule):
    """ShardDataModule over the generated corpus in ``root`` (generated by ``prepare_data`` when absent).

    ``train/valid/test`` default to ``root/train``, ``root/valid``, ``root/test``; the corpus is made with
    ``label_set`` as its labels, ``num_speakers``, ``utterances_per_speaker_per_label``, ``synth_seed`` and
    ``ambiguity`` (with ``similarity`` and ``gamma`` choosing the neighbour pairs it pulls together; see
    the module docstring). A corpus already in ``root`` is used as it is when its saved options match
    these, and refused (ValueError naming the differences) when they do not; one saved before the options
    were (no ``synth_options.json``) is used as it is.
    """

    def __init__(
        self,
        root: str = "data/synth",
        label_set: str | list[str] = "iemocap4",
        num_speakers: int = 24,
        utterances_per_speaker_per_label: int = 30,
        synth_seed: int = 0,
        ambiguity: float = 0.0,
        similarity: str = "plutchik",
        gamma: float = 0.7,
        sample_rate: int = 16000,
        max_duration: float | None = 10.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_length: int | None = None,
    ) -> None:
        root_path = Path(root)
        super().__init__(
            train=str(root_path / "train"), valid=str(root_path / "valid"), test=str(root_path / "test"),
            label_set=label_set, sample_rate=sample_rate, max_duration=max_duration, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
            epoch_length=epoch_length,
        )
        self.root = root_path
        self.synth_labels = label_set
        self.num_speakers, self.utterances_per_speaker_per_label = num_speakers, utterances_per_speaker_per_label
        self.synth_seed = synth_seed
        self.ambiguity, self.similarity, self.gamma = ambiguity, similarity, gamma
        # Fail at construction, not after the model has loaded, on an ambiguity that cannot apply.
        ambiguity_neighbours(get_label_set(label_set), ambiguity, similarity, gamma)

    def _options(self) -> dict[str, Any]:
        """The saved options this module must match: all but ``duration``, which it does not set (a corpus
        of short utterances written by ``write_synth_corpus`` is a valid corpus for it)."""
        options = synth_options(get_label_set(self.synth_labels), self.num_speakers,
                                self.utterances_per_speaker_per_label, DURATION, self.sample_rate,
                                self.synth_seed, self.ambiguity, self.similarity, self.gamma)
        options.pop("duration")
        return options

    def prepare_data(self) -> None:
        if all((self.root / s / INDEX_NAME).is_file() for s in SPLITS):
            check_corpus_options(self.root, self._options())
            return
        write_synth_corpus(self.root, labels=self.synth_labels, num_speakers=self.num_speakers,
                           utterances_per_speaker_per_label=self.utterances_per_speaker_per_label,
                           sample_rate=self.sample_rate, seed=self.synth_seed, ambiguity=self.ambiguity,
                           similarity=self.similarity, gamma=self.gamma, overwrite=True)


def check_corpus_options(root: Path, expected: Mapping[str, Any]) -> None:
    """Refuse a corpus in ``root`` made with other options than ``expected`` (silently training on the
    wrong corpus, e.g. an unambiguous one under an ambiguous config, is the failure this prevents)."""
    path = root / OPTIONS_NAME
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: corpus {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the synthetic corpus in {root} was made with other options ({details}); "
                         f"give another root or delete {root} to regenerate it")
