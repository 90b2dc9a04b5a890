"""``GRPOModule.last_rollout``: the typed record of a GRPO window that the logging callbacks read."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from emorl_pl.callbacks.rollout_log import RolloutJSONL
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.rewards import REWARDS, RewardOutput, register_reward
from emorl_pl.rollout_record import RolloutRecord

G = 3


def _score(text: str) -> float:
    return (sum(map(ord, text)) % 5) / 4


if "test_record_hash" not in REWARDS:

    @register_reward("test_record_hash")
    class RecordHash:
        """Varies with the text; does not apply (None) to the 'sad' utterances' completions."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [None if g == "sad" else _score(c) for c, g in zip(completions, labels)]


def _batch(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    labels = [["happy", "sad"], ["angry", "neutral"]][i]
    return {"waveforms": [0.1 * torch.randn(6000 + 3000 * j, generator=g) for j in range(2)], "sample_rate": 16000,
            "labels": labels, "keys": [f"b{i}u{j}" for j in range(2)], "texts": [None, None],
            "corpus": ["mem"] * 2, "meta": [{}, {}]}


def test_the_record_of_a_window_holds_its_completions_rewards_and_advantages(toy_model_dir, tmp_path):
    """Two batches per window: one record at the window's end, both batches in order; the rewards are the
    reward's values (NaN totals where it does not apply), the advantages group-normalised by hand."""
    module = GRPOModule(AudioLMPolicy(toy_model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
                        rewards={"test_record_hash": 2.0}, group_size=G, max_new_tokens=6, micro_batch_size=4,
                        beta=0.0, accumulate_grad_batches=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    rollouts, records = [], []
    module.policy.load()
    real_rollout = module.policy.rollout

    def recording_rollout(*a, **k):
        rollouts.append(real_rollout(*a, **k))
        return rollouts[-1]

    module.policy.rollout = recording_rollout

    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records.append(pl_module.last_rollout)

    path = tmp_path / "rollouts.jsonl"
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Seen(), RolloutJSONL(path=str(path))])
    trainer.fit(module, DataLoader([_batch(0), _batch(1)], batch_size=None))

    assert records[0] is None, "no record while the window is open"
    record = records[1]
    assert isinstance(record, RolloutRecord) and record is module.last_rollout
    texts = [t for r in rollouts for t in r.texts]
    golds = ["happy"] * G + ["sad"] * G + ["angry"] * G + ["neutral"] * G
    assert record.keys == ("b0u0", "b0u1", "b1u0", "b1u1") and record.group_size == G
    assert record.golds == tuple(golds) and record.texts == tuple(texts)
    values = [None if g == "sad" else _score(t) for t, g in zip(texts, golds)]
    assert record.scored.per_reward == {"test_record_hash": values}
    totals = torch.tensor([float("nan") if v is None else 2.0 * v for v in values])
    torch.testing.assert_close(torch.tensor(record.scored.total), totals, equal_nan=True)
    expected = []
    for group in totals.view(-1, G):
        if torch.isnan(group).all() or bool((group == group[0]).all()):
            expected += [0.0] * G  # no valid spread: zero advantage
        else:
            expected += ((group - group.mean()) / (group.std() + 1e-4)).tolist()
    torch.testing.assert_close(torch.tensor(record.advantages), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert any(abs(a) > 0.1 for a in record.advantages)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.advantages = None

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["key"], x["sample"], x["completion"]) for x in lines] == [
        (record.keys[i // G], i % G, texts[i]) for i in range(4 * G)]
    assert [x["advantage"] for x in lines] == list(record.advantages) and {x["step"] for x in lines} == {1}


def test_a_record_must_be_consistent():
    scored = RewardOutput(total=[1.0, 0.0], per_reward={"r": [1.0, 0.0]})
    RolloutRecord(("u",), ("a", "a"), ("x", "y"), scored, (0.7, -0.7), 2)
    with pytest.raises(ValueError, match="1 advantages for 2 completions"):
        RolloutRecord(("u",), ("a", "a"), ("x", "y"), scored, (0.7,), 2)
    with pytest.raises(ValueError, match="a multiple of the group size 3"):
        RolloutRecord(("u",), ("a", "a"), ("x", "y"), scored, None, 3)
    with pytest.raises(ValueError, match="2 keys for 1 utterances"):
        RolloutRecord(("u", "v"), ("a", "a"), ("x", "y"), scored, None, 2)
