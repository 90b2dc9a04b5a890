"""Train / inference mismatch: rollouts sampled by an inference engine (vLLM) carry the engine's per-token
log-probs, and the trainer weights the surrogate loss by TRL 1.16's importance-sampling ratio.

The oracle is TRL 1.16.0's own code, copied below from ``trl/trainer/grpo_trainer.py`` with ``self`` a
namespace of the settings it reads (single process, one accumulation step): the ratio and its metrics from
``GRPOTrainer._generate_and_score_completions`` and the loss from ``GRPOTrainer._compute_loss``."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from emorl_pl import grpo
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.rewards import REWARDS, register_reward

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# ------------------------------------------------------------------------------- TRL 1.16.0, verbatim
def nanmin(tensor: torch.Tensor) -> torch.Tensor:
    # trl 1.16.0 trl/trainer/utils.py::nanmin
    if torch.isnan(tensor).all():
        return torch.tensor(float("nan"), dtype=tensor.dtype, device=tensor.device)
    return torch.min(tensor[~torch.isnan(tensor)])


def nanmax(tensor: torch.Tensor) -> torch.Tensor:
    # trl 1.16.0 trl/trainer/utils.py::nanmax
    if torch.isnan(tensor).all():
        return torch.tensor(float("nan"), dtype=tensor.dtype, device=tensor.device)
    return torch.max(tensor[~torch.isnan(tensor)])


def trl_settings(mode="sequence_mask", clip_max=3.0, clip_min=None, correction=True, loss_type="grpo", beta=0.04,
                 epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token", max_completion_length=7):
    """The attributes of ``GRPOTrainer`` (``self``) the copied code reads; use_vllm is what makes TRL correct.
    ``use_bias_correction_kl=False``: this project's KL term is TRL's without that (newer) reweighting."""
    return SimpleNamespace(
        use_vllm=True, vllm_importance_sampling_correction=correction, vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max, vllm_importance_sampling_clip_min=clip_min,
        loss_type=loss_type, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level, off_policy_mask_threshold=None,
        max_completion_length=max_completion_length, current_gradient_accumulation_steps=1,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda t: t.reshape(1)),
        model=SimpleNamespace(training=True), _metrics={"train": {}},
    )


def trl_importance_sampling_ratio(self, old_per_token_logps, sampling_per_token_logps, completion_mask,
                                  tool_mask=None):
    # trl 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, lines 2660-2707
    # Compute the importance sampling ratio when using vLLM, to correct for potential distribution mismatch
    if self.use_vllm and self.vllm_importance_sampling_correction:
        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
        # Tokens whose sampling logprob was NaN (unavailable from vLLM) get a zero difference, so their
        # importance ratio is exactly 1 (no correction) rather than propagating NaN through the loss.
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)

        sequence_level_is = self.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]
        if sequence_level_is:
            per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
            logps_diff = per_sequence_logps_diff
        else:
            logps_diff = per_token_logps_diff

        vllm_importance_sampling_ratio = torch.exp(logps_diff)

        # vllm_importance_sampling_ratio.shape:
        #   token_* modes:     (B, T)  (per-token ratio)
        #   sequence_* modes:  (B, 1)  (per-sequence ratio)

        if self.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
            vllm_importance_sampling_ratio = torch.clamp(
                vllm_importance_sampling_ratio,
                min=self.vllm_importance_sampling_clip_min,
                max=self.vllm_importance_sampling_clip_max,
            )
        elif self.vllm_importance_sampling_mode in ["sequence_mask", "token_mask"]:
            min_val = (
                self.vllm_importance_sampling_clip_min
                if self.vllm_importance_sampling_clip_min is not None
                else -math.inf
            )
            max_val = (
                self.vllm_importance_sampling_clip_max
                if self.vllm_importance_sampling_clip_max is not None
                else math.inf
            )

            invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (
                vllm_importance_sampling_ratio > max_val
            )
            vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(
                invalid_mis_mask, value=0.0
            )
        else:
            raise ValueError(
                f"Unknown vLLM importance sampling level: {self.vllm_importance_sampling_mode}. Possible values are 'token_truncate', 'token_mask', 'sequence_truncate', and 'sequence_mask'."
            )
        return vllm_importance_sampling_ratio, sequence_level_is
    return None, False


def trl_mismatch_metrics(self, old_per_token_logps, sampling_per_token_logps, completion_mask,
                         vllm_importance_sampling_ratio, sequence_level_is, tool_mask=None):
    # trl 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, lines 2860-2896
    device, mode = old_per_token_logps.device, "train"
    self._metrics[mode] = {k: [] for k in (
        "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
        "sampling/importance_sampling_ratio/max")}
    if self.use_vllm and self.vllm_importance_sampling_correction:
        delta = torch.abs(old_per_token_logps - sampling_per_token_logps)
        mask = completion_mask.bool() if tool_mask is None else (completion_mask * tool_mask).bool()
        # Tokens vLLM could not score carry NaN, so exclude them rather than let them turn the reported
        # divergence into NaN. Counting them as zero instead would understate the divergence.
        delta = delta[mask & ~torch.isnan(delta)]
        mean_delta = torch.mean(delta) if delta.numel() > 0 else torch.tensor(0.0, device=device)
        max_delta = torch.max(delta) if delta.numel() > 0 else torch.tensor(0.0, device=device)
        self._metrics[mode]["sampling/sampling_logp_difference/mean"].append(
            self.accelerator.gather(mean_delta).mean().item()
        )
        self._metrics[mode]["sampling/sampling_logp_difference/max"].append(
            self.accelerator.gather(max_delta).max().item()
        )
        if sequence_level_is:
            flat_is_ratio = vllm_importance_sampling_ratio.flatten()
        else:
            flat_is_ratio = vllm_importance_sampling_ratio[mask]

        min_importance_sampling_ratio = (
            torch.min(flat_is_ratio) if flat_is_ratio.numel() > 0 else torch.tensor(0.0, device=device)
        )
        mean_importance_sampling_ratio = (
            torch.mean(flat_is_ratio) if flat_is_ratio.numel() > 0 else torch.tensor(0.0, device=device)
        )
        max_importance_sampling_ratio = (
            torch.max(flat_is_ratio) if flat_is_ratio.numel() > 0 else torch.tensor(0.0, device=device)
        )
        self._metrics[mode]["sampling/importance_sampling_ratio/min"].append(
            nanmin(self.accelerator.gather(min_importance_sampling_ratio)).item()
        )
        self._metrics[mode]["sampling/importance_sampling_ratio/mean"].append(
            self.accelerator.gather(mean_importance_sampling_ratio).nanmean().item()
        )
        self._metrics[mode]["sampling/importance_sampling_ratio/max"].append(
            nanmax(self.accelerator.gather(max_importance_sampling_ratio)).item()
        )
    return {k: v[0] for k, v in self._metrics[mode].items()}


def trl_compute_loss(self, inputs, per_token_logps, mask):
    # trl 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss (def at line 3020), lines 3055-3193,
    # with the branches of settings not used here (entropy mask, off-policy mask, cispo / sapo / vespo / luspo
    # losses, entropy bonus, aux loss, metrics) elided.
    entropy_mask = None

    # Compute the loss
    advantages = inputs["advantages"]
    # In the base GRPO implementation, advantages are expected to have shape (B,). To support subclasses that
    # provide advantages with shape (B, T), we *conditionally* unsqueeze the tensor.
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    # When num_iterations == 1 and steps_per_generation <= gradient_accumulation_steps,
    # old_per_token_logps == per_token_logps. In this case we can skip its computation
    # (see _generate_and_score_completions) and instead use per_token_logps.detach().
    # The exception is when using vLLM, where we always compute old_per_token_logps
    # for importance sampling
    old_per_token_logps = inputs.get("old_per_token_logps")
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

    log_ratio = per_token_logps - old_per_token_logps
    if self.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif self.importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    else:
        raise ValueError(
            f"Unknown importance sampling level: {self.importance_sampling_level}. Possible values are 'token' "
            "and 'sequence'."
        )

    coef_1 = torch.exp(log_importance_weights)

    # Compute the KL divergence between the model and the reference model
    if self.beta != 0.0:
        ref_per_token_logps = inputs["ref_per_token_logps"]
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        # Importance sampling correction for the KL divergence
        if self.args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    # From here, log_importance_weights (and all subsequent tensors, coef_1, coef_2, etc.) shape depends on
    # importance_sampling_level: "token" level: (B, T); "sequence" level: (B, 1)
    if self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        # Two-sided clipping
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)

        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    else:
        raise ValueError(f"Unknown loss type: {self.loss_type}")

    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask

    if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
        per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]

    if self.beta != 0.0:
        per_token_loss = per_token_loss + self.beta * per_token_kl

    mode = "train" if self.model.training else "eval"
    if self.loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
        loss = loss / normalizer
    elif self.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
        loss = loss / normalizer
    elif self.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
        loss = loss / normalizer
    elif self.loss_type in ["cispo", "dapo", "vespo"]:
        # `num_items_in_batch` spans the generation batch, so rescale it to one accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # in eval, the batch is neither split across steps nor accumulated
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
    return loss


# ------------------------------------------------------------------------------------ random inputs
def mismatch_inputs(seed=0, N=7, T=9):
    """float64 trainer / engine log-probs with right-padded masks: row 0 a sequence ratio far above 3,
    row 1 far below 0.5, single tokens above / below those bounds, an empty row, an engine NaN and
    garbage (NaN, -inf, huge) on masked positions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 5, 4, 0, 7, 3, 1])[:N]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # long, as TRL's completion_mask
    old = -3.0 * torch.rand(N, T, generator=g, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(N, T, generator=g, dtype=torch.float64)
    sampling[0] = old[0] - 0.4  # sum diff 0.4 * 9 = 3.6: ratio 36.6
    sampling[1, :5] = old[1, :5] + 0.4  # sum diff -2: ratio 0.135
    sampling[2, 1] = old[2, 1] - 2.0  # token ratio 7.4
    sampling[4, 2] = old[4, 2] + 2.0  # token ratio 0.135
    sampling[4, 5] = float("nan")  # the engine could not score it: ratio 1, left out of the difference
    sampling[5, 6], sampling[2, 8], sampling[6, 4] = float("nan"), -float("inf"), 1e6  # masked garbage
    return old, sampling, mask


BOUNDS = [(3.0, None), (3.0, 0.5), (None, 0.5)]


@pytest.mark.parametrize(("clip_max", "clip_min"), BOUNDS, ids=["max", "max-min", "min"])
@pytest.mark.parametrize("mode", MODES)
def test_weights_and_metrics_equal_trl(mode, clip_max, clip_min):
    old, sampling, mask = mismatch_inputs()
    cfg = trl_settings(mode, clip_max, clip_min)
    expected, sequence_level = trl_importance_sampling_ratio(cfg, old, sampling, mask)
    ours = grpo.importance_sampling_correction(old, sampling, mask, mode, clip_max, clip_min)
    assert ours.shape == expected.shape == ((7, 1) if mode.startswith("sequence") else (7, 9))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # the inputs exercise every bound: some ratios were changed (zeroed or clamped) at each given bound
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    raw = torch.exp(diff.sum(-1, keepdim=True) if sequence_level else diff)
    sel = raw.flatten() if sequence_level else raw[mask.bool()]
    if clip_max is not None:
        assert (sel > clip_max).any()
    if clip_min is not None:
        assert (sel < clip_min).any()
    assert (expected != raw).any()
    assert torch.isfinite(ours).all()

    stats = grpo.importance_sampling_stats(old, sampling, mask, ours, mode, clip_max, clip_min)
    trl_metrics = trl_mismatch_metrics(cfg, old, sampling, mask, expected, sequence_level)
    for key, value in trl_metrics.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), key
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    changed = ((sel < low) | (sel > high)).double().mean()
    kind = "masked" if mode.endswith("_mask") else "truncated"
    assert float(stats[f"sampling/importance_sampling_ratio/{kind}_fraction"]) == pytest.approx(float(changed))
    assert 0 < float(changed) < 1


def test_metrics_of_an_empty_batch_are_zero_as_trl():
    old, sampling, mask = mismatch_inputs()
    mask = torch.zeros_like(mask)
    ratio = grpo.importance_sampling_correction(old, sampling, mask, "token_mask")
    stats = grpo.importance_sampling_stats(old, sampling, mask, ratio, "token_mask")
    expected = trl_mismatch_metrics(trl_settings("token_mask"), old, sampling, mask, ratio, False)
    assert expected == {k: float(v) for k, v in stats.items() if k in expected}
    assert float(stats["sampling/importance_sampling_ratio/masked_fraction"]) == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_and_gradient_equal_trl(mode, loss_type, level):
    old, sampling, mask = mismatch_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    N, T = old.shape
    base = old + 0.15 * torch.randn(N, T, generator=g, dtype=torch.float64)  # the current policy moved
    ref = old + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    cfg = trl_settings(mode, 3.0, 0.5, loss_type=loss_type, importance_sampling_level=level, max_completion_length=T)
    ratio, _ = trl_importance_sampling_ratio(cfg, old, sampling, mask)
    inputs = {"advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "importance_sampling_ratio": ratio, "num_items_in_batch": mask.sum()}
    theirs_logps = base.clone().requires_grad_(True)
    expected = trl_compute_loss(cfg, inputs, theirs_logps, mask)
    expected.backward()

    ours_logps = base.clone().requires_grad_(True)
    weights = grpo.importance_sampling_correction(old, sampling, mask, mode, 3.0, 0.5)
    loss, _ = grpo.grpo_loss(ours_logps, old, ref, adv, mask, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                             loss_type=loss_type, max_completion_length=T, importance_sampling_level=level,
                             num_items_in_batch=mask.sum() if loss_type == "dapo" else None,
                             importance_sampling_ratio=weights)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logps.grad, theirs_logps.grad, rtol=1e-12, atol=1e-12)

    # The weights matter here (so a loss without them fails the comparison), and without the argument the
    # loss is what it was: TRL's without the correction.
    plain, _ = grpo.grpo_loss(base, old, ref, adv, mask, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                              loss_type=loss_type, max_completion_length=T, importance_sampling_level=level,
                              num_items_in_batch=mask.sum() if loss_type == "dapo" else None)
    assert abs(float(plain.detach()) - float(expected.detach())) > 1e-3
    off = trl_settings(mode, correction=False, loss_type=loss_type, importance_sampling_level=level,
                       max_completion_length=T)
    torch.testing.assert_close(plain, trl_compute_loss(off, inputs, base, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(vllm_importance_sampling_mode="token"), r"vllm_importance_sampling_mode must be one of"),
    (dict(vllm_importance_sampling_clip_min=3.0), r"clip_min \(3.0\) must be less than .*clip_max \(3.0\)"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     r"at least one of vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"),
    (dict(vllm_importance_sampling_clip_max=-1.0), r"vllm_importance_sampling_clip_max must be None or a number"),
    (dict(vllm_importance_sampling_clip_min=float("nan")), r"vllm_importance_sampling_clip_min must be None"),
    (dict(vllm_importance_sampling_correction="yes"), r"vllm_importance_sampling_correction must be true or"),
])
def test_bad_settings_are_refused_at_construction(toy_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(AudioLMPolicy(toy_model_dir), **kwargs)


def test_defaults_are_trls():
    params = inspect.signature(GRPOModule).parameters
    assert params["vllm_importance_sampling_correction"].default is True
    assert params["vllm_importance_sampling_mode"].default == "sequence_mask"
    assert params["vllm_importance_sampling_clip_max"].default == 3.0
    assert params["vllm_importance_sampling_clip_min"].default is None


# ------------------------------------------------------------------------- a GRPOModule training step
def _hash_score(text: str) -> float:
    return (sum(map(ord, text)) % 7) / 6


if "test_is_hash" not in REWARDS:

    @register_reward("test_is_hash")
    class ISHashReward:
        """Varies with the sampled text, so that advantages are non-zero."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [_hash_score(c) for c in completions]


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"waveforms": [0.1 * torch.randn(8000 + 2000 * j, generator=g) for j in range(2)], "sample_rate": 16000,
            "labels": ["happy", "sad"], "keys": ["u0", "u1"], "texts": [None, None], "corpus": ["mem"] * 2,
            "meta": [{}, {}]}


def _perturbation(mask: torch.Tensor) -> torch.Tensor:
    """logp_engine - logp_trainer: small noise, and on the first token of rows 0 / 1 a shift whose ratio
    is far outside [0.5, 3] per token and per sequence (rows 2 / 3 are also shifted, on their last token)."""
    g = torch.Generator().manual_seed(5)
    delta = 0.05 * torch.randn(mask.shape, generator=g)
    delta[0, 0] -= 2.0  # ratio exp(+2) ~ 7.4
    delta[1, 0] += 2.0  # ratio exp(-2) ~ 0.14
    last = mask.sum(1).long() - 1
    delta[2, last[2]] -= 1.5
    delta[3, last[3]] += 1.5
    return delta


def _trainable(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("mode", "correction"), [
    ("sequence_mask", True), ("token_truncate", True), ("token_mask", True), ("sequence_mask", False),
])
def test_module_step_on_an_engine_rollout_equals_trl(toy_model_dir, monkeypatch, mode, correction):
    lr, beta, temperature = 0.5, 0.04, 0.9
    module = GRPOModule(
        AudioLMPolicy(toy_model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
        rewards={"test_is_hash": 1.0}, group_size=4, max_new_tokens=8, micro_batch_size=3, beta=beta,
        temperature=temperature, gradient_clip_val=None, optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        vllm_importance_sampling_correction=correction, vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=0.5,
    )
    module.policy.load()
    twin = copy.deepcopy(module.policy)  # TRL's loop runs on it, from the same weights
    before = _trainable(module.policy)
    real_rollout, rollouts = module.policy.rollout, []

    def engine_rollout(*args, **kwargs):
        """The trainer's own sample, as if an engine had drawn it with slightly different log-probs."""
        rollout = real_rollout(*args, **kwargs)
        with torch.no_grad():
            trainer_logps = module.policy.completion_logps(rollout, temperature=kwargs["temperature"])
        rollout.sampling_logps = trainer_logps + _perturbation(rollout.completion_mask)
        rollouts.append(rollout)
        return rollout

    monkeypatch.setattr(module.policy, "rollout", engine_rollout)
    run = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    run.fit(module, DataLoader([_batch()], batch_size=None))

    # TRL on the same completions: advantages, old / ref log-probs, the ratio, one SGD step.
    (rollout,) = rollouts
    mask = rollout.completion_mask.float()
    rewards = torch.tensor([_hash_score(t) for t in rollout.texts]).view(-1, 4)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    cfg = trl_settings(mode, 3.0, 0.5, correction=correction, beta=beta, epsilon_high=0.2,
                       max_completion_length=8)
    with torch.no_grad():
        old = twin.completion_logps(rollout, temperature=temperature)
        ref = twin.completion_logps(rollout, temperature=temperature, reference=True)
    ratio, sequence_level = trl_importance_sampling_ratio(cfg, old, rollout.sampling_logps, mask)
    inputs = {"advantages": adv, "ref_per_token_logps": ref, "importance_sampling_ratio": ratio}
    if correction:  # TRL computes old log-probs for the correction even with num_iterations == 1
        inputs["old_per_token_logps"] = old
    params = [p for p in twin.parameters() if p.requires_grad]
    loss = trl_compute_loss(cfg, inputs, twin.completion_logps(rollout, temperature=temperature), mask)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # TRL without the correction, on the same weights: the update the correction must change
    plain_cfg = trl_settings(mode, correction=False, beta=beta, epsilon_high=0.2, max_completion_length=8)
    plain_loss = trl_compute_loss(plain_cfg, {"advantages": adv, "ref_per_token_logps": ref},
                                  twin.completion_logps(rollout, temperature=temperature), mask)
    plain_grads = torch.autograd.grad(plain_loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g

    logged = {k: float(v) for k, v in run.callback_metrics.items()}
    assert logged["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    ours, theirs = _trainable(module.policy), _trainable(twin)
    assert any(not torch.equal(ours[n], before[n]) for n in ours), "the step must move the weights"
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=name)

    if not correction:
        assert not any(k.startswith("sampling/") for k in logged)
        return
    # the correction changed this update: TRL's step without it lands elsewhere
    differs = max(float((g - h).abs().max()) for g, h in zip(grads, plain_grads) if g is not None)
    assert differs > 1e-4
    assert (ratio != 1).any() and ((ratio == 0).any() if mode.endswith("_mask") else (ratio == 3.0).any())

    expected = trl_mismatch_metrics(cfg, old, rollout.sampling_logps, mask, ratio, sequence_level)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    kind = "masked" if mode.endswith("_mask") else "truncated"
    assert 0 < logged[f"sampling/importance_sampling_ratio/{kind}_fraction"] < 1


if "test_is_hash_neutral_constant" not in REWARDS:

    @register_reward("test_is_hash_neutral_constant")
    class ISHashNeutralConstant:
        """Constant for gold 'neutral' (that group is dropped by dynamic sampling), text-dependent otherwise."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [0.5 if g == "neutral" else _hash_score(c) for c, g in zip(completions, labels)]


@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
def test_window_metrics_span_its_batches_and_leave_dropped_rows_out(toy_model_dir, monkeypatch, mode):
    """Two batches per window, of different completion lengths and with EOS inside some rows; dynamic
    sampling drops the 'neutral' group of the first. The logged metrics are TRL's over the window's kept
    rows, padded to the longest batch as TRL pads its generation batch (at sequence level a dropped row would
    otherwise count as a ratio of 1)."""
    module = GRPOModule(
        AudioLMPolicy(toy_model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
        rewards={"test_is_hash_neutral_constant": 1.0}, group_size=4, max_new_tokens=8, micro_batch_size=3,
        beta=0.0, dynamic_sampling=True, accumulate_grad_batches=2, vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    module.policy.load()
    twin = copy.deepcopy(module.policy)
    real_rollout, rollouts = module.policy.rollout, []
    eos, pad = module.policy.eos_token_ids[0], module.policy.pad_token_id

    def engine_rollout(*args, **kwargs):
        rollout = real_rollout(*args, **kwargs)
        if rollouts:  # the second batch: shorter, and rows 1 / 6 end early with an EOS
            ids, mask = rollout.completion_ids[:, :5].clone(), rollout.completion_mask[:, :5].clone()
            for row, end in ((1, 2), (6, 0)):
                ids[row, end], ids[row, end + 1:], mask[row, end + 1:] = eos, pad, 0
            rollout = dataclasses.replace(rollout, completion_ids=ids, completion_mask=mask)
        with torch.no_grad():
            trainer_logps = module.policy.completion_logps(rollout, temperature=kwargs["temperature"])
        rollout.sampling_logps = trainer_logps + _perturbation(rollout.completion_mask)
        rollouts.append(rollout)
        return rollout

    monkeypatch.setattr(module.policy, "rollout", engine_rollout)
    run = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    batches = [_batch(), _batch()]
    batches[0]["labels"] = ["neutral", "sad"]
    run.fit(module, DataLoader(batches, batch_size=None))
    assert len(rollouts) == 2 and run.global_step == 1

    keep = [torch.arange(4, 8), torch.arange(8)]  # the first batch's 'neutral' group is dropped
    width = max(r.completion_ids.shape[1] for r in rollouts)

    def padded(x, rows):
        return torch.nn.functional.pad(x[rows], (0, width - x.shape[1]))

    with torch.no_grad():
        old = torch.cat([padded(twin.completion_logps(r), k) for r, k in zip(rollouts, keep)])
    sampling = torch.cat([padded(r.sampling_logps, k) for r, k in zip(rollouts, keep)])
    mask = torch.cat([padded(r.completion_mask, k) for r, k in zip(rollouts, keep)])
    cfg = trl_settings(mode, 3.0, 0.5)
    ratio, sequence_level = trl_importance_sampling_ratio(cfg, old, sampling, mask)
    expected = trl_mismatch_metrics(cfg, old, sampling, mask, ratio, sequence_level)
    logged = {k: float(v) for k, v in run.callback_metrics.items()}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert math.isfinite(logged["loss"])
