"""The GRPO LightningModule: sample groups, score them, update the policy; evaluate with SER metrics.

Thin on purpose: the math lives in ``emorl_pl.grpo``, the rewards in ``emorl_pl.rewards``, the
response formats in ``emorl_pl.reasoning`` and the model work in ``AudioLMPolicy``. This module
only orders the calls, handles micro-batching / accumulation, and logs.

GRPO runs in windows of ``accumulate_grad_batches`` (k) batches, as TRL's generation batch:
  1. each batch: prompts (chat template + audio) -> audio encoded once -> G samples per utterance ->
     rewards (weighted ESWR + format, ...) -> group-relative advantages; kept until the window is full.
     ``scale_rewards: batch`` divides by the std of every reward of the window on every rank (TRL's
     generation batch), so those advantages wait for the window's last batch
  2. at the window's last batch: reference and old (sampling-policy) log-probs, no grad; for rollouts an
     inference engine sampled (``Rollout.sampling_logps``), TRL's importance-sampling weights of the
     trainer's old log-probs against the engine's (``emorl_pl.grpo.importance_sampling_correction``)
  3. ``num_iterations`` (mu) optimizer steps, each over every batch of the window in micro-batches:
     policy log-probs under the current weights -> clipped GRPO loss -> manual_backward; clip, step,
     schedule. So one generation feeds mu optimizer steps (TRL's semantics): from the second on, the
     ratio to the sampling policy departs from 1 and clipping acts. A training batch is one dataloader
     batch; ``global_step`` counts optimizer steps (mu per GRPO window), capped at ``max_steps``.
  4. the window's completions, rewards and advantages become ``last_rollout`` (a ``RolloutRecord``) for
     the logging callbacks.
An optional supervised warm-up (``sft_steps`` optimizer steps) first teaches the response format.

Every rank issues the same collectives whatever its data: dynamic sampling gives the groups it drops
zero weight instead of skipping their passes, and micro-batches are padded (zero-weight) to the
largest count over ranks, so DDP's per-backward all-reduce and FSDP2's per-forward all-gather match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from torchmetrics import MeanMetric

from emorl_pl import grpo
from emorl_pl.checkpointing import seeded_rng
from emorl_pl.cold_start import cold_start_target
from emorl_pl.emotions import get_label_set
from emorl_pl.metrics import SERMetrics
from emorl_pl.modules.families import resolve_router_aux_coef
from emorl_pl.modules.policy import AudioLMPolicy, Rollout
from emorl_pl.prompts import PromptTemplate
from emorl_pl.reasoning import check_mode, parse_response
from emorl_pl.rewards import RewardOutput, RewardSet
from emorl_pl.rollout_record import RolloutRecord
from emorl_pl.run_identity import RUN_IDENTITY_KEY, normalise_identity
from emorl_pl.sampled_eval import majority_vote, pass_at_k
from emorl_pl.schedules import lr_lambda, rl_progress, total_optimizer_steps
from emorl_pl.strategies import FSDP2Strategy

__all__ = ["GRPOModule", "lr_lambda"]


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


class GRPOModule(L.LightningModule):
    """GRPO fine-tuning of an audio-LM for speech emotion recognition (EMO-RL).

    Args:
        policy: the audio-LM policy (loads weights lazily in ``configure_model``).
        labels: the label set (name such as ``iemocap4`` or a list); link it to the data's.
        mode: response mode ``esr`` (paper), ``eur`` or ``ir``.
        rewards: reward name -> weight, or name -> {weight, **options}, or name -> {class_path,
            init_args, weight} for a reward from your own module; e.g.
            ``{eswr: {weight: 1.0, gamma: 0.7, alpha_schedule: linear}, format: 1.0}``.
        group_size: G samples per utterance (paper: 6).
        beta: KL weight to the reference policy; 0 skips the reference pass entirely.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see ``emorl_pl.grpo.grpo_loss``).
        importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO: one length-normalised ratio
            per completion).
        scale_rewards: ``group``, ``batch`` or ``none`` advantage scaling; ``batch``: by the reward std over
            the whole window on all ranks (TRL's generation batch; dynamically dropped groups count in it).
        num_iterations: optimizer steps per generation window (mu, TRL's ``num_iterations``); each
            re-scores the same completions under the updated weights against the sampling policy's.
        dynamic_sampling: drop groups whose rewards are all equal (DAPO); they carry no signal. Dropped
            rows get zero weight (and count in no loss normaliser) rather than being skipped, so ranks
            stay in step; unlike DAPO, the batch is not refilled with new rollouts.
        micro_batch_size: sequences per forward/backward, to bound memory; never changes the result.
        micro_batch_tokens: instead of ``micro_batch_size`` rows, GRPO passes of at most this many tokens
            (verl's ``use_dynamic_bsz``): rows of like length packed together, longest first, each pass cut
            to its own rows' longest prompt + completion and counted as rows x that length
            (``emorl_pl.grpo.token_budget_micro_batches``). The same gradient to float rounding. None: off.
            It must hold one row: the longest prompt + ``max_new_tokens``.
        accumulate_grad_batches: batches per window (TRL's generation batch = k x per-device batch):
            the loss is normalised over the window as TRL does (``emorl_pl.grpo.loss_normalizer``).
        prompt: the prompt's words (``emorl_pl.prompts.PromptTemplate``: instruction per mode with
            ``{labels}``, transcript form, system prompt, per-corpus overrides); None: the built-in text.
        sft_steps: supervised cold-start steps before GRPO (0 = none); ``sft_lr`` their LR.
        eval_samples: k > 0 adds sampled evaluation: k answers per utterance at ``eval_temperature``,
            reported as maj@k and pass@k (``emorl_pl.sampled_eval``), each with WA / UA / F1, next to
            greedy decoding's metrics.
        sampling_seed: sampling and dropout are seeded from (sampling_seed, step, accumulation index,
            rank), so a resumed run samples exactly what an uninterrupted one would.
        vllm_importance_sampling_correction: for rollouts that carry the sampling engine's log-probs
            (``Rollout.sampling_logps``, e.g. from vLLM), weight each completion's surrogate loss by
            pi_trainer / pi_engine, as TRL 1.16 (its names and defaults); the mismatch is logged under
            ``sampling/``. No effect on rollouts the trainer sampled itself.
        vllm_importance_sampling_mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or
            ``sequence_mask``: one ratio per token or per completion, clamped to or zeroed outside the bounds.
        vllm_importance_sampling_clip_max / vllm_importance_sampling_clip_min: the bounds [C_min, C_max]
            (None: unbounded on that side).
        router_aux_loss_coef: the weight of a mixture-of-experts model's router load-balancing loss, TRL 1.16's
            ``router_aux_loss_coef``: None takes the model config's ``text_config.router_aux_loss_coef`` (0.001
            for Qwen3-Omni; 0.0 for a dense model), 0.0 turns it off, a nonzero value on a dense model is an error.
            On, each gradient pass of the GRPO loss (and of the cold start) also returns the router logits and adds
            ``coef x aux / passes``: aux is transformers' ``load_balancing_loss_func`` over the tokens the model's
            forward on the pass's full [prompt ; completion] sequences counts (prompt and completion masks), passes
            the rank's gradient passes per optimizer step (TRL: ``/ gradient_accumulation_steps``); logged as
            ``aux_loss`` (``sft/aux_loss``). Reference and sampling-policy log-probs never compute it.
    """

    def __init__(
        self,
        policy: AudioLMPolicy,
        labels: str | list[str] = "iemocap4",
        mode: str = "esr",
        rewards: dict[str, float | dict[str, Any]] | list[str | dict[str, Any]] | None = None,
        group_size: int = 6,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 128,
        use_transcripts: bool = False,
        prompt: PromptTemplate | None = None,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "grpo",
        importance_sampling_level: str = "token",
        scale_rewards: str = "group",
        num_iterations: int = 1,
        mask_truncated: bool = False,
        dynamic_sampling: bool = False,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        optimizer: OptimizerCallable = _adamw,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        sft_steps: int = 0,
        sft_lr: float | None = None,
        eval_max_new_tokens: int | None = None,
        eval_samples: int = 0,
        eval_temperature: float = 1.0,
        sampling_seed: int = 0,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: str = "sequence_mask",
        vllm_importance_sampling_clip_max: float | None = 3.0,
        vllm_importance_sampling_clip_min: float | None = None,
        router_aux_loss_coef: float | None = None,
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
        if micro_batch_tokens is not None and (isinstance(micro_batch_tokens, bool)
                                               or not isinstance(micro_batch_tokens, int) or micro_batch_tokens < 1):
            raise ValueError(f"model.init_args.micro_batch_tokens must be None or an int >= 1, got {micro_batch_tokens!r}")
        if eval_samples < 0 or (eval_samples and not eval_temperature > 0):
            raise ValueError(f"eval_samples must be >= 0 and eval_temperature > 0, got {eval_samples}, {eval_temperature}")
        _check_positive_settings(max_new_tokens=max_new_tokens, eval_max_new_tokens=eval_max_new_tokens,
                                 temperature=temperature, top_p=top_p, sft_lr=sft_lr)
        if not 0 < top_p <= 1 or top_k < 0 or sft_steps < 0 or warmup_steps < 0 or epsilon_low < 0 or \
                (epsilon_high is not None and epsilon_high < 0):
            raise ValueError(f"expected 0 < top_p <= 1, top_k >= 0, sft_steps >= 0, warmup_steps >= 0, epsilon_low >= 0 "
                             f"and epsilon_high >= 0; got top_p={top_p}, top_k={top_k}, sft_steps={sft_steps}, "
                             f"warmup_steps={warmup_steps}, epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
        if loss_type not in grpo.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(grpo.LOSS_TYPES)}, got {loss_type!r}")
        if importance_sampling_level not in grpo.IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {list(grpo.IMPORTANCE_SAMPLING_LEVELS)}, "
                             f"got {importance_sampling_level!r}")
        if not isinstance(vllm_importance_sampling_correction, bool):
            raise ValueError("vllm_importance_sampling_correction must be true or false, "
                             f"got {vllm_importance_sampling_correction!r}")
        grpo.check_is_correction(vllm_importance_sampling_mode, vllm_importance_sampling_clip_max,
                                 vllm_importance_sampling_clip_min)
        if router_aux_loss_coef is not None and (isinstance(router_aux_loss_coef, bool)
                                                 or not isinstance(router_aux_loss_coef, (int, float))
                                                 or not math.isfinite(router_aux_loss_coef)):
            raise ValueError("model.init_args.router_aux_loss_coef must be null (the model config's value) or a "
                             f"finite number, got {router_aux_loss_coef!r}")
        self._router_coef: float | None = None  # resolved against the model (``router_aux_coef``)
        self.optimizer_factory = optimizer
        self.prompt = prompt if prompt is not None else PromptTemplate()
        self.instruction = self.prompt.user_text(self.mode, self.labels)
        self.automatic_optimization = False
        # The checkpoint holds only trainable weights (LoRA); base weights come from the model dir.
        self.strict_loading = False
        self._eval_names: dict[str, list[str]] = {}
        self._accum = 0  # batches of the current window seen so far
        self._window: list[_Generation] = []  # GRPO generations of the current window
        self._folded_adapters: dict[str, torch.Tensor] | None = None  # LoRA cold start, for resume
        self._rl_started = False
        self._total_steps: int | None = None  # the run's optimizer steps, set by configure_optimizers
        self._reference_dir: str | None = None
        # The completions of the last GRPO window, for logging callbacks; None before the first window closes.
        self.last_rollout: RolloutRecord | None = None

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        self.policy.load(reference=mesh is None)  # sharded: shard() builds a sharded reference
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            strategy = self.trainer.strategy
            self.policy.shard(mesh, mp_policy=strategy.mp_policy if isinstance(strategy, FSDP2Strategy) else None)
        self.router_aux_coef()  # a coefficient the model cannot take stops the run here, before any step

    def router_aux_coef(self) -> float:
        """The load-balancing loss weight for this model (TRL's resolution of ``router_aux_loss_coef``; 0.0: off)."""
        if self._router_coef is None:
            self.policy.load(reference=False)  # the config is enough: no weights are read here
            self._router_coef = resolve_router_aux_coef(self.policy.family, self.policy.loaded_models.hf,
                                                        self.hparams.router_aux_loss_coef)
        return self._router_coef

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = {"validate": ["val"], "test": ["test"]}
        if dm is not None and getattr(dm, "test_set_names", None):
            names["test"] = list(dm.test_set_names)
        if dm is not None and getattr(dm, "val_set_names", None):
            names["validate"] = list(dm.val_set_names)
        self._eval_names = names
        keys = [f"{prefix}__{name}" for prefix, key in (("val", "validate"), ("test", "test")) for name in names[key]]
        sampled = [f"{k}__{kind}" for k in keys for kind in self._sampled_kinds()]
        self.eval_metrics = torch.nn.ModuleDict({k: SERMetrics(self.labels) for k in keys + sampled})
        self.eval_format = torch.nn.ModuleDict({k: MeanMetric() for k in keys})
        self.eval_reward = torch.nn.ModuleDict({k: MeanMetric() for k in keys})

    def _sampled_kinds(self) -> tuple[str, ...]:
        k = self.hparams.eval_samples
        return (f"maj@{k}", f"pass@{k}") if k else ()

    def configure_optimizers(self):
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ValueError("the policy has no trainable parameters (check lora / freeze settings)")
        opt = self.optimizer_factory(params)
        self._total_steps = self.total_steps()
        total = self._total_steps or 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.hparams.lr_schedule, self.hparams.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> int | None:
        """Optimizer steps of this run under the trainer's ``max_steps`` / ``max_epochs`` (None: unbounded)."""
        trainer = self.trainer
        batches = None
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            if trainer.train_dataloader is None:  # as Lightning's estimated_stepping_batches does
                trainer.fit_loop.setup_data()
            batches = trainer.num_training_batches
        return total_optimizer_steps(
            max_steps=trainer.max_steps, max_epochs=trainer.max_epochs, batches_per_epoch=batches,
            accumulate_grad_batches=self.hparams.accumulate_grad_batches,
            num_iterations=self.hparams.num_iterations, sft_steps=self.hparams.sft_steps,
        )

    # ------------------------------------------------------------------ helpers
    def _progress(self) -> float:
        """RL progress in optimizer steps (0 while the run's length is unknown, e.g. outside fit)."""
        return rl_progress(self.global_step, self._total_steps, self.hparams.sft_steps)

    def _prompts(self, batch: Mapping[str, Any]):
        """The batch's prompts: the template's user text (and system prompt) per utterance and corpus."""
        n = len(batch["waveforms"])
        texts = batch.get("texts") if self.hparams.use_transcripts else None
        corpora = batch.get("corpus") or [None] * n
        users = [self.prompt.user_text(self.mode, self.labels, texts[i] if texts else None, corpora[i]) for i in range(n)]
        systems = [self.prompt.system_prompt(c) for c in corpora]
        return self.policy.build_prompts(batch["waveforms"], batch["sample_rate"], users, system_prompts=systems)

    def _window_full(self) -> bool:
        """Whether the current batch closes its window: k batches, or the epoch's last batch (a short
        window, as Lightning's own accumulation; ranks have equal batch counts, so they agree)."""
        last = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return self._accum >= self.hparams.accumulate_grad_batches or bool(last)

    def _optimizer_step(self) -> float:
        """Clip, step, zero, schedule; returns the gradient norm before clipping (NaN when not clipping)."""
        opt = self.optimizers()
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
        # Dropout and every other random draw of the step come from RNGs seeded by (sampling_seed, step,
        # accumulation index, rank), never from their history, which no checkpoint holds (a resumed run
        # would draw other dropout masks). Sampling reseeds its own stream inside.
        with seeded_rng(self._step_seed(), self.device):
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
        self._accum += 1
        closing = self._window_full()
        starts = range(0, n, mb)
        k = self.hparams.accumulate_grad_batches
        coef = self.router_aux_coef()
        aux_sum = torch.zeros((), device=mask.device)
        for start in starts:
            rows = slice(start, min(n, start + mb))
            if coef:
                logps, aux = self.policy.completion_logps(rollout, rows, router_aux_loss=True)
            else:
                logps, aux = self.policy.completion_logps(rollout, rows), None
            loss = -(logps * mask[rows]).sum() / total_tokens / k
            if aux is not None:
                # As transformers' forward with labels (its loss + router_aux_loss_coef x aux_loss), per pass,
                # the passes of the window averaged (the Trainer's / gradient_accumulation_steps).
                loss = loss + coef * aux / (len(starts) * k)
                aux_sum += aux.detach() / len(starts)
            with self._backward_sync(closing and start == starts[-1]):
                self.manual_backward(loss)
            loss_sum += loss.detach()
        if closing:
            self._accum = 0
            self._optimizer_step()
        self.log("sft/loss", loss_sum * k, prog_bar=True, batch_size=n)
        if coef:
            self.log("sft/aux_loss", aux_sum, batch_size=n)
        return loss_sum

    def _start_rl_phase(self) -> None:
        """After a cold start, the KL anchor is the cold-start policy, the model RL starts from (as in the
        paper, where the reference is the initial RL policy). LoRA: the cold-start adapters are folded into
        the base weights and restart at zero, so adapters-off is the cold-start policy (the folded adapters
        go into every checkpoint, to re-fold on resume). Full fine-tuning: the reference becomes a frozen
        copy, also saved to ``<log_dir>/cold_start_model`` so that a resumed run reloads it."""
        self._rl_started = True
        if self.hparams.sft_steps <= 0:
            return
        # RL is a new optimisation problem: moments gathered at the cold start's larger LR would skew it.
        self.optimizers().optimizer.state.clear()
        if self.policy.lora is not None:
            self._folded_adapters = self.policy.fold_adapters_into_base()
            return
        save_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "cold_start_model"
        self.policy.reset_reference(save_dir if self.trainer.is_global_zero else None)
        self._reference_dir = str(save_dir)

    def _grpo_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if not self._rl_started:
            self._start_rl_phase()
        gen = self._generate(batch)
        self._window.append(gen)
        self._accum += 1
        loss, stats, grad_norm = torch.zeros((), device=self.device), {}, float("nan")
        if self._window_full():
            window, self._window, self._accum = self._window, [], 0
            loss, stats, grad_norm = self._update(window)
            self.last_rollout = RolloutRecord.of_batches(
                [(g.keys, g.labels, g.rollout.texts, g.scored, g.advantages.tolist()) for g in window],
                self.hparams.group_size)
        self._log_step(gen, loss, stats, grad_norm)
        return loss

    def _generate(self, batch: Mapping[str, Any]) -> _Generation:
        """Rollout, rewards, advantages and the dynamic-sampling mask of one batch (no grad)."""
        hp = self.hparams
        G = hp.group_size
        labels = [label for label in batch["labels"] for _ in range(G)]
        progress = self._progress()
        prompts = self._prompts(batch)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self._sampling_seed())
            embeds = self.policy.encode_prompts(prompts)
            rollout = self.policy.rollout(
                embeds, G, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
                max_new_tokens=hp.max_new_tokens, mask_truncated=hp.mask_truncated,
                synced_gpus=self._synced_gpus(),
            )
        scored = self.reward_set(rollout.texts, labels, **reward_columns(batch, G), progress=progress)
        rewards = torch.tensor(scored.total, dtype=torch.float32, device=self.device)
        zero_std = grpo.zero_std_groups(rewards, G)
        keep = (~zero_std).repeat_interleave(G) if hp.dynamic_sampling else torch.ones_like(rewards, dtype=torch.bool)
        mask = rollout.completion_mask.to(self.device).float() * keep.unsqueeze(1)
        # Batch scaling needs the whole window's rewards: its advantages are set at the window's end.
        advantages = None if hp.scale_rewards == "batch" else grpo.group_advantages(rewards, G, scale=hp.scale_rewards)
        keys = batch.get("keys")
        return _Generation(rollout, advantages, mask, keep, rewards, zero_std, scored, labels, progress,
                           keys=list(keys) if keys is not None else None)

    def _update(self, window: list[_Generation]) -> tuple[torch.Tensor, dict[str, float], float]:
        """``num_iterations`` optimizer steps over the window's generations (see the module docstring)."""
        hp = self.hparams
        world = self.trainer.world_size
        self._window_advantages(window)
        plans = [self._micro_batches(gen) for gen in window]
        local_tokens = float(sum(g.mask.sum() for g in window))
        totals = torch.tensor([float(sum(g.mask.sum() for g in window)), float(sum(g.keep.sum() for g in window))],
                              dtype=torch.float64, device=self.device)
        if world > 1:  # window-wide normalisers, and every rank runs as many micro-batches as the busiest
            counts = torch.tensor([len(p) for p in plans], device=self.device)
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            plans = [p + [None] * (int(c) - len(p)) for p, c in zip(plans, counts)]
        with torch.no_grad():
            for gen, plan in zip(window, plans):
                correct = hp.vllm_importance_sampling_correction and gen.rollout.sampling_logps is not None
                # The sampling policy's log-probs: needed when the weights move before a pass (mu > 1) and, as
                # TRL does with vLLM, to weigh an engine's samples by the trainer's probability of them.
                gen.ref = self._logps_no_grad(gen.rollout, plan, reference=True) if hp.beta > 0 else None
                gen.old = (self._logps_no_grad(gen.rollout, plan, reference=False)
                           if hp.num_iterations > 1 or correct else None)
                if correct:
                    gen.is_ratio = grpo.importance_sampling_correction(
                        gen.old, self._sampling_logps(gen), gen.mask, hp.vllm_importance_sampling_mode,
                        hp.vllm_importance_sampling_clip_max, hp.vllm_importance_sampling_clip_min,
                    )
        iterations = hp.num_iterations
        if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            iterations = max(1, min(iterations, self.trainer.max_steps - self.global_step))
        loss_total = torch.zeros((), device=self.device)
        stats_acc: dict[str, float] = {}
        grad_norm = float("nan")
        # Each batch's normaliser is fixed for the window: computed once, not per pass and iteration.
        norms = [grpo.loss_normalizer(hp.loss_type, step_tokens=float(gen.mask.sum()),
                                      window_sequences=float(totals[1]), window_tokens=float(totals[0]),
                                      world_size=world, num_steps=len(window)) for gen in window]
        passes = [(gen, norm, rows) for gen, norm, plan in zip(window, norms, plans) for rows in plan]
        coef = self.router_aux_coef()
        # TRL adds coef x aux / gradient_accumulation_steps per micro-batch: the mean over this rank's passes
        # of one optimizer step (zero-weight padding passes compute it too, for equal graphs, and add nothing).
        real_passes = max(1, sum(rows is not None for _, _, rows in passes))
        for _ in range(iterations):
            for i, (gen, norm, rows) in enumerate(passes):
                pad = rows is None  # a zero-weight pass that only keeps this rank in step
                rows = torch.zeros(1, dtype=torch.long, device=self.device) if pad else rows
                # w: the completion columns the pass kept
                logps, w, aux = self._pass_logps(gen.rollout, rows, router_aux_loss=coef != 0)
                loss, stats = grpo.grpo_loss(
                    logps,
                    None if gen.old is None else gen.old[rows, :w],
                    None if gen.ref is None else gen.ref[rows, :w],
                    gen.advantages[rows],
                    gen.mask[rows, :w] * (0.0 if pad else 1.0),
                    beta=hp.beta, epsilon_low=hp.epsilon_low, epsilon_high=hp.epsilon_high,
                    loss_type=hp.loss_type, max_completion_length=hp.max_new_tokens,
                    importance_sampling_level=hp.importance_sampling_level,
                    importance_sampling_ratio=None if gen.is_ratio is None else gen.is_ratio[rows, :w], **norm,
                )
                if aux is not None:
                    loss = loss + coef * aux * (0.0 if pad else 1.0) / real_passes
                    if not pad:
                        stats_acc["aux_loss"] = stats_acc.get("aux_loss", 0.0) + float(aux.detach()) / real_passes / iterations
                # Gradients are reduced across ranks once per optimizer step: at its last backward.
                with self._backward_sync(i == len(passes) - 1):
                    self.manual_backward(loss)
                loss_total += loss.detach() / iterations
                # Logged stats: this rank's token-weighted mean over its window and the iterations.
                weight = 0.0 if pad else float(gen.mask[rows].sum()) / max(local_tokens, 1.0) / iterations
                for key, value in _stats_dict(stats).items():
                    stats_acc[key] = stats_acc.get(key, 0.0) + value * weight
            grad_norm = self._optimizer_step()
        stats_acc.update(self._mismatch_stats(window))
        return loss_total, stats_acc, grad_norm

    def _sampling_logps(self, gen: _Generation) -> torch.Tensor:
        """The engine's per-token log-probs of a rollout, checked against its completions."""
        logps = gen.rollout.sampling_logps
        if logps.shape != gen.rollout.completion_ids.shape:
            raise ValueError(f"Rollout.sampling_logps must have the completions' shape "
                             f"{tuple(gen.rollout.completion_ids.shape)}, got {tuple(logps.shape)}")
        return logps.to(device=gen.old.device, dtype=gen.old.dtype)

    def _mismatch_stats(self, window: list[_Generation]) -> dict[str, float]:
        """TRL's engine / trainer mismatch metrics over the window (TRL's generation batch), on this rank;
        dynamically dropped rows are left out (their old log-probs are never computed)."""
        hp = self.hparams
        gens = [g for g in window if g.is_ratio is not None]
        if not gens:
            return {}
        width = max(g.mask.shape[1] for g in gens)

        def rows(x: torch.Tensor, g: _Generation, per_token: bool = True) -> torch.Tensor:
            x = x[g.keep]  # padded past a batch's own length with mask 0, as TRL pads its batch
            return torch.nn.functional.pad(x, (0, width - x.shape[1])) if per_token else x

        per_token = not hp.vllm_importance_sampling_mode.startswith("sequence")  # else (N, 1) ratios
        stats = grpo.importance_sampling_stats(
            torch.cat([rows(g.old, g) for g in gens]), torch.cat([rows(self._sampling_logps(g), g) for g in gens]),
            torch.cat([rows(g.mask, g) for g in gens]), torch.cat([rows(g.is_ratio, g, per_token) for g in gens]),
            hp.vllm_importance_sampling_mode, hp.vllm_importance_sampling_clip_max,
            hp.vllm_importance_sampling_clip_min,
        )
        return {k: float(v) for k, v in stats.items()}

    def _backward_sync(self, sync: bool):
        """Lightning's parallel strategies skip the gradient all-reduce (DDP ``no_sync``; FSDP2: see
        ``FSDP2Strategy.block_backward_sync``) inside ``block_backward_sync``; the last backward syncs."""
        strategy = self.trainer.strategy
        if sync or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _micro_batches(self, gen: _Generation) -> list[torch.Tensor | None]:
        """The kept rows of a batch in passes: ``micro_batch_size`` rows each, or by ``micro_batch_tokens``."""
        rows = torch.nonzero(gen.keep).flatten()
        budget = self.hparams.micro_batch_tokens
        if budget is None:
            return list(rows.split(self.hparams.micro_batch_size)) if rows.numel() else []
        rollout = gen.rollout
        prompt = _prompt_spans(rollout.prompt.attention_mask).repeat_interleave(rollout.group_size)
        return grpo.token_budget_micro_batches(prompt, grpo.completion_extents(rollout.completion_mask), rows, budget)

    def _pass_logps(self, rollout: Rollout, rows: torch.Tensor, reference: bool = False,
                    router_aux_loss: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Log-probs of ``rows`` for one pass, the completion columns they cover and, with ``router_aux_loss``, the
        pass's load-balancing loss (else None): all T columns with fixed micro-batches; with
        ``micro_batch_tokens`` the rollout is cut to the columns these rows use (the prompt's leading padding
        none of them has, completion columns past their last masked token), so that a pass of short rows runs
        short. Causal attention and masked padding: the kept columns' values (and the routed tokens that count)
        are the same."""
        view = rollout if self.hparams.micro_batch_tokens is None else _trimmed(rollout, rows)
        out = self.policy.completion_logps(view, rows, temperature=self.hparams.temperature, reference=reference,
                                           router_aux_loss=router_aux_loss)
        logps, aux = out if router_aux_loss else (out, None)
        if view is not rollout and rollout.prompt.ref_audio_hidden is None:  # a cached reference tower output
            rollout.prompt.ref_audio_hidden = view.prompt.ref_audio_hidden
        return logps, view.completion_ids.shape[1], aux

    def _sampling_seed(self) -> int:
        seed = (self.hparams.sampling_seed, self.global_step, self._accum, self.global_rank)
        return (seed[0] * 1_000_003 + seed[1] * 10_007 + seed[2] * 101 + seed[3]) % (2**62)

    def _step_seed(self) -> int:
        """The seed of a training step's RNGs: the sampling seed's inputs, another stream (an LCG step)."""
        return (self._sampling_seed() * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % (2**62)

    def _window_advantages(self, window: list[_Generation]) -> None:
        """``scale_rewards: batch``: each batch's advantages over the reward std of the whole window on every
        rank, TRL's generation batch (``grpo.batch_reward_std``); the other scalings were set per batch."""
        if self.hparams.scale_rewards != "batch":
            return
        reduce = torch.distributed.all_reduce if self.trainer.world_size > 1 else None
        std = grpo.batch_reward_std(torch.cat([g.rewards for g in window]), all_reduce=reduce)
        for g in window:
            g.advantages = grpo.group_advantages(g.rewards, self.hparams.group_size, scale="batch", batch_std=std)

    def _logps_no_grad(self, rollout: Rollout, plan: list[torch.Tensor | None], reference: bool) -> torch.Tensor:
        """(N, T) log-probs of the planned rows (zeros elsewhere); ``None`` entries are zero-weight passes
        on row 0 that keep this rank's forward count equal to the other ranks'."""
        out = torch.zeros(rollout.completion_ids.shape, device=self.device)
        for rows in plan:
            sel = torch.zeros(1, dtype=torch.long, device=self.device) if rows is None else rows
            logps, w, _ = self._pass_logps(rollout, sel, reference=reference)
            if rows is not None:
                out[rows, :w] = logps
        return out

    def _synced_gpus(self) -> bool:
        # Under sharded data parallel every rank must keep calling forward until all ranks finish.
        return self._trainer is not None and self.trainer.world_size > 1 and self.policy.is_sharded

    def _log_step(self, gen: _Generation, loss: torch.Tensor, stats: dict[str, float], grad_norm: float) -> None:
        """Per batch: its rewards, completions and dynamic sampling; at a window's end also the loss, KL,
        clip ratios and gradient norm of its updates (``stats``, empty otherwise)."""
        G = self.hparams.group_size
        B = len(gen.labels) // G
        rollout, rewards = gen.rollout, gen.rewards
        lengths = rollout.completion_mask.float().sum(1)
        truncated = grpo.is_truncated(rollout.completion_ids, self.policy.eos_token_ids)
        parsed = [parse_response(t, self.mode, self.labels) for t in rollout.texts]
        log = {
            "reward": torch.nanmean(rewards),
            "reward_std": grpo.group_reward_std(rewards, G).mean(),
            "frac_reward_zero_std": gen.zero_std.float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": truncated.float().mean(),
            "format_rate": torch.tensor(sum(p.format_ok for p in parsed) / len(parsed)),
            "train_accuracy": torch.tensor(sum(p.label == g for p, g in zip(parsed, gen.labels)) / len(parsed)),
            "dynamic_sampling/dropped_groups": torch.tensor(float(B - int(gen.keep.sum()) // G)),
            "progress": torch.tensor(gen.progress),
        }
        for name, mean in self.reward_set.means(gen.scored.per_reward).items():
            log[f"rewards/{name}/mean"] = torch.tensor(mean)
        for name, fn in self.reward_set.fns.items():
            if hasattr(fn, "alpha"):
                log[f"rewards/{name}/alpha"] = torch.tensor(fn.alpha(gen.progress))
        if stats or not math.isnan(grad_norm):  # the window's updates ran in this step
            log["loss"] = loss
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
    def _eval_step(self, prefix: str, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        """Greedy answers -> SER metrics, format rate and mean reward; with ``eval_samples`` k > 0 also k
        sampled answers per utterance -> maj@k and pass@k metrics. Padding and placeholder rows (added so
        that every rank runs the same steps) are decoded but never counted."""
        hp = self.hparams
        names = self._eval_names["validate" if prefix == "val" else "test"]
        key = f"{prefix}__{names[dataloader_idx] if dataloader_idx < len(names) else dataloader_idx}"
        prompts = self._prompts(batch)
        max_new = hp.eval_max_new_tokens or hp.max_new_tokens
        with torch.no_grad():
            embeds = self.policy.encode_prompts(prompts)
            texts = self.policy.greedy(embeds, max_new, synced_gpus=self._synced_gpus())
        golds = list(batch["labels"])
        parsed = [parse_response(t, self.mode, self.labels) for t in texts]
        real = [i for i, pad in enumerate(batch.get("is_pad") or [False] * len(parsed)) if not pad]
        scored = self.reward_set(texts, golds, **reward_columns(batch, 1), progress=self._progress())
        self._update_eval(key, [parsed[i].label for i in real], [golds[i] for i in real])
        if real:
            self.eval_format[key].update(torch.tensor([float(parsed[i].format_ok) for i in real], device=self.device))
            rewards = torch.tensor([scored.total[i] for i in real], dtype=torch.float32, device=self.device)
            self.eval_reward[key].update(rewards[~torch.isnan(rewards)])
        k = hp.eval_samples
        if not k:
            return
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed((hp.sampling_seed * 7_919 + batch_idx * 131 + dataloader_idx * 17 + self.global_rank) % 2**62)
            samples = self.policy.rollout(embeds, k, temperature=hp.eval_temperature, top_p=hp.top_p, top_k=hp.top_k,
                                          max_new_tokens=max_new, synced_gpus=self._synced_gpus()).texts
        answers = [[parse_response(t, self.mode, self.labels).label for t in samples[b * k : (b + 1) * k]] for b in real]
        gold_real = [golds[i] for i in real]
        maj, passed = self._sampled_kinds()
        self._update_eval(f"{key}__{maj}", [majority_vote(a) for a in answers], gold_real)
        self._update_eval(f"{key}__{passed}", [pass_at_k(a, g) for a, g in zip(answers, gold_real)], gold_real)

    def _update_eval(self, key: str, preds: list[str | None], golds: list[str]) -> None:
        if preds:
            self.eval_metrics[key].update(preds, golds)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, batch_idx, dataloader_idx)

    def _eval_epoch_end(self, prefix: str) -> None:
        key = "validate" if prefix == "val" else "test"
        results = {}
        for name in self._eval_names[key]:
            base = f"{prefix}__{name}"
            values = self.eval_metrics[base].compute()
            values["format_rate"] = self.eval_format[base].compute()
            values["reward"] = self.eval_reward[base].compute()
            for kind in self._sampled_kinds():  # maj@k/ua, pass@k/wa, ...
                values.update({f"{kind}/{m}": v for m, v in self.eval_metrics[f"{base}__{kind}"].compute().items()})
            for metric in (self.eval_metrics[base], self.eval_format[base], self.eval_reward[base],
                           *(self.eval_metrics[f"{base}__{kind}"] for kind in self._sampled_kinds())):
                metric.reset()
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
        # Every batch is decoded, placeholder rows included, so that sharded ranks issue the same collectives.
        prompts = self._prompts(batch)
        texts = self.policy.greedy(prompts, self.hparams.eval_max_new_tokens or self.hparams.max_new_tokens,
                                   synced_gpus=self._synced_gpus())
        out = []
        pads = batch.get("is_pad") or [False] * len(texts)  # placeholders of unreadable files / padding rows
        # seconds_ignored: audio past the encoder window, cropped before the model heard it (0.0 if none)
        for key, text, ignored, pad in zip(batch["keys"], texts, prompts.seconds_ignored, pads):
            if pad:
                continue
            parsed = parse_response(text, self.mode, self.labels)
            out.append({"key": key, "emotion": parsed.label, "format_ok": parsed.format_ok, **parsed.fields,
                        "seconds_ignored": round(ignored, 3), "text": text})
        return out

    # ------------------------------------------------------------------ checkpoints
    def accumulation_window_open(self) -> bool:
        """Whether some batches of an accumulation window have run without its optimizer step (a checkpoint
        taken now would lose them)."""
        return self._accum > 0

    def run_identity(self, datamodule: L.LightningDataModule | None = None) -> dict[str, Any]:
        """The settings that define what a step of this run means (``emorl_pl.run_identity``): saved in every
        checkpoint, compared with the config on resume."""
        h = self.hparams
        identity: dict[str, Any] = {f"model.{name}": h[name] for name in IDENTITY_HPARAMS}
        identity["model.labels"] = list(self.labels)
        identity["model.rewards"] = h.rewards if h.rewards is not None else {"eswr": 1.0, "format": 1.0}
        identity["model.prompt"] = self.prompt
        identity.update(self.policy.run_identity())
        if datamodule is not None:
            identity["data.class"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
            identity["data.seed"] = getattr(datamodule, "seed", None)
        return identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._accum = int(checkpoint.get("emorl_accumulated_batches", 0))
        if checkpoint.get("global_step", 0) > self.hparams.sft_steps:
            # RL had begun: its start (optimizer reset, reference handoff) must not run again.
            self._rl_started = True
            ref_dir = checkpoint.get("emorl_reference_dir")
            if ref_dir:
                self.policy.load_reference(ref_dir)
                self._reference_dir = ref_dir
            folded = checkpoint.get("emorl_folded_adapters")
            if folded:  # LoRA: the base weights come fresh from model_dir; re-fold the cold start into them
                self.policy.fold_into_base(folded)
                self._folded_adapters = folded

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._accum:
            # The window's generations (GRPO) or gradients (cold start) are not in a checkpoint.
            raise RuntimeError(
                f"checkpoint requested after {self._accum} of the {self.hparams.accumulate_grad_batches} batches of "
                "an accumulation window; checkpoints are taken only between optimizer steps. Make "
                "trainer.val_check_interval (and any batch-based checkpoint interval) a multiple of "
                "model.init_args.accumulate_grad_batches."
            )
        checkpoint["emorl_accumulated_batches"] = self._accum
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        # plain values only: Lightning loads checkpoints with weights_only=True
        checkpoint[RUN_IDENTITY_KEY] = normalise_identity(self.run_identity(datamodule))
        if self._folded_adapters:
            checkpoint["emorl_folded_adapters"] = self._folded_adapters
        if self._reference_dir:  # the cold-start reference lives in its own model folder, not here
            checkpoint["emorl_reference_dir"] = self._reference_dir
        # Only trainable weights: the frozen base comes from model_dir, the reference is never saved.
        trainable = {f"policy.{name}" for name in self.policy.trainable_parameter_names()}
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and state:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}


# GRPOModule arguments that change what a training step computes (checked on resume); the others (the
# optimizer, schedule, clipping, micro-batching, evaluation settings) may change freely.
IDENTITY_HPARAMS = (
    "mode", "group_size", "temperature", "top_p", "top_k", "max_new_tokens", "use_transcripts", "beta",
    "epsilon_low", "epsilon_high", "loss_type", "importance_sampling_level", "scale_rewards", "num_iterations",
    "mask_truncated", "dynamic_sampling", "accumulate_grad_batches", "sft_steps", "sampling_seed",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min", "router_aux_loss_coef",
)


def _check_positive_settings(**values: float | int | None) -> None:
    """Each given setting (None: unset, allowed) must be > 0; the error names the setting."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"model.init_args.{name} must be > 0, got {value!r}")


def reward_columns(batch: Mapping[str, Any], group_size: int) -> dict[str, list[Any]]:
    """The batch's per-utterance columns, one entry per completion (each repeated G times), for rewards.

    Every list column of length B goes through under its own name (``keys``, ``texts``, ``corpus``,
    ``meta``, ...), plus the readable aliases ``key``, ``transcript`` and ``speaker`` (from ``meta``) and
    ``group``: the index b of the utterance whose sample this is.
    """
    B = len(batch["labels"])
    skip = {"waveforms", "labels"}
    columns = {k: [v[b] for b in range(B) for _ in range(group_size)] for k, v in batch.items()
               if k not in skip and isinstance(v, (list, tuple)) and len(v) == B}
    aliases = {"key": "keys", "transcript": "texts"}
    columns.update({alias: columns[name] for alias, name in aliases.items() if name in columns})
    if "meta" in columns:
        columns["speaker"] = [(m or {}).get("speaker") for m in columns["meta"]]
    columns["group"] = [b for b in range(B) for _ in range(group_size)]
    return columns


def _prompt_spans(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) left-padded prompt mask -> (B,) columns from each prompt's first token to the end."""
    m = attention_mask.bool()
    first = torch.where(m.any(1), m.int().argmax(1), torch.full_like(m[:, 0], m.shape[1], dtype=torch.long))
    return m.shape[1] - first


def _trimmed(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """``rollout`` as ``rows`` see it, without the columns none of them uses: leading prompt columns that are
    padding for all their utterances, and completion columns past their last masked token (at least one).
    Views, not copies; other rows of the result are cut too and must not be scored from it."""
    pe = rollout.prompt
    utts = torch.div(rows, rollout.group_size, rounding_mode="floor")
    start = pe.attention_mask.shape[1] - int(_prompt_spans(pe.attention_mask[utts]).max())
    width = max(1, int(grpo.completion_extents(rollout.completion_mask[rows]).max()))
    prompt = dataclasses.replace(pe, input_ids=pe.input_ids[:, start:], attention_mask=pe.attention_mask[:, start:],
                                 inputs_embeds=pe.inputs_embeds[:, start:])
    sampling = None if rollout.sampling_logps is None else rollout.sampling_logps[:, :width]
    return dataclasses.replace(rollout, prompt=prompt, completion_ids=rollout.completion_ids[:, :width],
                               completion_mask=rollout.completion_mask[:, :width], sampling_logps=sampling)


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


@dataclasses.dataclass
class _Generation:
    """One batch's rollout and scores, kept until its window's updates (``GRPOModule._update``).

    ``advantages``: None until the window's end under ``scale_rewards: batch``; ``mask``: the completion
    mask with dynamically dropped rows zeroed; ``ref`` / ``old``: (N, T) reference and sampling-policy
    log-probs, filled at the window's end; ``is_ratio``: the importance-sampling weights of an engine's
    rollout ((N, T) or (N, 1)), also filled then; ``keys``: the batch's utterance keys (None: none).
    """

    rollout: Rollout
    advantages: torch.Tensor | None
    mask: torch.Tensor
    keep: torch.Tensor
    rewards: torch.Tensor
    zero_std: torch.Tensor
    scored: RewardOutput
    labels: list[str]
    progress: float
    ref: torch.Tensor | None = None
    old: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None
    keys: list[str] | None = None
