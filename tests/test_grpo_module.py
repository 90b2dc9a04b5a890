"""GRPOModule on the real-shape Qwen2-Audio (tests/conftest.py) with in-memory batches: real GRPO steps,
what they change and what they must not, micro-batch invariance, dynamic sampling, encoder calls, the
cold start, evaluation metrics against scikit-learn, and predict_step's rows."""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from encoder_calls import count_encoder_calls
from sklearn.metrics import accuracy_score, f1_score, recall_score
from torch.utils.data import DataLoader

from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.rewards import REWARDS, register_reward

LABELS = ["neutral", "happy", "angry", "sad"]


def _text_score(text: str) -> float:
    return (sum(map(ord, text)) % 5) / 4


if "test_text_hash" not in REWARDS:

    @register_reward("test_text_hash")
    class TextHashReward:
        """Varies with the sampled text (so advantages are non-zero); constant for gold 'neutral'."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [0.5 if g == "neutral" else _text_score(c) for c, g in zip(completions, labels)]

    @register_reward("test_constant")
    class ConstantReward:
        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [1.0] * len(completions)


def batches(n, B=2, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "waveforms": [0.1 * torch.randn(12000 + 2000 * j, generator=g) for j in range(B)],
                "sample_rate": 16000,
                "labels": [labels[j] if labels else LABELS[(i + j) % 4] for j in range(B)],
                "keys": [f"u{i}_{j}" for j in range(B)],
                "texts": [None] * B,
                "corpus": ["mem"] * B,
                "meta": [{} for _ in range(B)],
            }
        )
    return out


def make_module(real_model_dir, **kw):
    defaults = dict(
        labels="iemocap4",
        rewards={"test_text_hash": 1.0},
        group_size=4,
        max_new_tokens=12,
        micro_batch_size=8,
        beta=0.04,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    defaults.update(kw)
    return GRPOModule(AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4, alpha=8)), **defaults)


def fit(module, data, steps, **trainer_kw):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kw,
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    return trainer


def snapshot(policy):
    return {n: p.detach().clone() for n, p in policy.named_parameters()}


def test_grpo_steps_change_lora_only_and_loss_is_finite(real_model_dir):
    module = make_module(real_model_dir)
    module.policy.load()
    before = snapshot(module.policy)
    trainer = fit(module, batches(3), steps=3)
    assert torch.isfinite(trainer.callback_metrics["loss"])
    after = snapshot(module.policy)
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert any(not torch.equal(before[n], after[n]) for n in lora), "no LoRA weight changed"
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight changed"
    # The reference is the un-adapted model: equal to a freshly loaded base model.
    fresh = AudioLMPolicy(real_model_dir).load()
    prompts = module.policy.build_prompts(batches(1)[0]["waveforms"], 16000, module.instruction)
    rollout = module.policy.rollout(prompts, 2, max_new_tokens=6)
    ref = module.policy.completion_logps(rollout, reference=True)
    fresh_rollout = copy.copy(rollout)
    fresh_rollout.prompt = fresh.encode_prompts(prompts)
    with torch.no_grad():
        expected = fresh.completion_logps(fresh_rollout)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)
    policy_logps = module.policy.completion_logps(rollout).detach()
    assert not torch.allclose(policy_logps, ref, atol=1e-4), "adapted policy should differ from reference"


def test_constant_reward_and_beta_zero_give_zero_gradient(real_model_dir):
    module = make_module(real_model_dir, rewards={"test_constant": 1.0}, beta=0.0)
    module.policy.load()
    before = snapshot(module.policy)
    fit(module, batches(2), steps=2)
    after = snapshot(module.policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert module.trainer.callback_metrics["frac_reward_zero_std"] == 1.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_micro_batching_does_not_change_the_update(real_model_dir, loss_type):
    results = []
    for micro in (1, 3, 8):
        torch.manual_seed(0)
        module = make_module(real_model_dir, micro_batch_size=micro, loss_type=loss_type, gradient_clip_val=None)
        module.policy.load()
        fit(module, batches(1), steps=1)
        results.append({n: p.detach().clone() for n, p in module.policy.named_parameters() if "lora_" in n})
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], atol=1e-6, rtol=1e-5)


def test_audio_encoded_once_per_utterance_per_step(real_model_dir):
    module = make_module(real_model_dir, num_iterations=2, beta=0.04, micro_batch_size=3)
    module.policy.load()
    B, steps = 3, 2
    with count_encoder_calls(module.policy) as encoder:
        fit(module, batches(steps, B=B), steps=2 * steps)  # mu = 2 optimizer steps per batch
    assert encoder.utterances == B * steps
    assert encoder.calls == steps


def test_dynamic_sampling_drops_groups_with_equal_rewards(real_model_dir):
    module = make_module(real_model_dir, dynamic_sampling=True)
    module.policy.load()
    # 'neutral' groups get a constant reward (zero std) and must be dropped; 'angry' ones vary.
    fit(module, batches(1, B=3, labels=["neutral", "angry", "neutral"]), steps=1)
    assert module.trainer.callback_metrics["dynamic_sampling/dropped_groups"] == 2
    assert module.trainer.callback_metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)


def test_predict_step_records_seconds_ignored_and_skips_placeholders(real_model_dir):
    module = make_module(real_model_dir, max_new_tokens=4)
    module.policy.load()
    g = torch.Generator().manual_seed(4)
    batch = {"waveforms": [0.1 * torch.randn(32 * 16000, generator=g), 0.1 * torch.randn(8000, generator=g),
                           torch.zeros(1600)],
             "sample_rate": 16000, "keys": ["long.wav", "short.wav", "unreadable.wav"], "is_pad": [False, False, True]}
    rows = module.predict_step(batch, 0)
    assert [r["key"] for r in rows] == ["long.wav", "short.wav"]  # the placeholder row gets no prediction
    assert [r["seconds_ignored"] for r in rows] == [2.0, 0.0]  # 32 s into the 30 s window
    assert all(isinstance(r["text"], str) and "emotion" in r for r in rows)


class TwoTestSets(L.LightningDataModule):
    test_set_names = ["setA", "setB"]

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def test_dataloader(self):
        return [DataLoader(self.a, batch_size=None), DataLoader(self.b, batch_size=None)]


def test_eval_metrics_per_test_set_match_sklearn(real_model_dir, monkeypatch):
    module = make_module(real_model_dir)
    g = torch.Generator().manual_seed(3)
    answers = {}

    def fake_greedy(prompts, max_new_tokens, synced_gpus=None):
        out = []
        for _ in range(len(prompts)):
            r = int(torch.randint(0, 6, (1,), generator=g))
            out.append("garbage" if r >= 4 else f"<think><content>x</content><acoustics>y</acoustics><summary>z</summary></think><answer>{LABELS[r]}</answer>")
        answers.setdefault("all", []).extend(out)
        return out

    monkeypatch.setattr(module.policy, "greedy", fake_greedy)
    set_a, set_b = batches(3, B=4, seed=1), batches(2, B=4, seed=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=TwoTestSets(set_a, set_b))
    texts = answers["all"]
    for name, data, offset in (("setA", set_a, 0), ("setB", set_b, 12)):
        golds = [label for b in data for label in b["labels"]]
        preds = [t.split("<answer>")[1].split("<")[0] if "<answer>" in t else "invalid" for t in texts[offset : offset + len(golds)]]
        metrics = trainer.callback_metrics
        assert float(metrics[f"test/{name}/wa"]) == pytest.approx(accuracy_score(golds, preds))
        assert float(metrics[f"test/{name}/ua"]) == pytest.approx(recall_score(golds, preds, labels=sorted(set(golds)), average="macro", zero_division=0))
        assert float(metrics[f"test/{name}/f1_macro"]) == pytest.approx(
            f1_score(golds, preds, labels=sorted(set(golds) | (set(preds) - {"invalid"})), average="macro", zero_division=0)
        )
        assert float(metrics[f"test/{name}/format_rate"]) == pytest.approx(sum(p != "invalid" for p in preds) / len(preds))


class SnapshotAtStep(L.Callback):
    def __init__(self, step):
        self.step, self.weights = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in pl_module.policy.hf_model.named_parameters()}


def test_cold_start_model_becomes_the_reference_and_is_restored_on_resume(real_model_dir, tmp_path):
    module = GRPOModule(AudioLMPolicy(real_model_dir), labels="iemocap4", rewards={"test_text_hash": 1.0}, group_size=2,
                        max_new_tokens=8, sft_steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    snap = SnapshotAtStep(2)
    fit(module, batches(3), steps=3, callbacks=[snap], default_root_dir=str(tmp_path))
    assert snap.weights is not None
    with module.policy.reference() as ref:
        ref_weights = dict(ref.named_parameters())
    # The reference is the model as it was when RL began (after the 2 supervised steps) ...
    for name, value in snap.weights.items():
        torch.testing.assert_close(ref_weights[name], value, atol=0, rtol=0)
    # ... which is not the initial model, nor the current policy.
    initial = AudioLMPolicy(real_model_dir).load().hf_model
    assert any(not torch.equal(p, ref_weights[n]) for n, p in initial.named_parameters())
    assert any(not torch.equal(p, ref_weights[n]) for n, p in module.policy.hf_model.named_parameters())
    # It is saved as a model folder (never in the checkpoint) and reloaded by a resumed run.
    checkpoint = {"state_dict": {}, "global_step": 3}
    module.on_save_checkpoint(checkpoint)
    assert (Path(checkpoint["emorl_reference_dir"]) / "config.json").is_file()
    resumed = GRPOModule(AudioLMPolicy(real_model_dir), labels="iemocap4", rewards={"test_text_hash": 1.0}, sft_steps=2)
    resumed.on_load_checkpoint(checkpoint)
    with resumed.policy.reference() as ref:
        for name, value in ref.named_parameters():
            torch.testing.assert_close(value, snap.weights[name], atol=0, rtol=0)
