"""GRPO math as small pure torch functions: group advantages, masks, KL, loss, importance sampling, and
how rows go into micro-batches. The per-token log-prob kernels are in ``emorl_pl.kernels``.

No Lightning and no transformers here: the GRPO LightningModule calls these on plain tensors, so every
formula can be tested against a hand computation. Definitions follow TRL 1.x ``GRPOTrainer``
(``_generate_and_score_completions`` for advantages, ``_compute_loss`` for the loss and its stats).

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B * G`` sequences, ``T`` completion tokens,
``V`` vocabulary. Rewards and advantages are flat ``(N,)`` with consecutive blocks of ``G`` belonging
to one prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The per-token log-prob kernels (chunked lm_head log-softmax, hand-written autograd): emorl_pl.kernels.

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# TRL 1.16 ``GRPOConfig.vllm_importance_sampling_mode``: {token, sequence} granularity x {truncate, mask} bound.
IS_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# ----------------------------------------------------------------------------------------- advantages
def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) -> (B, G) float view, with a clear error for a bad shape."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} elements, not divisible by group_size={group_size} "
            "(expected B*G rewards, G consecutive completions per prompt)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    elif rewards.dtype in (torch.float16, torch.bfloat16):
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def _nan_stats(x: Tensor, dim: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, Bessel std, valid count and 'all valid values equal' over ``dim`` (all if None), NaN-aware.

    mean = sum(valid) / n;  std = sqrt(sum((x - mean)^2) / (n - 1)), defined as 0 when n <= 1.
    """
    valid = ~torch.isnan(x)
    dims = () if dim is None else (dim,)
    keep = dim is not None
    n = valid.sum(dim=dims, keepdim=keep)
    filled = torch.where(valid, x, torch.zeros_like(x))
    mean = filled.sum(dim=dims, keepdim=keep) / n.clamp(min=1)
    dev = torch.where(valid, x - mean, torch.zeros_like(x))
    var = (dev * dev).sum(dim=dims, keepdim=keep) / (n - 1).clamp(min=1)
    hi = torch.where(valid, x, torch.full_like(x, -torch.inf)).amax(dim=dims, keepdim=keep)
    lo = torch.where(valid, x, torch.full_like(x, torch.inf)).amin(dim=dims, keepdim=keep)
    # Exact test instead of isclose(std, 0): r - mean(r) may be 1 ulp off 0 for equal rewards.
    constant = (n <= 1) | (hi == lo)
    std = torch.where(constant, torch.zeros_like(var), var.sqrt())
    return mean, std, n, constant


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Per-prompt reward standard deviation, (N,) -> (B,).

    std_b = sqrt( sum_{i valid} (r_bi - mean_b)^2 / (n_b - 1) )  (Bessel, as ``torch.std``), NaN
    rewards ignored; exactly 0 when the group's valid rewards are all equal or ``n_b <= 1``.
    """
    _, std, _, _ = _nan_stats(_grouped(rewards, group_size), dim=1)
    return std.squeeze(1)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: True where a prompt's valid rewards are all equal (or fewer than 2 are valid).

    Such groups have zero advantage, hence no policy gradient: their fraction is logged as
    ``frac_reward_zero_std`` and DAPO's dynamic sampling drops them.
    """
    _, _, _, constant = _nan_stats(_grouped(rewards, group_size), dim=1)
    return constant.squeeze(1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     batch_std: Tensor | float | None = None) -> Tensor:
    """Group-relative advantages, (N,) -> (N,).

    For completion i of prompt b, over the valid (non-NaN) rewards of that prompt:

        A_bi = r_bi - mean_b(r)
        scale "group":  A_bi / (std_b(r) + eps)
        scale "batch":  A_bi / (std(r over all valid rewards of the batch) + eps)
        scale "none":   A_bi

    std is Bessel-corrected (``torch.std``, as TRL). A NaN reward gets A = 0. A group whose valid
    rewards are all equal, or which has 0 or 1 valid rewards, gets A = 0 exactly (never NaN).
    ``batch_std`` (scale "batch" only): the std of a batch wider than ``rewards``, e.g. TRL's generation
    batch of several accumulation steps on several ranks (``batch_reward_std``); None: these rewards'.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if batch_std is not None and scale != "batch":
        raise ValueError(f"batch_std applies to scale='batch' only, got scale={scale!r}")
    grouped = _grouped(rewards, group_size)
    mean, std, _, constant = _nan_stats(grouped, dim=1)
    valid = ~torch.isnan(grouped)
    adv = torch.where(valid, grouped - mean, torch.zeros_like(grouped))
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            _, batch_std, _, _ = _nan_stats(grouped.reshape(-1), dim=None)
        adv = adv / (torch.as_tensor(batch_std, dtype=adv.dtype, device=adv.device) + eps)
    adv = torch.where(constant | ~valid, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def batch_reward_std(rewards: Tensor, all_reduce: Callable[[Tensor], object] | None = None) -> Tensor:
    """Bessel std of the valid (non-NaN) rewards of a batch spread over ranks, a 0-d float32 tensor:

        n = sum_ranks #valid,  mean = sum_ranks sum(r) / n,  std = sqrt(sum_ranks sum((r - mean)^2) / (n - 1))

    (0 when n <= 1), the std TRL's ``scale_rewards: batch`` takes over its gathered generation batch.
    ``all_reduce`` sums a float64 tensor in place over the ranks (``torch.distributed.all_reduce``); None:
    this process holds the whole batch. Two sums of two and one numbers: ranks may hold any count."""
    flat = rewards.reshape(-1).double()
    valid = ~torch.isnan(flat)
    moments = torch.stack([valid.sum().double(), torch.where(valid, flat, torch.zeros_like(flat)).sum()])
    if all_reduce is not None:
        all_reduce(moments)
    n, total = moments[0], moments[1]
    mean = total / n.clamp(min=1)
    dev = torch.where(valid, flat - mean, torch.zeros_like(flat))
    squares = (dev * dev).sum().reshape(1)
    if all_reduce is not None:
        all_reduce(squares)
    std = (squares[0] / (n - 1).clamp(min=1)).sqrt()
    return torch.where(n > 1, std, torch.zeros_like(std)).float()


# -------------------------------------------------------------------------------------------- masks
def _eos_hits(completion_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (N, T), got shape {tuple(completion_ids.shape)}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos:
        raise ValueError("eos_token_id must be an int or a non-empty sequence of ints")
    return torch.isin(
        completion_ids, torch.tensor(eos, dtype=completion_ids.dtype, device=completion_ids.device)
    )


def is_truncated(completion_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """(N,) bool: True for completions that contain no EOS token (cut at the length limit)."""
    return ~_eos_hits(completion_ids, eos_token_id).any(dim=1)


def completion_mask(
    completion_ids: Tensor, eos_token_id: int | Sequence[int], mask_truncated: bool = False
) -> Tensor:
    """(N, T) long mask: 1 up to and including the first EOS, 0 after it (padding, later EOS).

        mask[n, t] = 1[t <= first_eos(n)],   first_eos(n) = T when row n has no EOS

    ``mask_truncated``: rows without any EOS are all 0 (DAPO's overlong filtering), so truncated
    completions contribute no gradient.
    """
    hits = _eos_hits(completion_ids, eos_token_id)
    n, t = hits.shape
    has_eos = hits.any(dim=1)
    first = torch.where(has_eos, hits.int().argmax(dim=1), torch.full((n,), t, device=hits.device))
    mask = torch.arange(t, device=hits.device).unsqueeze(0) <= first.unsqueeze(1)
    if mask_truncated:
        mask = mask & has_eos.unsqueeze(1)
    return mask.long()


# ----------------------------------------------------------------------------------------------- KL
def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020), elementwise:

    d = ref_logp - logp;   k3 = exp(d) - d - 1  >= 0, and 0 iff logp == ref_logp.
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


# ---------------------------------------------------------------- train / inference mismatch (vLLM IS)
def check_is_correction(mode: str, clip_max: float | None, clip_min: float | None) -> None:
    """Reject settings TRL 1.16 rejects (``GRPOConfig.__post_init__``, or at the first batch for an unknown
    mode), plus bounds that make no sense for a ratio (NaN, negative, clip_max <= 0)."""
    if mode not in IS_CORRECTION_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {list(IS_CORRECTION_MODES)}, got {mode!r}")
    for name, value in (("vllm_importance_sampling_clip_max", clip_max),
                        ("vllm_importance_sampling_clip_min", clip_min)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isnan(value) or value < 0):
            raise ValueError(f"{name} must be None or a number >= 0, got {value!r}")
    if clip_max is not None and clip_max <= 0:
        raise ValueError(f"vllm_importance_sampling_clip_max must be > 0 (or None: no upper bound), got {clip_max!r}")
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"vllm_importance_sampling_clip_min ({clip_min}) must be less than "
                         f"vllm_importance_sampling_clip_max ({clip_max}).")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError("at least one of vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max "
                         f"must be set when vllm_importance_sampling_mode is a *_truncate mode (got {mode!r})")


def _is_log_ratio(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, mode: str) -> Tensor:
    """log(pi_trainer / pi_engine) per token (N, T) or summed per sequence (N, 1), before any bound."""
    diff = (old_logps - sampling_logps) * mask
    # A token the engine could not score (NaN) gets ratio 1 (no correction), as TRL; masked tokens give 0
    # too (even an engine's -inf there: inf * 0 is NaN, then 0).
    diff = torch.nan_to_num(diff, nan=0.0)
    return diff.sum(dim=-1, keepdim=True) if mode.startswith("sequence") else diff


@torch.no_grad()
def importance_sampling_correction(
    old_logps: Tensor,
    sampling_logps: Tensor,
    mask: Tensor,
    mode: str = "sequence_mask",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> Tensor:
    """TRL 1.16's ``vllm_importance_sampling_ratio``: weights that correct for completions sampled by an
    inference engine whose log-probs differ from the trainer's. (N, T) inputs; returns (N, T) for token
    modes, (N, 1) for sequence modes; no gradient.

        d_t = nan_to_num((old_t - sampling_t) * m_t, nan=0)   (masked / unscored tokens: d = 0, ratio 1)
        token_*:    rho_t = exp(d_t)
        sequence_*: rho   = exp(sum_t d_t)                     (one ratio per completion, unnormalised)
        *_truncate: rho <- clamp(rho, clip_min, clip_max)      (None: that side unbounded)
        *_mask:     rho <- 0 where rho < clip_min or rho > clip_max

    ``grpo_loss(..., importance_sampling_ratio=rho)`` multiplies the clipped surrogate by it (not the KL).
    """
    check_is_correction(mode, clip_max, clip_min)
    if sampling_logps.shape != old_logps.shape or mask.shape != old_logps.shape:
        raise ValueError(f"old_logps, sampling_logps and mask must have one shape; got {tuple(old_logps.shape)}, "
                         f"{tuple(sampling_logps.shape)}, {tuple(mask.shape)}")
    ratio = torch.exp(_is_log_ratio(old_logps, sampling_logps, mask, mode))
    if mode.endswith("_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


@torch.no_grad()
def importance_sampling_stats(
    old_logps: Tensor,
    sampling_logps: Tensor,
    mask: Tensor,
    ratio: Tensor,
    mode: str = "sequence_mask",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> dict[str, Tensor]:
    """The mismatch metrics TRL 1.16 logs for one generation batch (``_generate_and_score_completions``),
    plus the fraction of ratios its bounds changed:

        sampling/sampling_logp_difference/{mean,max}: |old - sampling| over mask == 1 tokens, NaN ones left out
        sampling/importance_sampling_ratio/{min,mean,max}: ``ratio`` (after the bounds) over mask == 1
            tokens (token modes) or over every row (sequence modes)
        sampling/importance_sampling_ratio/{masked,truncated}_fraction: the share of those ratios outside
            [clip_min, clip_max] before the bounds, i.e. zeroed (*_mask) or clamped (*_truncate); not in TRL

    An empty selection gives 0, as TRL.
    """
    m = mask.bool()
    delta = torch.abs(old_logps - sampling_logps)
    delta = delta[m & ~torch.isnan(delta)]
    zero = old_logps.new_zeros(())
    raw = torch.exp(_is_log_ratio(old_logps, sampling_logps, mask, mode))
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    outside = (raw < low) | (raw > high)
    if mode.startswith("sequence"):
        flat, outside = ratio.flatten(), outside.flatten()
    else:
        flat, outside = ratio[m], outside[m]
    kind = "masked" if mode.endswith("_mask") else "truncated"

    def reduce(x: Tensor, fn) -> Tensor:
        return fn(x) if x.numel() > 0 else zero

    return {
        "sampling/sampling_logp_difference/mean": reduce(delta, torch.mean),
        "sampling/sampling_logp_difference/max": reduce(delta, torch.max),
        "sampling/importance_sampling_ratio/min": reduce(flat, torch.min),
        "sampling/importance_sampling_ratio/mean": reduce(flat, torch.mean),
        "sampling/importance_sampling_ratio/max": reduce(flat, torch.max),
        f"sampling/importance_sampling_ratio/{kind}_fraction": reduce(outside.to(zero.dtype), torch.mean),
    }


# --------------------------------------------------------------------------------------------- loss
@dataclass
class GRPOStats:
    """Detached scalars for logging; token means are over mask == 1 (sequence means at sequence level).

    clip_ratio_low = mean[(ratio < 1 - eps_low) & (A < 0)], clip_ratio_high = mean[(ratio > 1 + eps_high)
    & (A > 0)], clip_ratio_region = mean[low | high], as TRL logs them.
    """

    kl: Tensor
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio_region: Tensor
    ratio_mean: Tensor
    num_tokens: Tensor

    def as_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    num_sequences: int | float | Tensor | None = None,
    importance_sampling_level: str = "token",
    importance_sampling_ratio: Tensor | None = None,
) -> tuple[Tensor, GRPOStats]:
    """Clipped GRPO surrogate with optional k3 KL penalty; returns (scalar loss, stats).

    Per token (N, T), with mu the sampling policy's log-probs (``old_logps``; None means on-policy,
    old = logps.detach(), so ratio == 1 in value but carries the gradient of logps):

        ratio   = exp(logp - old)                         ("token" level)
        ratio_n = exp(sum_t m (logp - old) / max(sum_t m, 1))   ("sequence" level, GSPO; one per row)
        l       = -min(ratio * A_n, clamp(ratio, 1 - eps_low, 1 + eps_high) * A_n) + beta * k3(logp, ref)

    Aggregation with mask m over the N rows given here:

        grpo:    sum_n [ sum_t m l / max(sum_t m, 1) ] / S
        bnpo:    sum m l / I
        dr_grpo: sum m l / (S * max_completion_length)
        dapo:    sum m l / I

    with S = ``num_sequences`` (default N: the mean over these rows) and I = ``num_items_in_batch``
    (default for bnpo: sum m, these rows' active tokens; required for dapo). Pass the counts of a larger
    batch to score its micro-batches so that their losses add up to the batch's loss:
    ``loss_normalizer`` gives them for an accumulation window on R ranks, as TRL normalises.

    ``importance_sampling_ratio`` ((N, T) or (N, 1), from ``importance_sampling_correction``): completions
    sampled by another engine; it multiplies the clipped surrogate term, before the KL term is added (TRL
    1.16 ``_compute_loss``): l = -min(...) * rho + beta * k3. None (default) leaves the loss as it was.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if logps.dim() != 2:
        raise ValueError(f"logps must be (N, T), got shape {tuple(logps.shape)}")
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if x is not None and x.shape != logps.shape:
            raise ValueError(
                f"{name} must have the shape of logps {tuple(logps.shape)}, got {tuple(x.shape)}"
            )
    n_seq = logps.shape[0]
    if advantages.shape not in ((n_seq,), (n_seq, 1)):
        raise ValueError(f"advantages must be ({n_seq},) or ({n_seq}, 1), got {tuple(advantages.shape)}")
    if importance_sampling_ratio is not None and importance_sampling_ratio.shape not in (logps.shape, (n_seq, 1)):
        raise ValueError(f"importance_sampling_ratio must be {tuple(logps.shape)} or ({n_seq}, 1), "
                         f"got {tuple(importance_sampling_ratio.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference model's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the generation length limit)")
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError(
            "loss_type='dapo' needs num_items_in_batch (active tokens in the accumulation window)"
        )
    eps_low = epsilon_low
    eps_high = epsilon_low if epsilon_high is None else epsilon_high

    m = mask.to(logps.dtype)
    adv = advantages.reshape(n_seq, 1).to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)  # (N, T) or (N, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if importance_sampling_ratio is not None:
        per_token = per_token * importance_sampling_ratio
    per_token_kl = kl_k3(logps, ref_logps) if ref_logps is not None else None
    if beta != 0.0:
        per_token = per_token + beta * per_token_kl
    per_token = per_token.expand_as(logps)

    total = (per_token * m).sum()
    seqs = n_seq if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / seqs
    elif loss_type == "bnpo":
        loss = total / (m.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch)
    elif loss_type == "dr_grpo":
        loss = total / (seqs * max_completion_length)
    else:
        loss = total / num_items_in_batch

    with torch.no_grad():
        n_tok = m.sum()

        def masked_mean(x: Tensor) -> Tensor:
            if x.shape[1] == 1:  # sequence level: one value per row
                return x.float().mean()
            return (x * m).sum() / n_tok.clamp(min=1.0)

        low = ((ratio < 1 - eps_low) & (adv < 0)).to(logps.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        stats = GRPOStats(
            kl=masked_mean(per_token_kl.detach()) if per_token_kl is not None else logps.new_zeros(()),
            clip_ratio_low=masked_mean(low),
            clip_ratio_high=masked_mean(high),
            clip_ratio_region=masked_mean(torch.maximum(low, high)),
            ratio_mean=masked_mean(ratio.detach()),
            num_tokens=n_tok,
        )
    return loss, stats


def loss_normalizer(
    loss_type: str,
    *,
    step_tokens: float,
    window_sequences: float,
    window_tokens: float,
    world_size: int = 1,
    num_steps: int = 1,
) -> dict[str, float]:
    """``grpo_loss`` keyword counts that make the micro-batch losses of one accumulation window, summed
    over its ``num_steps`` batches and averaged over ``world_size`` ranks (DDP / FSDP average gradients),
    equal TRL 1.16's ``GRPOTrainer._compute_loss``:

        grpo, dr_grpo:  S = window_sequences / R     (TRL: mean over a batch's rows, / accumulation steps)
        dapo:           I = window_tokens / R        (TRL: num_items_in_batch / num_processes)
        bnpo:           I = step_tokens * num_steps  (TRL: this rank's batch tokens, / accumulation steps)

    ``window_*`` are summed over the window's batches and all ranks; ``step_tokens`` counts this rank's
    current batch only. Rows that dynamic sampling drops count in none of them (they get zero weight),
    so a rank that drops every group adds nothing and the others keep their scale. Counts are clamped
    to >= 1 (an empty window has zero loss anyway).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("grpo", "dr_grpo"):
        return {"num_sequences": max(float(window_sequences), 1.0) / world_size}
    if loss_type == "dapo":
        return {"num_items_in_batch": max(float(window_tokens), 1.0) / world_size}
    return {"num_items_in_batch": max(float(step_tokens), 1.0) * num_steps}


# ------------------------------------------------------------------------------------- micro-batches
def completion_extents(mask: Tensor) -> Tensor:
    """(N, T) completion mask -> (N,) the columns a row's loss reads: last index with mask 1, plus one (0 for
    a row with none). A pass over some rows may drop every column past their largest extent."""
    cols = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.bool() * cols).amax(dim=1) if mask.shape[1] else mask.new_zeros(mask.shape[0], dtype=torch.long)


def token_budget_micro_batches(
    prompt_lengths: Tensor, completion_lengths: Tensor, rows: Tensor, max_tokens: int,
) -> list[Tensor]:
    """Split ``rows`` into passes of at most ``max_tokens`` tokens (verl's ``use_dynamic_bsz``), where a pass
    over rows S runs a padded (|S|, max_S p + max_S c) block: each pass trimmed to its own longest prompt
    p (non-pad prompt tokens) and completion c (``completion_extents``).

    Rows go longest first (prompt length, then completion length, then index), cut greedily: a pass takes
    the next row while (|S| + 1) (max p + max c) <= max_tokens. verl balances the token sums of a fixed
    number of passes (``rearrange_micro_batches``) because it runs unpadded sequences; a padded pass costs
    its longest row per row, so rows of like length go together here. Each pass lists its rows in
    ascending order. Which rows share a pass never changes the gradient (every loss normaliser is fixed
    for the window, ``loss_normalizer``); ranks whose pass counts differ pad them as dynamic sampling does.
    A row longer than ``max_tokens`` alone is an error (a pass holds at least one row).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    rows = rows.reshape(-1).long()
    if rows.numel() == 0:
        return []
    p = prompt_lengths.reshape(-1).long()[rows].tolist()
    c = completion_lengths.reshape(-1).long()[rows].tolist()
    idx = rows.tolist()
    order = sorted(range(len(idx)), key=lambda i: (-p[i], -c[i], idx[i]))
    passes: list[list[int]] = []
    current: list[int] = []
    top_p = top_c = 0
    for i in order:
        if p[i] + c[i] > max_tokens:
            raise ValueError(f"micro_batch_tokens = {max_tokens} is below one row's tokens: prompt {p[i]} + "
                             f"completion {c[i]} = {p[i] + c[i]} (row {idx[i]}); a pass holds at least one row, so "
                             "raise it to at least the longest prompt plus max_new_tokens")
        new_p, new_c = max(top_p, p[i]), max(top_c, c[i])
        if current and (len(current) + 1) * (new_p + new_c) > max_tokens:
            passes.append(current)
            current, new_p, new_c = [], p[i], c[i]
        current.append(idx[i])
        top_p, top_c = new_p, new_c
    passes.append(current)
    return [torch.tensor(sorted(s), dtype=torch.long, device=rows.device) for s in passes]
