import math
import random

import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from emorl_pl.emotions import LABEL_SETS
from emorl_pl.metrics import SERMetrics

INVALID = "<invalid>"  # sklearn stand-in for None: a label outside every set


def _random_batch(rng, labels, n, p_none, p_right):
    golds = [rng.choice(labels) for _ in range(n)]
    preds = []
    for g in golds:
        u = rng.random()
        preds.append(None if u < p_none else g if u < p_none + p_right else rng.choice(labels))
    return preds, golds


def _sklearn(preds, golds, labels):
    y_pred = [INVALID if p is None else p for p in preds]
    present_gold = [x for x in labels if x in golds]
    present_any = [x for x in labels if x in golds or x in y_pred]
    cm = confusion_matrix(golds, y_pred, labels=[*labels, INVALID])
    return {
        "wa": accuracy_score(golds, y_pred),
        "ua": recall_score(golds, y_pred, average="macro", labels=present_gold, zero_division=0),
        "f1_weighted": f1_score(golds, y_pred, average="weighted", labels=list(labels), zero_division=0),
        "f1_macro": f1_score(golds, y_pred, average="macro", labels=present_any, zero_division=0),
        "invalid_rate": sum(p is None for p in preds) / len(preds),
        "confusion": cm[: len(labels)],
    }


def _check(result, expected):
    for key in ("wa", "ua", "f1_weighted", "f1_macro", "invalid_rate"):
        assert result[key].item() == pytest.approx(expected[key], abs=1e-6), key
    assert torch.equal(result["confusion"], torch.as_tensor(expected["confusion"], dtype=torch.long))


@pytest.mark.parametrize("set_name", sorted(LABEL_SETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_random(set_name, seed):
    rng = random.Random(seed)
    labels = LABEL_SETS[set_name]
    metric = SERMetrics(labels)
    all_preds, all_golds = [], []
    for _ in range(3):  # several updates accumulate
        preds, golds = _random_batch(rng, labels, rng.randint(5, 60), p_none=0.15, p_right=0.4)
        metric.update(preds, golds)
        all_preds += preds
        all_golds += golds
    _check(metric.compute(), _sklearn(all_preds, all_golds, labels))


def test_absent_classes_follow_the_documented_convention():
    labels = ("neutral", "happy", "angry", "sad")
    # sad never appears; angry is predicted but never gold (F1 0, no recall defined).
    preds = ["neutral", "angry", "happy", None, "happy"]
    golds = ["neutral", "neutral", "happy", "happy", "happy"]
    metric = SERMetrics(labels)
    metric.update(preds, golds)
    out = metric.compute()
    _check(out, _sklearn(preds, golds, labels))
    # by hand: recalls neutral 1/2, happy 2/3 -> UA = 7/12; F1 neutral 2/3, happy 4/5, angry 0 -> /3
    assert out["ua"].item() == pytest.approx(7 / 12)
    assert out["f1_macro"].item() == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert out["wa"].item() == pytest.approx(3 / 5)
    assert out["invalid_rate"].item() == pytest.approx(1 / 5)
    assert out["confusion"].tolist() == [[1, 0, 1, 0, 0], [0, 2, 0, 0, 1], [0] * 5, [0] * 5]
    assert metric.column_names == ("neutral", "happy", "angry", "sad", "invalid")


def test_all_invalid_and_empty():
    metric = SERMetrics("iemocap4")
    metric.update([None, None], ["happy", "sad"])
    out = metric.compute()
    assert out["wa"].item() == 0.0 and out["ua"].item() == 0.0 and out["invalid_rate"].item() == 1.0
    assert out["f1_macro"].item() == 0.0 and out["f1_weighted"].item() == 0.0
    metric.reset()
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        empty = metric.compute()
    assert all(math.isnan(empty[k].item()) for k in ("wa", "ua", "f1_macro", "f1_weighted", "invalid_rate"))
    assert empty["confusion"].sum().item() == 0


def test_merged_states_equal_one_pass():
    # What the cross-rank sync does (sum of confusion states), done in one process.
    rng = random.Random(7)
    labels = LABEL_SETS["meld7"]
    a, b, whole = SERMetrics(labels), SERMetrics(labels), SERMetrics(labels)
    pa, ga = _random_batch(rng, labels, 40, 0.1, 0.5)
    pb, gb = _random_batch(rng, labels, 25, 0.1, 0.5)
    a.update(pa, ga)
    b.update(pb, gb)
    whole.update(pa + pb, ga + gb)
    a.merge_state(b)
    ra, rw = a.compute(), whole.compute()
    for k in ra:
        assert torch.equal(ra[k], rw[k]), k


def test_bad_input_errors():
    metric = SERMetrics("iemocap4")
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        metric.update(["happy", "sad"], ["happy"])
    with pytest.raises(ValueError, match=r"gold labels \['fear'\] are not in the label set"):
        metric.update(["happy"], ["fear"])
    with pytest.raises(ValueError, match="prediction 'hap' is not in the label set"):
        metric.update(["hap"], ["happy"])
