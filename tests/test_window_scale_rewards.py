"""``scale_rewards: batch`` divides the advantages by the reward std of TRL's generation batch: every batch of
an accumulation window (k = ``accumulate_grad_batches``) on every rank, not one dataloader batch.

The oracle is TRL 1.16.0's own code, copied below from ``trl/trainer/utils.py`` and
``trl/trainer/grpo_trainer.py`` (``GRPOTrainer._generate_and_score_completions``, the advantages from the
gathered rewards), with ``self`` a namespace of the settings it reads. TRL's generation batch on a process is
its ``per_device_train_batch_size x steps_per_generation`` prompts (steps_per_generation defaults to the
accumulation steps), generated at once and gathered over the processes: here the k batches of one window on
each of 2 ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from emorl_pl import grpo
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.rewards import REWARDS, register_reward

G, B, K = 4, 2, 2  # group size, utterances per batch, batches per window
LABELS = ("neutral", "happy", "angry", "sad")


# ------------------------------------------------------------------------------- TRL 1.16.0, verbatim
# trl 1.16.0 trl/trainer/utils.py::nanstd, lines 1021-1054
def nanstd(tensor: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> torch.Tensor:
    """
    Compute the standard deviation of a tensor, ignoring NaNs.

    Args:
        tensor (`torch.Tensor`):
            Input tensor.
        dim (`int` or `tuple[int, ...]`, *optional*):
            Dimension(s) to reduce. Defaults to all dimensions.
        keepdim (`bool`, *optional*, defaults to `False`):
            Whether to keep reduced dimensions.

    Returns:
        `torch.Tensor`:
            Standard deviation of the tensor, ignoring NaNs.
    """
    # Compute variance ignoring NaNs
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)  # count of non-NaN values
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction  # Bessel's correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    if dim is None:
        return std.squeeze()
    if isinstance(dim, int):
        return std.squeeze(dim)
    dims = [(d if d >= 0 else d + std.ndim) for d in dim]
    for d in sorted(dims, reverse=True):
        std = std.squeeze(d)
    return std


def trl_advantages(self, rewards_per_func, prompts, mode, device):
    # trl 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, lines 2754-2818.
    # rewards_per_func: every process's rewards, gathered (TRL: ``_calculate_rewards`` ends with gather);
    # prompts: this process's generation batch (its length is all the slice reads).
    num_generations = self.num_generations if mode == "train" else self.num_generations_eval

    # A completion for which every reward function returned None is unscorable. nansum would collapse it to 0,
    # which both biases the per-group baseline and hands the completion a spurious advantage. Mark these rows NaN
    # so they're excluded from the (nan-aware) baseline below; their advantage is forced to 0 afterwards.
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)

    if self.multi_objective_aggregation == "sum_then_normalize":
        # Apply weights to each reward function's output and sum
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if self.scale_rewards in ["group", "none"]:
            # If self.scale_rewards = "none", we'll only use std_rewards to check for zero std for logging
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:  # doesn't occur during training, but could occur in eval when num_generations_eval=1
                std_rewards = torch.zeros_like(rewards)
        elif self.scale_rewards == "batch":
            # Compute global std
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:  # doesn't occur during training, but could occur in eval when num_generations_eval=batch_size=1
                std_rewards = torch.zeros_like(rewards)
        else:
            raise ValueError(
                f"Invalid value for scale_rewards: {self.scale_rewards}. Must be one of 'batch', 'group', or 'none'."
            )

        advantages = rewards - mean_grouped_rewards
        if self.scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging

    elif self.multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, len(self.reward_funcs))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, len(self.reward_funcs))
        rewards = (reward_k * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging  # noqa: F841

    else:
        raise ValueError(
            f"Invalid multi_objective_aggregation: {self.multi_objective_aggregation}. Must be "
            "'sum_then_normalize' or 'normalize_then_sum'."
        )

    # Unscorable completions (every reward func returned None) carry no learning signal: their reward is NaN here,
    # so zero their advantage to keep them from moving the policy.
    advantages = torch.nan_to_num(advantages, nan=0.0)

    # Slice to keep only the local part of the data
    process_slice = slice(
        self.accelerator.process_index * len(prompts),
        (self.accelerator.process_index + 1) * len(prompts),
    )
    all_process_advantages = advantages.clone()  # keep the aggregated advantages for logging  # noqa: F841
    advantages = advantages[process_slice]
    return advantages


def trl_settings(process_index: int, scale_rewards: str = "batch") -> SimpleNamespace:
    """The attributes of ``GRPOTrainer`` (``self``) the copied code reads: one reward function, weight 1."""
    return SimpleNamespace(num_generations=G, num_generations_eval=G, multi_objective_aggregation="sum_then_normalize",
                           scale_rewards=scale_rewards, reward_weights=torch.ones(1),
                           accelerator=SimpleNamespace(process_index=process_index))


def trl_window_advantages(rank_rewards: list[torch.Tensor], scale_rewards: str = "batch") -> list[torch.Tensor]:
    """Each process's advantages: TRL gathers every process's generation batch (rank order), then slices."""
    gathered = torch.cat(rank_rewards).unsqueeze(1)  # (N_all, 1 reward function)
    return [trl_advantages(trl_settings(r, scale_rewards), gathered, [None] * len(x), "train", "cpu")
            for r, x in enumerate(rank_rewards)]


# ------------------------------------------------------------------------------- the pure pieces
def test_batch_reward_std_over_ranks_of_any_size_is_trls_nanstd():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(12, generator=g) * 3, torch.rand(20, generator=g), torch.rand(4, generator=g) - 2]
    parts[1][[3, 7]] = float("nan")  # unscorable completions: left out, as TRL's nanstd does
    flat = [p.double() for p in parts]
    mean = sum(torch.nansum(f) for f in flat) / sum((~torch.isnan(f)).sum() for f in flat)

    def others_all_reduce(rank: int):
        """An all-reduce seen from ``rank``: adds what the other ranks contribute to each of the two rounds
        (valid count and sum, then squared deviations from the global mean)."""
        others = [f for i, f in enumerate(flat) if i != rank]

        def reduce(t: torch.Tensor) -> None:
            if t.numel() == 2:
                t += torch.stack([sum((~torch.isnan(f)).sum().double() for f in others),
                                  sum(torch.nansum(f) for f in others)])
            else:
                t += sum(torch.nansum((f - mean) ** 2) for f in others)

        return reduce

    expected = nanstd(torch.cat(parts))
    for rank, x in enumerate(parts):
        torch.testing.assert_close(grpo.batch_reward_std(x, all_reduce=others_all_reduce(rank)), expected,
                                   rtol=1e-6, atol=0)
    torch.testing.assert_close(grpo.batch_reward_std(torch.cat(parts)), expected, rtol=1e-6, atol=0)
    assert float(grpo.batch_reward_std(torch.tensor([0.3, float("nan")]))) == 0.0  # one valid reward: no spread


def test_window_advantages_equal_trls_generation_batch_in_one_process():
    """One process, k = 2 batches: each batch's advantages with the window's std are TRL's over the
    concatenated generation batch; the per-batch std (the old behaviour) is not."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(B * G, generator=g), 4 * torch.rand(B * G, generator=g)]
    std = grpo.batch_reward_std(torch.cat(batches))
    ours = torch.cat([grpo.group_advantages(r, G, scale="batch", batch_std=std) for r in batches])
    (expected,) = trl_window_advantages([torch.cat(batches)])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    per_batch = torch.cat([grpo.group_advantages(r, G, scale="batch") for r in batches])
    assert (per_batch - expected).abs().max() > 0.1
    with pytest.raises(ValueError, match="batch_std applies to scale='batch' only"):
        grpo.group_advantages(batches[0], G, scale="group", batch_std=std)


# ----------------------------------------------------------------------- the module on 2 ranks, k = 2
def _hash_score(text: str) -> float:
    return (sum(map(ord, text)) % 7) / 6


if "test_window_scaled_hash" not in REWARDS:

    @register_reward("test_window_scaled_hash")
    class WindowScaledHash:
        """Varies with the text, times a factor per (rank, batch) read from the key: every batch of the
        window, on every rank, has its own spread, so the window's std is none of theirs."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [_hash_score(c) * float(k.split(":")[1]) for c, k in zip(completions, columns["key"])]


def _batches(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(10 + rank)
    scales = {(0, 0): 1.0, (0, 1): 4.0, (1, 0): 0.5, (1, 1): 9.0}
    return [{"waveforms": [0.1 * torch.randn(6000 + 2000 * j, generator=g) for j in range(B)], "sample_rate": 16000,
             "labels": [LABELS[(b + j) % 4] for j in range(B)],
             "keys": [f"r{rank}b{b}u{j}:{scales[rank, b]}" for j in range(B)], "texts": [None] * B,
             "corpus": ["mem"] * B, "meta": [{} for _ in range(B)]} for b in range(K)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(rank: int, port: int, world_size: int = 2) -> None:
    """This spawned process as rank ``rank`` of a job Lightning did not launch (it then launches nothing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)


def ddp_trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, use_distributed_sampler=False)
    return L.Trainer(**{**args, **kw})


def _worker(rank: int, model_dir: str, out: str, port: int) -> None:
    ddp_env(rank, port)
    module = GRPOModule(
        AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
        rewards={"test_window_scaled_hash": 1.0}, group_size=G, max_new_tokens=6, micro_batch_size=3, beta=0.0,
        scale_rewards="batch", accumulate_grad_batches=K, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    used, real_loss = [], grpo.grpo_loss

    def recording_loss(logps, old, ref, advantages, mask, **kw):
        used.append(advantages.tolist())
        return real_loss(logps, old, ref, advantages, mask, **kw)

    grpo.grpo_loss = recording_loss
    generations, real_generate = [], module._generate

    def recording_generate(batch):
        generations.append(real_generate(batch))
        return generations[-1]

    module._generate = recording_generate
    trainer = ddp_trainer(max_steps=1)
    trainer.fit(module, DataLoader(_batches(rank), batch_size=None))
    record = module.last_rollout
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rewards": torch.cat([g.rewards for g in generations]).tolist(), "used": used, "steps": trainer.global_step,
        "record": {"keys": list(record.keys), "advantages": list(record.advantages), "rewards": record.scored.total},
    }))


@pytest.mark.slow
def test_module_window_advantages_on_two_ranks_equal_trls(toy_model_dir, tmp_path):
    mp.start_processes(_worker, args=(toy_model_dir, str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in runs] == [1, 1]
    rewards = [torch.tensor(r["rewards"]) for r in runs]
    assert [len(x) for x in rewards] == [K * B * G] * 2
    expected = trl_window_advantages(rewards)
    for rank, run in enumerate(runs):
        # micro-batches of 3 rows, in window order: each row's advantage as the loss received it
        used = torch.tensor([a for call in run["used"] for a in call])
        torch.testing.assert_close(used, expected[rank], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        # the logging record covers the window (both batches, in order) with the advantages the loss used
        record = run["record"]
        assert [k.split(":")[0] for k in record["keys"]] == [f"r{rank}b{b}u{j}" for b in range(K) for j in range(B)]
        assert torch.equal(torch.tensor(record["rewards"]), rewards[rank])
        assert torch.equal(torch.tensor(record["advantages"]), used)
    # Not a vacuous comparison: the old std (one dataloader batch, both ranks) gives other advantages.
    old = [[] for _ in runs]
    for b in range(K):
        part = [x[b * B * G:(b + 1) * B * G] for x in rewards]
        for rank, adv in enumerate(trl_window_advantages(part)):
            old[rank].append(adv)
    assert max(float((torch.cat(o) - e).abs().max()) for o, e in zip(old, expected)) > 0.1
