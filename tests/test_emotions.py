import math

import pytest

from emorl_pl.emotions import (
    LABEL_SETS,
    SimilarityMatrix,
    UnknownEmotionError,
    get_label_set,
    normalize_label,
    plutchik_similarity,
    try_normalize_label,
    vad_similarity,
)


@pytest.mark.parametrize(
    "alias, canon",
    [
        ("hap", "happy"),
        ("exc", "happy"),
        ("joy", "happy"),
        ("Happy", "happy"),
        ("happiness", "happy"),
        ("  HAPPY. ", "happy"),
        ("ang", "angry"),
        ("anger", "angry"),
        ("A", "angry"),
        ("neu", "neutral"),
        ("sadness", "sad"),
        ("fearful", "fear"),
        ("disgusted", "disgust"),
        ("ps", "surprise"),
        ("pleasant_surprise", "surprise"),
        ("Pleasant   Surprise", "surprise"),
        ("cal", "calm"),
    ],
)
def test_aliases_normalise_to_canonical(alias, canon):
    assert normalize_label(alias) == canon
    assert try_normalize_label(alias) == canon


def test_unknown_label_error_lists_allowed_labels():
    with pytest.raises(UnknownEmotionError) as err:
        normalize_label("bored", allowed=("neutral", "happy"))
    assert "'bored'" in str(err.value) and "neutral, happy" in str(err.value)
    # Known emotion, but outside the allowed set.
    with pytest.raises(UnknownEmotionError, match="allowed: neutral, happy"):
        normalize_label("angry", allowed=("neutral", "happy"))


def test_try_normalize_returns_none_for_bad_input():
    assert try_normalize_label("bored") is None
    assert try_normalize_label(None) is None
    assert try_normalize_label(3) is None
    assert try_normalize_label("angry", allowed=("happy", "sad")) is None
    assert try_normalize_label("Anger!", allowed=("happy", "angry")) == "angry"


def test_label_sets():
    assert get_label_set("iemocap4") == ("neutral", "happy", "angry", "sad")
    assert {k: len(v) for k, v in LABEL_SETS.items()} == {
        "iemocap4": 4,
        "meld7": 7,
        "ravdess8": 8,
        "cremad6": 6,
        "savee7": 7,
    }
    assert get_label_set(["hap", "Ang", "neu"]) == ("happy", "angry", "neutral")
    with pytest.raises(UnknownEmotionError, match="known: iemocap4"):
        get_label_set("iemocap5")
    with pytest.raises(ValueError, match="duplicates"):
        get_label_set(["happy", "joy"])
    with pytest.raises(ValueError, match="empty"):
        get_label_set([])


def _cos_sim(deg):
    return (math.cos(math.radians(deg)) + 1) / 2


def test_plutchik_by_hand():
    assert plutchik_similarity("angry", "disgust") == pytest.approx(0.8535534, abs=1e-6)
    assert plutchik_similarity("angry", "disgust") == pytest.approx((math.sqrt(2) / 2 + 1) / 2)
    assert plutchik_similarity("happy", "sad") == pytest.approx(0.0, abs=1e-12)
    assert plutchik_similarity("fear", "surprise") == pytest.approx(_cos_sim(45))
    assert plutchik_similarity("happy", "fear") == pytest.approx(0.5)  # 90 degrees
    # Wrap-around: joy 0 and anticipation 315 are 45 degrees apart, not 315.
    assert plutchik_similarity("happy", "anticipation") == pytest.approx(_cos_sim(45))
    for other in ("happy", "sad", "angry", "fear", "disgust", "surprise", "calm"):
        assert plutchik_similarity("neutral", other) == 0.5
        assert plutchik_similarity(other, "neutral") == 0.5


def test_plutchik_matrix_symmetric_with_unit_diagonal():
    labels = get_label_set("ravdess8")
    sim = SimilarityMatrix.build("plutchik", labels)
    for a in labels:
        assert sim(a, a) == 1.0
        for b in labels:
            assert sim(a, b) == pytest.approx(sim(b, a))
            assert 0.0 <= sim(a, b) <= 1.0


def test_vad_by_hand():
    # NRC VAD v1.0: happy (0.980, 0.824, 0.794), sad (0.052, 0.288, 0.164).
    d = math.sqrt((0.980 - 0.052) ** 2 + (0.824 - 0.288) ** 2 + (0.794 - 0.164) ** 2)
    assert d == pytest.approx(1.24313, abs=1e-4)
    assert vad_similarity("happy", "sad") == pytest.approx(1 - d / math.sqrt(3))
    assert vad_similarity("sad", "happy") == pytest.approx(0.28228, abs=1e-4)
    assert vad_similarity("angry", "angry") == 1.0


def test_vad_without_coordinates_errors():
    with pytest.raises(UnknownEmotionError, match="no VAD coordinates for 'contempt'"):
        vad_similarity("contempt", "happy")


def test_user_matrix_from_dict():
    labels = ("neutral", "happy", "surprise")
    sim = SimilarityMatrix.build({"hap": {"surprised": 0.8}, "neutral": {"neutral": 0.2}}, labels)
    assert sim("happy", "surprise") == 0.8
    assert sim("surprise", "happy") == 0.0  # a dict is taken as given: not symmetrised
    assert sim("neutral", "neutral") == 1.0  # the diagonal is always 1
    assert sim("neutral", "happy") == 0.0
    with pytest.raises(UnknownEmotionError, match="'angry'"):
        SimilarityMatrix.build({"angry": {"happy": 0.1}}, labels)


def test_user_matrix_from_list():
    labels = ("neutral", "happy")
    sim = SimilarityMatrix.build([[0.0, 0.3], [0.6, 0.0]], labels)
    assert sim("neutral", "happy") == 0.3
    assert sim("happy", "neutral") == 0.6
    assert sim("happy", "happy") == 1.0


def test_user_matrix_errors():
    labels = ("neutral", "happy")
    with pytest.raises(ValueError, match=r"similarity\[neutral\]\[happy\] = 1.5 is outside \[0, 1\]"):
        SimilarityMatrix.build([[1.0, 1.5], [0.0, 1.0]], labels)
    with pytest.raises(ValueError, match="outside"):
        SimilarityMatrix.build({"happy": {"neutral": -0.1}}, labels)
    with pytest.raises(ValueError, match="must be 2x2"):
        SimilarityMatrix.build([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], labels)
    with pytest.raises(ValueError, match="must be 2x2"):
        SimilarityMatrix.build([[1.0, 0.0]], labels)
    with pytest.raises(ValueError, match="unknown similarity 'cosine'"):
        SimilarityMatrix.build("cosine", labels)
