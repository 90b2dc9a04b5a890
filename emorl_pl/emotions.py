"""The emotion space: canonical names, alias normalisation, corpus label sets, similarity matrices.

Pure Python (no torch, no Lightning) so that data converters, rewards and metrics share one source
of truth for what an emotion label is.

Similarity S(i, j) in [0, 1] with S(i, i) = 1:

* ``plutchik`` (EMO-RL, Li et al. 2025): each primary emotion sits at an angle on Plutchik's wheel
  (joy 0, trust 45, fear 90, surprise 135, sadness 180, disgust 225, anger 270, anticipation 315
  degrees). For two different labels with angles, S = (cos(delta) + 1) / 2 where delta is the smaller
  angle between them. A label without an angle (neutral, calm) is treated like neutral: S = 1/2
  against any other label.
* ``vad``: S = 1 - ||v_i - v_j||_2 / sqrt(3) over NRC VAD lexicon v1.0 (valence, arousal, dominance)
  coordinates, so S = 0 only for opposite corners of the unit cube.
* a user matrix given in YAML as ``{pred: {gold: value}}`` or as a list of rows aligned with the label
  set (unlisted off-diagonal pairs are 0; the diagonal is always 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

CANONICAL_EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happy",
    "sad",
    "angry",
    "fear",
    "disgust",
    "surprise",
    "calm",
    "contempt",
    "trust",
    "anticipation",
)

# Lower-cased alias -> canonical name. Single letters are SAVEE's codes; three-letter codes are
# IEMOCAP's / CREMA-D's; full words cover MELD, RAVDESS, EmoBox's unified names and model output.
_ALIASES: dict[str, str] = {}
for _canon, _names in {
    "neutral": ["neutral", "neu", "n", "neutrality", "no emotion", "none"],
    "happy": ["happy", "hap", "exc", "excited", "excitement", "joy", "joyful", "happiness", "h", "pleased"],
    "sad": ["sad", "sadness", "sa", "unhappy"],
    "angry": ["angry", "ang", "anger", "a", "mad"],
    "fear": ["fear", "fea", "fearful", "f", "afraid", "scared"],
    "disgust": ["disgust", "dis", "disgusted", "d"],
    "surprise": ["surprise", "sur", "surprised", "su", "ps", "pleasant surprise"],
    "calm": ["calm", "cal"],
    "contempt": ["contempt", "contemptuous", "con"],
    "trust": ["trust"],
    "anticipation": ["anticipation"],
}.items():
    for _name in _names:
        _ALIASES[_name] = _canon

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "iemocap4": ("neutral", "happy", "angry", "sad"),
    "meld7": ("neutral", "happy", "surprise", "angry", "sad", "disgust", "fear"),
    "ravdess8": ("neutral", "calm", "happy", "sad", "angry", "fear", "disgust", "surprise"),
    "cremad6": ("neutral", "happy", "sad", "angry", "fear", "disgust"),
    "savee7": ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise"),
}

PLUTCHIK_ANGLES: dict[str, float] = {
    "happy": 0.0,
    "trust": 45.0,
    "fear": 90.0,
    "surprise": 135.0,
    "sad": 180.0,
    "disgust": 225.0,
    "angry": 270.0,
    "anticipation": 315.0,
    # Plutchik's primary dyad disgust + anger.
    "contempt": 247.5,
}

# NRC VAD lexicon v1.0 (Mohammad 2018): (valence, arousal, dominance) in [0, 1].
VAD_COORDINATES: dict[str, tuple[float, float, float]] = {
    "neutral": (0.469, 0.184, 0.357),
    "happy": (0.980, 0.824, 0.794),
    "surprise": (0.875, 0.875, 0.562),
    "angry": (0.167, 0.865, 0.657),
    "sad": (0.052, 0.288, 0.164),
    "disgust": (0.052, 0.775, 0.317),
    "fear": (0.073, 0.840, 0.293),
    "calm": (0.875, 0.100, 0.282),
}


class UnknownEmotionError(ValueError):
    """A label that is not an emotion the project knows, or not in the allowed set."""


def normalize_label(label: str, allowed: Sequence[str] | None = None) -> str:
    """Map a label or alias (any case, surrounding spaces/punctuation ignored) to its canonical name.

    Raises UnknownEmotionError naming the label and the allowed labels when it is unknown, or when
    ``allowed`` is given and the canonical name is not in it.
    """
    canon = try_normalize_label(label)
    allowed_list = list(allowed) if allowed is not None else list(CANONICAL_EMOTIONS)
    if canon is None or (allowed is not None and canon not in allowed_list):
        raise UnknownEmotionError(f"unknown emotion label {label!r}; allowed: {', '.join(allowed_list)}")
    return canon


def try_normalize_label(label: object, allowed: Sequence[str] | None = None) -> str | None:
    """Like normalize_label but returns None instead of raising (for parsing model output)."""
    if not isinstance(label, str):
        return None
    key = " ".join(label.strip().strip(".,;:!?\"'`*()[]{}").lower().replace("_", " ").split())
    canon = _ALIASES.get(key)
    if canon is None or (allowed is not None and canon not in allowed):
        return None
    return canon


def get_label_set(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A label set by name (``iemocap4``, ``meld7``, ...) or an explicit list of labels/aliases."""
    if isinstance(spec, str):
        if spec not in LABEL_SETS:
            raise UnknownEmotionError(f"unknown label set {spec!r}; known: {', '.join(LABEL_SETS)}")
        return LABEL_SETS[spec]
    labels = tuple(normalize_label(x) for x in spec)
    if len(set(labels)) != len(labels):
        raise ValueError(f"label set {list(spec)} has duplicates after normalisation: {list(labels)}")
    if not labels:
        raise ValueError("label set is empty")
    return labels


def plutchik_similarity(a: str, b: str) -> float:
    """S(a, b) on Plutchik's wheel; see the module docstring."""
    a, b = normalize_label(a), normalize_label(b)
    if a == b:
        return 1.0
    if a not in PLUTCHIK_ANGLES or b not in PLUTCHIK_ANGLES:
        return 0.5
    delta = abs(PLUTCHIK_ANGLES[a] - PLUTCHIK_ANGLES[b]) % 360.0
    delta = min(delta, 360.0 - delta)
    return (math.cos(math.radians(delta)) + 1.0) / 2.0


def vad_similarity(a: str, b: str) -> float:
    """S(a, b) = 1 - ||v_a - v_b|| / sqrt(3) over NRC VAD coordinates."""
    a, b = normalize_label(a), normalize_label(b)
    if a == b:
        return 1.0
    for x in (a, b):
        if x not in VAD_COORDINATES:
            raise UnknownEmotionError(
                f"no VAD coordinates for {x!r}; known: {', '.join(VAD_COORDINATES)} (give a user matrix instead)"
            )
    return 1.0 - math.dist(VAD_COORDINATES[a], VAD_COORDINATES[b]) / math.sqrt(3.0)


SimilaritySpec = str | Mapping[str, Mapping[str, float]] | Sequence[Sequence[float]]


class SimilarityMatrix:
    """S over a label set, looked up by canonical label: ``sim(pred, gold)``."""

    def __init__(self, labels: Sequence[str], values: Sequence[Sequence[float]]) -> None:
        self.labels = tuple(labels)
        if len(values) != len(self.labels) or any(len(row) != len(self.labels) for row in values):
            raise ValueError(f"similarity matrix must be {len(self.labels)}x{len(self.labels)} for labels {self.labels}")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"similarity[{self.labels[i]}][{self.labels[j]}] = {v} is outside [0, 1]")
        self.values = [[1.0 if i == j else float(v) for j, v in enumerate(row)] for i, row in enumerate(values)]
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __call__(self, pred: str, gold: str) -> float:
        return self.values[self._index[pred]][self._index[gold]]

    @classmethod
    def build(cls, spec: SimilaritySpec, labels: Sequence[str]) -> SimilarityMatrix:
        labels = get_label_set(labels)
        if isinstance(spec, str):
            fns = {"plutchik": plutchik_similarity, "vad": vad_similarity}
            if spec not in fns:
                raise ValueError(f"unknown similarity {spec!r}; use 'plutchik', 'vad' or a matrix")
            fn = fns[spec]
            return cls(labels, [[fn(a, b) for b in labels] for a in labels])
        if isinstance(spec, Mapping):
            rows = [[0.0] * len(labels) for _ in labels]
            index = {label: i for i, label in enumerate(labels)}
            for pred, row in spec.items():
                p = normalize_label(pred, labels)
                for gold, value in row.items():
                    rows[index[p]][index[normalize_label(gold, labels)]] = float(value)
            return cls(labels, rows)
        return cls(labels, [list(map(float, row)) for row in spec])
