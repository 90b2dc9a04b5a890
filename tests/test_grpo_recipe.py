"""The paper's recipe as TRL runs it: mu > 1 optimizer steps per generation, schedules over the real
training length, the cold-start policy as the KL anchor with LoRA, and loss normalisation over an
accumulation window on several ranks (TRL 1.16 ``GRPOTrainer._compute_loss`` as the oracle)."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from emorl_pl import grpo
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.rewards import REWARDS, RewardSet, register_reward
from emorl_pl.schedules import lr_lambda, rl_progress, total_optimizer_steps

LABELS = ["neutral", "happy", "angry", "sad"]


def _hash_score(text: str) -> float:
    return (sum(map(ord, text)) % 7) / 6


if "test_recipe_hash" not in REWARDS:

    @register_reward("test_recipe_hash")
    class RecipeHashReward:
        """A reward that varies with the sampled text, so that every group has non-zero advantages."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [_hash_score(c) for c in completions]


@pytest.fixture(scope="module")
def model_dir(real_model_dir):
    return real_model_dir


def batches(n, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "waveforms": [0.1 * torch.randn(12000 + 2000 * j, generator=g) for j in range(B)],
            "sample_rate": 16000,
            "labels": [LABELS[(i + j) % 4] for j in range(B)],
            "keys": [f"u{i}_{j}" for j in range(B)],
            "texts": [None] * B,
            "corpus": ["mem"] * B,
            "meta": [{} for _ in range(B)],
        }
        for i in range(n)
    ]


def make_module(model_dir, lora=True, **kw):
    defaults = dict(
        labels="iemocap4", rewards={"test_recipe_hash": 1.0}, group_size=4, max_new_tokens=10,
        micro_batch_size=3, beta=0.04, gradient_clip_val=None,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
    )
    defaults.update(kw)
    return GRPOModule(AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8) if lora else None), **defaults)


def trainer(**kw):
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0)
    args.update(kw)
    return L.Trainer(**args)


def trainable(policy):
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------- mu > 1 (TRL semantics)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_mu_three_is_three_optimizer_steps_on_one_generation(model_dir, monkeypatch, lora):
    module = make_module(model_dir, lora=lora, num_iterations=3)
    module.policy.load()
    twin = copy.deepcopy(module.policy)  # the independent loop's policy, same initial weights
    before = trainable(module.policy)
    encoder_calls = []
    module.policy.hf_model.model.audio_tower.register_forward_hook(lambda *a: encoder_calls.append(1))
    rollouts, ratios = [], []
    real_rollout, real_loss = module.policy.rollout, grpo.grpo_loss

    def record_rollout(*a, **k):
        rollouts.append(real_rollout(*a, **k))
        return rollouts[-1]

    def record_loss(*a, **k):
        loss, stats = real_loss(*a, **k)
        ratios.append(float(stats.ratio_mean))
        return loss, stats

    monkeypatch.setattr(module.policy, "rollout", record_rollout)
    monkeypatch.setattr(grpo, "grpo_loss", record_loss)
    t = trainer(max_steps=3)
    t.fit(module, DataLoader(batches(1, B=2), batch_size=None))

    assert t.global_step == 3, "one batch with mu = 3 must give 3 optimizer steps"
    assert len(rollouts) == 1 and len(encoder_calls) == 1, "one generation, one audio-encoder call"
    # 8 rows in micro-batches of 3 -> 3 loss calls per step; on step 1 the ratio is exactly 1.
    assert len(ratios) == 9
    assert all(r == 1.0 for r in ratios[:3])
    assert any(abs(r - 1.0) > 1e-4 for r in ratios[3:6]), "the second step's ratio must depart from 1"

    # Independent loop: TRL's mu iterations written out, on the same completions.
    rollout = rollouts[0]
    G, eps, beta = 4, 0.2, 0.04
    rewards = torch.tensor([_hash_score(x) for x in rollout.texts]).view(-1, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    mask = rollout.completion_mask.float()
    with torch.no_grad():
        old = twin.completion_logps(rollout)
        ref = twin.completion_logps(rollout, reference=True)
    params = [p for p in twin.parameters() if p.requires_grad]
    for _ in range(3):
        logp = twin.completion_logps(rollout)
        ratio = torch.exp(logp - old)
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        d = ref - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= 0.2 * g
    ours, theirs = trainable(module.policy), trainable(twin)
    assert any(not torch.equal(ours[n], before[n]) for n in ours), "the steps must move the weights"
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_single_device_mu_dynamic_sampling_and_validation(model_dir, lora):
    """mu = 2, dynamic sampling (the 'neutral' utterance's group has equal rewards and is dropped), and a
    validation run, in one fit."""
    module = make_module(model_dir, lora=lora, num_iterations=2, dynamic_sampling=True, gradient_clip_val=1e6,
                         rewards={"test_recipe_neutral_constant": 1.0})
    logged = []
    t = trainer(max_steps=4, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None,
                callbacks=[_Record(logged)])
    t.fit(module, DataLoader(batches(2, B=2), batch_size=None), DataLoader(batches(1, B=2, seed=9), batch_size=None))
    assert t.global_step == 4
    # batch 0 holds neutral + happy, batch 1 happy + angry: 1 dropped group, then none
    assert [m["dynamic_sampling/dropped_groups"] for m in logged] == [1.0, 0.0]
    assert all(m["grad_norm"] > 0 for m in logged)
    assert "val/ua" in t.callback_metrics and "val/format_rate" in t.callback_metrics


class _Record(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.append({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})


if "test_recipe_neutral_constant" not in REWARDS:

    @register_reward("test_recipe_neutral_constant")
    class NeutralConstantReward:
        """0.5 for every sample of a 'neutral' utterance (its group is dropped by dynamic sampling), a text
        score otherwise."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [0.5 if g == "neutral" else _hash_score(c) for c, g in zip(completions, labels)]


# ------------------------------------------------------------------------- schedules over real length
@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(max_steps=10, max_epochs=None, batches_per_epoch=None), 10),
        (dict(max_steps=-1, max_epochs=3, batches_per_epoch=10), 30),
        (dict(max_steps=-1, max_epochs=3, batches_per_epoch=10, accumulate_grad_batches=4), 9),  # ceil(10/4) * 3
        (dict(max_steps=-1, max_epochs=2, batches_per_epoch=8, accumulate_grad_batches=2, num_iterations=3), 24),
        # 2 epochs x 4 windows = 8 windows: 2 supervised steps, then 6 windows x mu 3
        (dict(max_steps=-1, max_epochs=2, batches_per_epoch=8, accumulate_grad_batches=2, num_iterations=3,
              sft_steps=2), 2 + 18),
        (dict(max_steps=5, max_epochs=3, batches_per_epoch=10), 5),  # whichever ends first
        (dict(max_steps=-1, max_epochs=-1, batches_per_epoch=10), None),
        (dict(max_steps=-1, max_epochs=2, batches_per_epoch=float("inf")), None),
    ],
)
def test_total_optimizer_steps(kw, expected):
    assert total_optimizer_steps(**kw) == expected


def test_lr_lambda_and_progress_by_hand():
    fn = lr_lambda("linear", 2, 10)
    assert [fn(s) for s in (0, 1, 2, 6, 10, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    cos = lr_lambda("cosine", 0, 4)
    assert cos(2) == pytest.approx(0.5) and cos(4) == pytest.approx(0.0)
    assert rl_progress(7, 12, sft_steps=2) == 0.5 and rl_progress(1, 12, sft_steps=2) == 0.0
    assert rl_progress(5, None) == 0.0


def test_max_epochs_with_accumulation_schedules_lr_and_alpha_over_optimizer_steps(model_dir, monkeypatch):
    """4 batches, k = 2, one epoch: 2 optimizer steps. The linear LR must reach 0 and the ESWR alpha
    progress of the second window must be 1/2 (counting batches it would be 2/4 of 4 'steps' = wrong)."""
    module = make_module(model_dir, accumulate_grad_batches=2, lr_schedule="linear",
                         rewards={"eswr": {"weight": 1.0, "alpha_schedule": "linear"}, "test_recipe_hash": 1.0})
    progress = []
    real = RewardSet.__call__

    def record(self, completions, labels, **columns):
        progress.append(columns["progress"])
        return real(self, completions, labels, **columns)

    monkeypatch.setattr(RewardSet, "__call__", record)
    t = trainer(max_epochs=1, max_steps=-1)
    t.fit(module, DataLoader(batches(4, B=2), batch_size=None))
    assert t.global_step == 2
    assert module.total_steps() == 2
    assert progress == [0.0, 0.0, 0.5, 0.5]
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0)


# ------------------------------------------------------------------------- the KL anchor after SFT (LoRA)
def test_lora_reference_after_cold_start_is_the_cold_start_policy(model_dir, tmp_path, monkeypatch):
    module = make_module(model_dir, sft_steps=2, sft_lr=0.05, beta=0.04, num_iterations=1)
    kls = []
    real_loss = grpo.grpo_loss

    def record(*a, **k):
        loss, stats = real_loss(*a, **k)
        kls.append(float(stats.kl))
        return loss, stats

    monkeypatch.setattr(grpo, "grpo_loss", record)
    t = trainer(max_steps=3)
    t.fit(module, DataLoader(batches(3, B=2), batch_size=None))
    monkeypatch.undo()
    assert kls and all(k == 0.0 for k in kls), f"KL at the first RL step must be 0, got {kls}"

    # Resume: a fresh module restoring the checkpoint has the same reference (the folded cold start).
    ckpt = tmp_path / "step3.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["emorl_folded_adapters"], "the folded cold-start adapters must be in the checkpoint"
    fresh = make_module(model_dir, sft_steps=2)
    fresh.policy.load()
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"], strict=False)
    prompts = module.policy.build_prompts(batches(1)[0]["waveforms"], 16000, module.instruction)
    rollout = module.policy.rollout(prompts, 2, max_new_tokens=6)
    with torch.no_grad():
        for reference in (True, False):
            a = module.policy.completion_logps(rollout, reference=reference)
            b = fresh.policy.completion_logps(rollout, reference=reference)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # And it is not the untrained base: the cold start moved it.
    base = AudioLMPolicy(model_dir).load()
    with torch.no_grad():
        c = base.completion_logps(rollout)
    assert (c - a).abs().max() > 1e-4


# --------------------------------------------------- loss normalisation vs TRL over a window on 2 ranks
def _trl_per_token_loss(logps, old, ref, adv, beta=0.04, eps_low=0.2, eps_high=0.28):
    """TRL 1.16 ``_compute_loss``: coef_1 = exp(logp - old), per_token_loss = -min(coef_1 A, coef_2 A) + beta kl."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    d = ref - logps
    return per_token_loss + beta * (torch.exp(d) - d - 1)


def _trl_loss(loss_type, logps, old, ref, adv, mask, accum, num_items, num_processes, max_len):
    """TRL 1.16's aggregation for one per-device batch (one accumulation step)."""
    ptl = _trl_per_token_loss(logps, old, ref, adv)
    if loss_type == "grpo":
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
    if loss_type == "bnpo":
        return (ptl * mask).sum() / mask.sum().clamp(min=1.0) / accum
    if loss_type == "dr_grpo":
        return (ptl * mask).sum() / (ptl.size(0) * max_len) / accum
    return (ptl * mask).sum() / (num_items / num_processes)


def _window(seed, ranks=2, steps=2, rows=6, T=7, D=5):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(ranks):
        per_rank = []
        for _ in range(steps):
            feats = torch.randn(rows, T, D, generator=g, dtype=torch.float64)
            lengths = torch.randint(1, T + 1, (rows,), generator=g)
            mask = (torch.arange(T)[None] < lengths[:, None]).double()
            per_rank.append(dict(feats=feats, mask=mask, adv=torch.randn(rows, generator=g, dtype=torch.float64),
                                 old_shift=0.3 * torch.randn(rows, T, generator=g, dtype=torch.float64),
                                 ref_shift=0.2 * torch.randn(rows, T, generator=g, dtype=torch.float64)))
        data.append(per_rank)
    return data


def _logps(theta, b):
    return -torch.nn.functional.softplus(b["feats"] @ theta)


def _ours(loss_type, theta0, data, micro=3, max_len=7):
    """The module's scheme: each rank backpropagates micro-batches with ``loss_normalizer`` counts over
    the window; DDP then averages the ranks' gradients."""
    R, k = len(data), len(data[0])
    window_tokens = sum(float(b["mask"].sum()) for r in data for b in r)
    window_rows = sum(0.0 if b.get("dropped") else float(b["mask"].shape[0]) for r in data for b in r)
    grads = []
    for per_rank in data:
        theta = theta0.clone().requires_grad_(True)
        for b in per_rank:
            norm = grpo.loss_normalizer(loss_type, step_tokens=float(b["mask"].sum()), window_sequences=window_rows,
                                        window_tokens=window_tokens, world_size=R, num_steps=k)
            for rows in torch.arange(b["mask"].shape[0]).split(micro):
                logps = _logps(theta, b)[rows]
                old = (_logps(theta0, b) + b["old_shift"])[rows]
                ref = (_logps(theta0, b) + b["ref_shift"])[rows]
                loss, _ = grpo.grpo_loss(logps, old, ref, b["adv"][rows], b["mask"][rows], beta=0.04,
                                         epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                         max_completion_length=max_len, **norm)
                loss.backward()
        grads.append(theta.grad)
    return torch.stack(grads).mean(0)


def _trl(loss_type, theta0, data, max_len=7):
    """TRL: per-device batch = one rank's batch of one accumulation step; num_items over the window."""
    R, k = len(data), len(data[0])
    num_items = sum(float(b["mask"].sum()) for r in data for b in r)
    grads = []
    for per_rank in data:
        theta = theta0.clone().requires_grad_(True)
        for b in per_rank:
            logps = _logps(theta, b)
            loss = _trl_loss(loss_type, logps, _logps(theta0, b) + b["old_shift"], _logps(theta0, b) + b["ref_shift"],
                             b["adv"], b["mask"], k, num_items, R, max_len)
            loss.backward()
        grads.append(theta.grad)
    return torch.stack(grads).mean(0)


def _one_process(loss_type, theta0, data, max_len=7):
    """One process over the whole window, one batch: the loss TRL's normalisation reproduces."""
    batches = [b for r in data for b in r]
    theta = theta0.clone().requires_grad_(True)
    logps = torch.cat([_logps(theta, b) for b in batches])
    old = torch.cat([_logps(theta0, b) + b["old_shift"] for b in batches])
    ref = torch.cat([_logps(theta0, b) + b["ref_shift"] for b in batches])
    adv = torch.cat([b["adv"] for b in batches])
    mask = torch.cat([b["mask"] for b in batches])
    ptl = _trl_per_token_loss(logps, old, ref, adv) * mask
    loss = {"grpo": (ptl.sum(-1) / mask.sum(-1)).mean(), "dr_grpo": ptl.sum() / (mask.shape[0] * max_len),
            "dapo": ptl.sum() / mask.sum()}[loss_type]
    loss.backward()
    return theta.grad


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_window_normalisation_equals_trl_on_two_ranks(loss_type):
    theta0 = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = _window(seed=3)  # 2 ranks x 2 accumulation steps x 6 rows, micro-batches of 3 (2 per step)
    ours = _ours(loss_type, theta0, data)
    torch.testing.assert_close(ours, _trl(loss_type, theta0, data), atol=1e-6, rtol=0)
    if loss_type != "bnpo":  # bnpo normalises per local batch, so it has no single-batch equivalent
        torch.testing.assert_close(ours, _one_process(loss_type, theta0, data), atol=1e-6, rtol=0)
    assert ours.abs().max() > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_a_rank_that_drops_every_group_adds_nothing(loss_type):
    """Dynamic sampling: rank 0 drops every group (zero-weight rows), rank 1 none. The averaged gradient
    equals one process over rank 1's window alone."""
    theta0 = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    data = _window(seed=4)
    for b in data[0]:
        b["mask"] = torch.zeros_like(b["mask"])
        b["dropped"] = True
    ours = _ours(loss_type, theta0, data)
    alone = _one_process(loss_type, theta0, [data[1]])
    torch.testing.assert_close(ours, alone, atol=1e-6, rtol=0)
    assert math.isfinite(float(ours.abs().max())) and ours.abs().max() > 1e-3
