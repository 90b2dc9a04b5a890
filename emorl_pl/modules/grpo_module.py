"""The GRPO LightningModule: sample groups, score them, update the policy; evaluate with SER metrics.

Thin on purpose: the math lives in ``emorl_pl.grpo``, the rewards in ``emorl_pl.rewards``, the
response formats in ``emorl_pl.reasoning`` and the model work in ``AudioLMPolicy``. This module
only orders the calls, handles micro-batching / accumulation, and logs.

One training step on a batch of B utterances:
  1. prompts (chat template + audio) -> audio encoded once -> G samples per utterance
  2. rewards (weighted ESWR + format, ...) -> group-relative advantages
  3. old / reference log-probs (no grad) when needed
  4. for each of ``num_iterations`` passes, micro-batches of sequences: policy log-probs ->
     clipped GRPO loss -> manual_backward; then clip, step, schedule.
An optional supervised warm-up (``sft_steps``) first teaches the response format (cold start).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from emorl_pl import grpo
from emorl_pl.cold_start import cold_start_target
from emorl_pl.emotions import get_label_set
from emorl_pl.metrics import SERMetrics
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.reasoning import check_mode, instruction, parse_response
from emorl_pl.rewards import RewardSet


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be constant, linear or cosine, got {schedule!r}")

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


class GRPOModule(L.LightningModule):
    """GRPO fine-tuning of an audio-LM for speech emotion recognition (EMO-RL).

    Args:
        policy: the audio-LM policy (loads weights lazily in ``configure_model``).
        labels: the label set (name such as ``iemocap4`` or a list); link it to the data's.
        mode: response mode ``esr`` (paper), ``eur`` or ``ir``.
        rewards: reward name -> weight, or name -> {weight, **options}; e.g.
            ``{eswr: {weight: 1.0, gamma: 0.7, alpha_schedule: linear}, format: 1.0}``.
        group_size: G samples per utterance (paper: 6).
        beta: KL weight to the reference policy; 0 skips the reference pass entirely.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see ``emorl_pl.grpo.grpo_loss``).
        scale_rewards: ``group``, ``batch`` or ``none`` advantage scaling.
        num_iterations: policy updates per generated batch (mu); > 1 keeps old log-probs.
        dynamic_sampling: drop groups whose rewards are all equal (DAPO); they carry no signal.
        micro_batch_size: sequences per forward/backward, to bound memory.
        accumulate_grad_batches: batches of prompts per optimizer step.
        sft_steps: supervised cold-start steps before GRPO (0 = none); ``sft_lr`` their LR.
        sampling_seed: sampling is seeded from (sampling_seed, step, accumulation index, rank), so a
            resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        policy: AudioLMPolicy,
        labels: str | list[str] = "iemocap4",
        mode: str = "esr",
        rewards: dict[str, Any] | None = None,
        group_size: int = 6,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 128,
        use_transcripts: bool = False,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "grpo",
        scale_rewards: str = "group",
        num_iterations: int = 1,
        mask_truncated: bool = False,
        dynamic_sampling: bool = False,
        micro_batch_size: int = 8,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        optimizer: OptimizerCallable = _adamw,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        sft_steps: int = 0,
        sft_lr: float | None = None,
        eval_max_new_tokens: int | None = None,
        sampling_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "optimizer"])
        self.policy = policy
        self.labels = get_label_set(labels)
        self.mode = check_mode(mode)
        self.reward_set = RewardSet(rewards if rewards is not None else {"eswr": 1.0, "format": 1.0}, self.labels, mode)
        if group_size < 2 and scale_rewards != "none":
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
        if beta < 0 or num_iterations < 1 or micro_batch_size < 1 or accumulate_grad_batches < 1:
            raise ValueError("beta >= 0, num_iterations >= 1, micro_batch_size >= 1, accumulate_grad_batches >= 1")
        if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")
        self.optimizer_factory = optimizer
        self.instruction = instruction(self.mode, self.labels)
        self.automatic_optimization = False
        # The checkpoint holds only trainable weights (LoRA); base weights come from the model dir.
        self.strict_loading = False
        self._eval_names: dict[str, list[str]] = {}
        self._accum = 0
        self._rl_started = False
        self._reference_dir: str | None = None

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        self.policy.load()
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            self.policy.shard(mesh)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = {"validate": ["val"], "test": ["test"]}
        if dm is not None and getattr(dm, "test_set_names", None):
            names["test"] = list(dm.test_set_names)
        if dm is not None and getattr(dm, "val_set_names", None):
            names["validate"] = list(dm.val_set_names)
        self._eval_names = names
        keys = [f"{prefix}__{name}" for prefix, key in (("val", "validate"), ("test", "test")) for name in names[key]]
        self.eval_metrics = torch.nn.ModuleDict({k: SERMetrics(self.labels) for k in keys})
        self.eval_format = torch.nn.ModuleDict({k: MeanMetric() for k in keys})

    def configure_optimizers(self):
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ValueError("the policy has no trainable parameters (check lora / freeze settings)")
        opt = self.optimizer_factory(params)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.hparams.lr_schedule, self.hparams.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ helpers
    def _progress(self) -> float:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:  # noqa: BLE001 - no length known: keep alpha at its start
                return 0.0
        steps_after_sft = max(0, total - self.hparams.sft_steps)
        return min(1.0, max(0, self.global_step - self.hparams.sft_steps) / max(1, steps_after_sft))

    def _prompts(self, batch: Mapping[str, Any]):
        texts = batch.get("texts") if self.hparams.use_transcripts else None
        return self.policy.build_prompts(batch["waveforms"], batch["sample_rate"], self.instruction, texts)

    def _optimizer_step(self) -> float:
        opt = self.optimizers()
        self._accum += 1
        if self._accum < self.hparams.accumulate_grad_batches:
            return float("nan")
        self._accum = 0
        clip = self.hparams.gradient_clip_val
        grad_norm = float("nan")
        if clip is not None and clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.policy.trainable_parameters()), clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return grad_norm

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.global_step < self.hparams.sft_steps:
            return self._sft_step(batch)
        return self._grpo_step(batch)

    def _sft_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Teacher-forced cross-entropy on truthful, perfectly formatted targets (cold start)."""
        metas = batch.get("meta") or [{} for _ in batch["labels"]]
        targets = [cold_start_target(self.mode, label, meta) for label, meta in zip(batch["labels"], metas)]
        prompts = self._prompts(batch)
        embeds = self.policy.encode_prompts(prompts)
        rollout = self.policy.teacher_forcing(embeds, targets)
        mask = rollout.completion_mask.float()
        n = mask.shape[0]
        total_tokens = mask.sum().clamp(min=1)
        mb = self.hparams.micro_batch_size
        loss_sum = torch.zeros((), device=mask.device)
        if self.hparams.sft_lr is not None:
            for group in self.optimizers().param_groups:
                group["lr"] = self.hparams.sft_lr
        for start in range(0, n, mb):
            rows = slice(start, min(n, start + mb))
            logps = self.policy.completion_logps(rollout, rows)
            loss = -(logps * mask[rows]).sum() / total_tokens / self.hparams.accumulate_grad_batches
            self.manual_backward(loss)
            loss_sum += loss.detach()
        self._optimizer_step()
        self.log("sft/loss", loss_sum * self.hparams.accumulate_grad_batches, prog_bar=True, batch_size=n)
        return loss_sum

    def _start_rl_phase(self) -> None:
        """After a cold start, the KL anchor is the cold-start model, the model RL starts from (as in the
        paper, where the reference is the initial RL policy). Full fine-tuning: the reference becomes a
        frozen copy, also saved to ``<log_dir>/cold_start_model`` so that a resumed run reloads it. With
        LoRA the reference stays the base model (adapters off)."""
        self._rl_started = True
        if self.hparams.sft_steps <= 0:
            return
        # RL is a new optimisation problem: moments gathered at the cold start's larger LR would skew it.
        self.optimizers().optimizer.state.clear()
        if self.policy.lora is not None:
            return
        save_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "cold_start_model"
        self.policy.reset_reference(save_dir if self.trainer.is_global_zero else None)
        self._reference_dir = str(save_dir)

    def _grpo_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if not self._rl_started:
            self._start_rl_phase()
        hp = self.hparams
        G = hp.group_size
        labels = list(batch["labels"])
        B = len(labels)
        progress = self._progress()

        prompts = self._prompts(batch)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self._sampling_seed())
            embeds = self.policy.encode_prompts(prompts)
            rollout = self.policy.rollout(
                embeds,
                G,
                temperature=hp.temperature,
                top_p=hp.top_p,
                top_k=hp.top_k,
                max_new_tokens=hp.max_new_tokens,
                mask_truncated=hp.mask_truncated,
                synced_gpus=self._synced_gpus(),
            )
        group_labels = [label for label in labels for _ in range(G)]
        scored = self.reward_set(rollout.texts, group_labels, progress=progress)
        rewards = torch.tensor(scored.total, dtype=torch.float32, device=self.device)
        advantages = self._advantages(rewards, G)

        keep = torch.ones(B * G, dtype=torch.bool, device=self.device)
        zero_std = grpo.zero_std_groups(rewards, G)
        if hp.dynamic_sampling:
            keep = (~zero_std).repeat_interleave(G)
        mask = rollout.completion_mask.to(self.device).float() * keep.unsqueeze(1)
        rows_kept = torch.nonzero(keep).flatten()

        loss_total = torch.zeros((), device=self.device)
        stats_acc: dict[str, float] = {}
        if rows_kept.numel() > 0:
            with torch.no_grad():
                ref = self._logps_no_grad(rollout, rows_kept, reference=True) if hp.beta > 0 else None
                old = self._logps_no_grad(rollout, rows_kept, reference=False) if hp.num_iterations > 1 else None
            adv_kept, mask_kept = advantages[rows_kept], mask[rows_kept]
            n = rows_kept.numel()
            active = mask_kept.sum().clamp(min=1)
            for _ in range(hp.num_iterations):
                for start in range(0, n, hp.micro_batch_size):
                    sl = slice(start, min(n, start + hp.micro_batch_size))
                    logps = self.policy.completion_logps(rollout, rows_kept[sl], temperature=hp.temperature)
                    loss, stats = grpo.grpo_loss(
                        logps,
                        None if old is None else old[sl],
                        None if ref is None else ref[sl],
                        adv_kept[sl],
                        mask_kept[sl],
                        beta=hp.beta,
                        epsilon_low=hp.epsilon_low,
                        epsilon_high=hp.epsilon_high,
                        loss_type="dapo" if hp.loss_type in ("bnpo", "dapo") else hp.loss_type,
                        max_completion_length=hp.max_new_tokens,
                        num_items_in_batch=active,
                    )
                    # Rescale each micro-batch so the sum over micro-batches is the loss of the whole batch.
                    if hp.loss_type in ("grpo", "dr_grpo"):
                        loss = loss * (sl.stop - sl.start) / n
                    loss = loss / (hp.accumulate_grad_batches * hp.num_iterations)
                    self.manual_backward(loss)
                    loss_total += loss.detach()
                    weight = float(mask_kept[sl].sum()) / float(active)
                    for key, value in _stats_dict(stats).items():
                        stats_acc[key] = stats_acc.get(key, 0.0) + value * weight / hp.num_iterations
        grad_norm = self._optimizer_step()

        self._log_step(scored, rewards, zero_std, rollout, labels, keep, loss_total, stats_acc, progress, grad_norm)
        self._last_rollout = (batch.get("keys"), group_labels, rollout.texts, scored)
        return loss_total

    def _sampling_seed(self) -> int:
        seed = (self.hparams.sampling_seed, self.global_step, self._accum, self.global_rank)
        return (seed[0] * 1_000_003 + seed[1] * 10_007 + seed[2] * 101 + seed[3]) % (2**62)

    def _advantages(self, rewards: torch.Tensor, G: int) -> torch.Tensor:
        scale = self.hparams.scale_rewards
        if scale == "batch" and self.trainer.world_size > 1:
            # Batch scaling must see every rank's rewards so that the std is the global one.
            gathered = self.all_gather(rewards).reshape(-1)
            adv_all = grpo.group_advantages(gathered, G, scale="batch")
            return adv_all.reshape(self.trainer.world_size, -1)[self.global_rank]
        return grpo.group_advantages(rewards, G, scale=scale)

    def _logps_no_grad(self, rollout: Any, rows: torch.Tensor, reference: bool) -> torch.Tensor:
        out = []
        for start in range(0, rows.numel(), self.hparams.micro_batch_size):
            sel = rows[start : start + self.hparams.micro_batch_size]
            out.append(self.policy.completion_logps(rollout, sel, temperature=self.hparams.temperature, reference=reference))
        return torch.cat(out)

    def _synced_gpus(self) -> bool:
        # Under sharded data parallel every rank must keep calling forward until all ranks finish.
        return self._trainer is not None and self.trainer.world_size > 1 and self.policy.is_sharded

    def _log_step(self, scored, rewards, zero_std, rollout, labels, keep, loss, stats, progress, grad_norm) -> None:
        G = self.hparams.group_size
        B = len(labels)
        lengths = rollout.completion_mask.float().sum(1)
        truncated = grpo.is_truncated(rollout.completion_ids, self.policy.eos_token_ids)
        parsed = [parse_response(t, self.mode, self.labels) for t in rollout.texts]
        golds = [label for label in labels for _ in range(G)]
        log = {
            "loss": loss,
            "reward": torch.nanmean(rewards),
            "reward_std": grpo.group_reward_std(rewards, G).mean(),
            "frac_reward_zero_std": zero_std.float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": truncated.float().mean(),
            "format_rate": torch.tensor(sum(p.format_ok for p in parsed) / len(parsed)),
            "train_accuracy": torch.tensor(sum(p.label == g for p, g in zip(parsed, golds)) / len(parsed)),
            "dynamic_sampling/dropped_groups": torch.tensor(float(B - int(keep.sum()) // G)),
            "progress": torch.tensor(progress),
        }
        for name, mean in self.reward_set.means(scored.per_reward).items():
            log[f"rewards/{name}/mean"] = torch.tensor(mean)
        for name, fn in self.reward_set.fns.items():
            if hasattr(fn, "alpha"):
                log[f"rewards/{name}/alpha"] = torch.tensor(fn.alpha(progress))
        for key, value in stats.items():
            log[key] = torch.tensor(value)
        if not math.isnan(grad_norm):
            log["grad_norm"] = torch.tensor(grad_norm)
        opt = self.optimizers()
        log["lr"] = torch.tensor(opt.param_groups[0]["lr"])
        self.log_dict({k: v.float().to(self.device) for k, v in log.items()}, batch_size=B, sync_dist=False)
        self.log("format", log["format_rate"].to(self.device), prog_bar=True, batch_size=B, logger=False)
        self.log("r", log["reward"].to(self.device), prog_bar=True, batch_size=B, logger=False)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, prefix: str, batch: Mapping[str, Any], dataloader_idx: int) -> list[dict[str, Any]]:
        names = self._eval_names["validate" if prefix == "val" else "test"]
        name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        prompts = self._prompts(batch)
        with torch.no_grad():
            texts = self.policy.greedy(
                prompts, self.hparams.eval_max_new_tokens or self.hparams.max_new_tokens, synced_gpus=self._synced_gpus()
            )
        parsed = [parse_response(t, self.mode, self.labels) for t in texts]
        # Padding rows (added so that every rank runs the same number of steps) are never counted.
        real = [i for i, pad in enumerate(batch.get("is_pad") or [False] * len(parsed)) if not pad]
        if real:
            self.eval_metrics[f"{prefix}__{name}"].update([parsed[i].label for i in real], [batch["labels"][i] for i in real])
            self.eval_format[f"{prefix}__{name}"].update(
                torch.tensor([float(parsed[i].format_ok) for i in real], device=self.device)
            )
        return [{"text": t, "parsed": p} for t, p in zip(texts, parsed)]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _eval_epoch_end(self, prefix: str) -> None:
        key = "validate" if prefix == "val" else "test"
        results = {}
        for name in self._eval_names[key]:
            metric = self.eval_metrics[f"{prefix}__{name}"]
            values = metric.compute()
            values["format_rate"] = self.eval_format[f"{prefix}__{name}"].compute()
            metric.reset()
            self.eval_format[f"{prefix}__{name}"].reset()
            results[name] = values
            # A single set keeps the short name (val/ua, test/ua); several are logged as test/<name>/ua.
            tag = prefix if len(self._eval_names[key]) == 1 and name in ("val", "test") else f"{prefix}/{name}"
            for metric_name, value in values.items():
                if value.ndim == 0:
                    self.log(f"{tag}/{metric_name}", value.float(), sync_dist=False, add_dataloader_idx=False)
        self.last_eval = {prefix: results}

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        if not batch["waveforms"]:
            return []
        prompts = self._prompts(batch)
        texts = self.policy.greedy(prompts, self.hparams.eval_max_new_tokens or self.hparams.max_new_tokens)
        out = []
        for key, text in zip(batch["keys"], texts):
            parsed = parse_response(text, self.mode, self.labels)
            out.append({"key": key, "emotion": parsed.label, "format_ok": parsed.format_ok, **parsed.fields, "text": text})
        return out

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._accum = int(checkpoint.get("emorl_accumulated_batches", 0))
        if checkpoint.get("global_step", 0) > self.hparams.sft_steps:
            # RL had begun: its start (optimizer reset, reference handoff) must not run again.
            self._rl_started = True
            ref_dir = checkpoint.get("emorl_reference_dir")
            if ref_dir:
                self.policy.load_reference(ref_dir)
                self._reference_dir = ref_dir

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["emorl_accumulated_batches"] = self._accum
        if self._reference_dir:  # the cold-start reference lives in its own model folder, not here
            checkpoint["emorl_reference_dir"] = self._reference_dir
        # Only trainable weights: the frozen base comes from model_dir, the reference is never saved.
        trainable = {f"policy.{name}" for name in self.policy.trainable_parameter_names()}
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and state:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}


def _stats_dict(stats: Any) -> dict[str, float]:
    items = stats.items() if isinstance(stats, Mapping) else vars(stats).items()
    names = {
        "kl": "kl",
        "clip_ratio_low": "clip_ratio/low_mean",
        "clip_ratio_high": "clip_ratio/high_mean",
        "clip_ratio_region": "clip_ratio/region_mean",
        "ratio_mean": "ratio/mean",
    }
    return {names.get(k, k): float(v) for k, v in items if k in names}

