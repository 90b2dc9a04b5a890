"""Sampled evaluation (maj@k, pass@k) and the extra validation metrics (mean reward, invalid rate,
per-class recall), with scikit-learn as the oracle."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from sklearn.metrics import accuracy_score, recall_score
from torch.utils.data import DataLoader

from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.sampled_eval import majority_vote, pass_at_k

LABELS = ["neutral", "happy", "angry", "sad"]


def test_majority_vote_by_hand():
    assert majority_vote(["sad", "happy", "sad", None]) == "sad"
    assert majority_vote(["happy", "sad", "sad", "happy"]) == "happy"  # tie: the first to appear
    assert majority_vote([None, None, "angry"]) == "angry"  # unreadable answers do not vote
    assert majority_vote([None, None]) is None


def test_pass_at_k_by_hand():
    assert pass_at_k(["sad", "happy", None], "happy") == "happy"
    assert pass_at_k(["sad", "sad", "angry"], "happy") == "sad"
    assert pass_at_k([None], "happy") is None


def _answer(label):
    return "garbage" if label is None else (
        f"<think><content>x</content><acoustics>y</acoustics><summary>z</summary></think><answer>{label}</answer>")


def test_validation_reports_maj_and_pass_at_k_reward_invalid_rate_and_recall(real_model_dir, monkeypatch):
    k = 3
    module = GRPOModule(AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
                        rewards={"accuracy": 1.0}, eval_samples=k, eval_temperature=0.8, max_new_tokens=8)
    g = torch.Generator().manual_seed(5)
    choices = [*LABELS, None]
    greedy_preds, sampled_preds = [], []

    def draw():
        return choices[int(torch.randint(0, len(choices), (1,), generator=g))]

    def fake_greedy(prompts, max_new_tokens, synced_gpus=None):
        preds = [draw() for _ in range(len(prompts))]
        greedy_preds.extend(preds)
        return [_answer(p) for p in preds]

    def fake_rollout(prompts, group_size, **kwargs):
        assert group_size == k and kwargs["temperature"] == 0.8
        preds = [draw() for _ in range(len(prompts) * group_size)]
        sampled_preds.extend(preds)
        return SimpleNamespace(texts=[_answer(p) for p in preds])

    monkeypatch.setattr(module.policy, "greedy", fake_greedy)
    monkeypatch.setattr(module.policy, "rollout", fake_rollout)
    batches = []
    for i in range(4):
        batches.append({"waveforms": [0.1 * torch.randn(16000, generator=g) for _ in range(3)], "sample_rate": 16000,
                        "labels": [LABELS[(i + j) % 4] for j in range(3)], "keys": [f"u{i}{j}" for j in range(3)],
                        "texts": [None] * 3, "corpus": ["mem"] * 3, "meta": [{}] * 3})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(batches, batch_size=None))
    m = {key: float(v) for key, v in trainer.callback_metrics.items()}

    golds = [label for b in batches for label in b["labels"]]
    as_text = ["invalid" if p is None else p for p in greedy_preds]
    assert m["val/wa"] == pytest.approx(accuracy_score(golds, as_text))
    assert m["val/invalid_rate"] == pytest.approx(sum(p is None for p in greedy_preds) / len(golds))
    assert m["val/reward"] == pytest.approx(accuracy_score(golds, as_text))  # the accuracy reward's mean
    for label in LABELS:
        want = recall_score(golds, as_text, labels=[label], average="macro", zero_division=0)
        assert m[f"val/recall/{label}"] == pytest.approx(want)

    groups = [sampled_preds[i * k : (i + 1) * k] for i in range(len(golds))]
    maj = ["invalid" if (p := majority_vote(a)) is None else p for a in groups]
    passed = ["invalid" if (p := pass_at_k(a, gold)) is None else p for a, gold in zip(groups, golds)]
    present = sorted(set(golds))
    assert m[f"val/maj@{k}/wa"] == pytest.approx(accuracy_score(golds, maj))
    assert m[f"val/maj@{k}/ua"] == pytest.approx(recall_score(golds, maj, labels=present, average="macro", zero_division=0))
    solved = sum(gold in a for a, gold in zip(groups, golds)) / len(golds)
    assert m[f"val/pass@{k}/wa"] == pytest.approx(solved)
    assert m[f"val/pass@{k}/ua"] == pytest.approx(recall_score(golds, passed, labels=present, average="macro",
                                                                zero_division=0))
    assert m[f"val/pass@{k}/wa"] >= m[f"val/maj@{k}/wa"]
