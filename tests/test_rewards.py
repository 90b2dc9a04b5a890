import math

import pytest

from emorl_pl.emotions import SimilarityMatrix
from emorl_pl.reasoning import format_response
from emorl_pl.rewards import (
    REWARDS,
    AccuracyReward,
    ESWRReward,
    FormatReward,
    RewardOutput,
    RewardSet,
    alpha_at,
    build_reward,
    eswr_reward,
    means,
    register_reward,
)

LABELS = ("neutral", "happy", "sad", "angry", "fear", "disgust", "surprise")  # meld7 order differs on purpose
COS45 = (math.sqrt(2) / 2 + 1) / 2  # Plutchik S for neighbours 45 degrees apart: 0.8536


def esr(label):
    return format_response("esr", label)


def test_alpha_schedules():
    assert alpha_at("constant", 0.7, 0.9, 0.1) == 0.9
    assert alpha_at("linear", 0.0) == 1.0
    assert alpha_at("linear", 0.25) == pytest.approx(0.75)
    assert alpha_at("linear", 0.5, 0.8, 0.2) == pytest.approx(0.5)
    assert alpha_at("linear", 1.7) == 0.0 and alpha_at("linear", -1.0) == 1.0  # progress is clipped
    assert alpha_at("cosine", 0.0) == pytest.approx(1.0)
    assert alpha_at("cosine", 0.5) == pytest.approx(0.5)
    assert alpha_at("cosine", 0.25) == pytest.approx((1 + math.sqrt(2) / 2) / 2)
    assert alpha_at("cosine", 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown alpha schedule 'step'; known: constant, linear, cosine"):
        alpha_at("step", 0.5)


def test_eswr_scalar_rule():
    sim = SimilarityMatrix.build("plutchik", LABELS)
    assert eswr_reward("angry", "angry", sim, gamma=0.7, alpha=0.3) == 1.0
    # angry vs disgust: S = 0.8536 > 0.7 -> alpha * S
    assert eswr_reward("disgust", "angry", sim, gamma=0.7, alpha=0.5) == pytest.approx(0.5 * COS45)
    # but not above a higher threshold (strictly greater)
    assert eswr_reward("disgust", "angry", sim, gamma=0.9, alpha=0.5) == 0.0
    assert eswr_reward("disgust", "angry", sim, gamma=COS45, alpha=0.5) == 0.0
    assert eswr_reward("sad", "happy", sim, gamma=0.7, alpha=1.0) == 0.0  # opposite: S = 0
    assert eswr_reward("neutral", "happy", sim, gamma=0.4, alpha=1.0) == 0.5  # neutral S = 0.5
    assert eswr_reward(None, "happy", sim, gamma=0.0, alpha=1.0) == 0.0
    assert eswr_reward("contempt", "angry", sim, gamma=0.0, alpha=1.0) == 0.0  # outside the label set
    with pytest.raises(ValueError, match="gold label 'calm' is not in the reward's label set"):
        eswr_reward("happy", "calm", sim, gamma=0.7, alpha=1.0)


def test_eswr_reward_class_follows_progress():
    r = ESWRReward(LABELS, mode="esr", gamma=0.7)
    assert r.name == "eswr"
    completions = [esr("angry"), esr("disgust"), esr("sad"), "garbage", "<answer>disgust"]
    golds = ["angry", "angry", "angry", "angry", "angry"]
    # progress 0.25 -> alpha 0.75
    assert r(completions, golds, progress=0.25) == pytest.approx([1.0, 0.75 * COS45, 0.0, 0.0, 0.75 * COS45])
    # the end of a linear schedule is plain accuracy
    assert r(completions, golds, progress=1.0) == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])
    # per-completion progress (TRL passes columns as lists)
    assert r(completions[:2], golds[:2], progress=[0.0, 0.5]) == pytest.approx([1.0, 0.5 * COS45])
    with pytest.raises(KeyError, match="'progress'"):
        r(completions, golds)
    with pytest.raises(ValueError, match="2 values for 5 completions"):
        r(completions, golds, progress=[0.1, 0.2])
    with pytest.raises(ValueError, match="5 completions but 1 gold labels"):
        r(completions, ["angry"], progress=0.0)
    # constant schedule does not need progress; extra columns are ignored
    rc = ESWRReward(LABELS, alpha_schedule="constant", alpha_start=0.4)
    assert rc([esr("disgust")], ["angry"], prompts=["p"]) == pytest.approx([0.4 * COS45])
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        ESWRReward(LABELS, alpha_schedule="exp")


def test_eswr_with_user_and_vad_similarity():
    r = ESWRReward(
        ("happy", "surprise", "sad"),
        similarity={"surprise": {"happy": 0.9}},
        gamma=0.5,
        alpha_schedule="constant",
    )
    assert r([esr("surprise"), esr("happy")], ["happy", "surprise"]) == pytest.approx([0.9, 0.0])
    rv = ESWRReward(("happy", "surprise", "sad"), similarity="vad", gamma=0.5, alpha_schedule="constant")
    # NRC VAD: happy (0.980, 0.824, 0.794), surprise (0.875, 0.875, 0.562)
    s = 1 - math.sqrt(0.105**2 + 0.051**2 + 0.232**2) / math.sqrt(3)
    assert rv([esr("surprise")], ["happy"]) == pytest.approx([s])


def test_format_and_accuracy_rewards():
    completions = [esr("happy"), "<answer>happy</answer>", esr("sad"), "happy", "<think>x</think>"]
    golds = ["happy"] * 5
    assert FormatReward(LABELS, mode="esr")(completions, golds) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert FormatReward(LABELS, mode="ir")(completions, golds) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert AccuracyReward(LABELS, mode="esr")(completions, golds, progress=0.3) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert (FormatReward.name, AccuracyReward.name) == ("format", "accuracy")
    with pytest.raises(ValueError, match="unknown response mode"):
        FormatReward(LABELS, mode="free")


def test_registry_and_build():
    assert {"eswr", "format", "accuracy"} <= set(REWARDS)
    assert isinstance(build_reward("format", LABELS, "ir"), FormatReward)
    r = build_reward({"name": "eswr", "gamma": 0.95}, LABELS, "eur")
    assert isinstance(r, ESWRReward) and r.gamma == 0.95 and r.mode == "eur"
    with pytest.raises(ValueError, match="unknown reward 'lenght'; known rewards: .*accuracy.*eswr.*format"):
        build_reward("lenght", LABELS, "esr")
    with pytest.raises(ValueError, match="no 'name' key"):
        build_reward({"gamma": 0.5}, LABELS, "esr")

    @register_reward("test_length")
    class LengthReward:
        def __init__(self, labels, mode):
            pass

        def __call__(self, completions, labels, **columns):
            return [None if not c else float(len(c)) for c in completions]

    try:
        assert isinstance(build_reward("test_length", LABELS, "esr"), LengthReward)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_length")(FormatReward)
    finally:
        REWARDS.pop("test_length")


def test_reward_set_weighted_total_and_means():
    rs = RewardSet({"eswr": 1.0, "format": 0.5}, LABELS, mode="esr")
    completions = [esr("angry"), esr("disgust"), "<answer>angry</answer>", "nonsense"]
    out = rs(completions, ["angry"] * 4, progress=0.0)
    assert isinstance(out, RewardOutput)
    assert out.per_reward["eswr"] == pytest.approx([1.0, COS45, 1.0, 0.0])
    assert out.per_reward["format"] == [1.0, 1.0, 0.0, 0.0]
    assert out.total == pytest.approx([1.5, COS45 + 0.5, 1.0, 0.0])
    assert rs.means(out.per_reward) == pytest.approx({"eswr": (2 + COS45) / 4, "format": 0.5})


def test_reward_set_none_handling():
    @register_reward("test_maybe")
    class Maybe:
        def __init__(self, labels, mode, value=1.0):
            self.value = value

        def __call__(self, completions, labels, **columns):
            return [None if "skip" in c else self.value for c in completions]

    try:
        rs = RewardSet([{"name": "test_maybe", "weight": 2.0, "value": 0.25}], LABELS, "esr")
        out = rs(["a", "skip", "b"], ["happy"] * 3)
        assert out.total[0] == 0.5 and math.isnan(out.total[1]) and out.total[2] == 0.5
        rs2 = RewardSet({"test_maybe": {"weight": 3.0}, "accuracy": 1.0}, LABELS, "esr")
        out2 = rs2(["happy", "skip happy"], ["happy", "happy"])
        assert out2.total == [4.0, 0.0]  # the None term is left out, not counted as 0 * weight
        assert means(out2.per_reward) == {"test_maybe": 1.0, "accuracy": 0.5}
        assert math.isnan(means({"x": [None, None]})["x"])
    finally:
        REWARDS.pop("test_maybe")


def test_reward_set_errors():
    with pytest.raises(ValueError, match="unknown reward 'esw'; known rewards: .*accuracy.*eswr.*format"):
        RewardSet({"esw": 1.0}, LABELS, "esr")
    with pytest.raises(ValueError, match="listed twice"):
        RewardSet(["format", {"name": "format", "weight": 2}], LABELS, "esr")
    with pytest.raises(ValueError, match="empty"):
        RewardSet({}, LABELS, "esr")
    rs = RewardSet(["format"], "iemocap4", "ir")
    assert rs.weights == {"format": 1.0}


def test_registered_class_gets_labels_and_mode_only_if_it_takes_them():
    @register_reward("test_plain")
    class Plain:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, completions, labels, **columns):
            return [self.scale] * len(completions)

    try:
        rs = RewardSet({"test_plain": {"weight": 2.0, "scale": 0.25}, "eswr": 1.0}, "iemocap4", "esr")
        assert rs.fns["test_plain"].scale == 0.25
        assert rs(["x"], ["sad"], progress=0.0).total == [0.5]
        with pytest.raises(ValueError, match=r"rewards\.test_plain: .*Plain\(scale=1\.0\) cannot be built with \['scal'\]"):
            RewardSet({"test_plain": {"scal": 1}}, "iemocap4", "esr")
    finally:
        REWARDS.pop("test_plain")
