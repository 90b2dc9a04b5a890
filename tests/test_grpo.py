"""GRPO math against hand computations and independent loop-based references (not grpo.py helpers)."""

from __future__ import annotations

import math

import pytest
import torch

from emorl_pl.grpo import (
    completion_mask,
    group_advantages,
    group_reward_std,
    grpo_loss,
    is_truncated,
    kl_k3,
    zero_std_groups,
)
from emorl_pl.kernels import token_logprobs

TOL = dict(atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------- advantages
def _ref_advantages(rewards: list[float], g: int, scale: str, eps: float = 1e-4) -> list[float]:
    """Plain-Python reference: NaN ignored, Bessel std, constant groups -> 0."""

    def mean_std(vals):
        if len(vals) <= 1:
            return (vals[0] if vals else 0.0), 0.0
        mu = sum(vals) / len(vals)
        return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))

    all_valid = [r for r in rewards if not math.isnan(r)]
    _, batch_std = mean_std(all_valid)
    out = []
    for b in range(len(rewards) // g):
        grp = rewards[b * g : (b + 1) * g]
        vals = [r for r in grp if not math.isnan(r)]
        mu, std = mean_std(vals)
        constant = len(vals) <= 1 or max(vals) == min(vals)
        for r in grp:
            if math.isnan(r) or constant:
                out.append(0.0)
            elif scale == "group":
                out.append((r - mu) / (std + eps))
            elif scale == "batch":
                out.append((r - mu) / (batch_std + eps))
            else:
                out.append(r - mu)
    return out


def test_advantages_hand_computed_group_scale():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(r, 4, scale="group")
    s = math.sqrt(1 / 3)  # Bessel: sum (0.5^2 * 4) / 3 = 1/3
    exp = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (s + 1e-4)
    torch.testing.assert_close(adv[:4], exp, **TOL)
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))


def test_advantages_hand_computed_batch_and_none():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    # batch: mean 0.75, sum sq dev = 2*0.75^2 + 6*0.25^2 = 1.5, var = 1.5 / 7
    bstd = math.sqrt(1.5 / 7)
    adv_b = group_advantages(r, 4, scale="batch")
    torch.testing.assert_close(
        adv_b[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (bstd + 1e-4)
    )
    assert torch.equal(adv_b[4:], torch.zeros(4, dtype=torch.float64))
    adv_n = group_advantages(r, 4, scale="none")
    torch.testing.assert_close(adv_n, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_reference_with_nans(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(24, generator=g, dtype=torch.float64)
    r[[1, 5, 6, 13]] = float("nan")
    r[16:20] = 0.3  # constant group
    r[20:24] = float("nan")
    r[21] = 2.0  # single valid reward
    adv = group_advantages(r, 4, scale=scale)
    exp = torch.tensor(_ref_advantages(r.tolist(), 4, scale), dtype=torch.float64)
    torch.testing.assert_close(adv, exp, **TOL)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv[[1, 5, 6, 13]], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(adv[16:24], torch.zeros(8, dtype=torch.float64))


def test_advantages_nan_ignored_by_hand():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0])  # valid 1, 0, 2: mean 1, std 1
    adv = group_advantages(r, 4, scale="group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.0, 1.0]), **TOL)


def test_constant_group_exact_zero_even_when_mean_is_inexact():
    r = torch.full((6,), 0.1, dtype=torch.float32)  # sum/n is not exactly 0.1 in float32
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, 3, scale=scale)
        assert torch.equal(adv, torch.zeros(6))
    assert torch.equal(group_reward_std(r, 3), torch.zeros(2))


def test_group_std_and_zero_std_groups():
    r = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 1, 1, 1, 1, float("nan"), 2.0, float("nan"), float("nan"), 3.0, 1.0, 2.0, 0.0]
    )
    std = group_reward_std(r, 4)
    exp_last = torch.tensor([3.0, 1.0, 2.0, 0.0]).std().item()
    torch.testing.assert_close(std, torch.tensor([math.sqrt(1 / 3), 0.0, 0.0, exp_last]), **TOL)
    assert zero_std_groups(r, 4).tolist() == [False, True, True, False]


def test_advantages_bad_shapes():
    with pytest.raises(ValueError, match="divisible by group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 4, scale="rank")
    with pytest.raises(ValueError, match="divisible"):
        zero_std_groups(torch.zeros(5), 2)


# ----------------------------------------------------------------------------------- token log-probs
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(chunk_size, temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 33, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 33, (5, 7), generator=g)
    got = token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    exp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_token_logprobs_gradient_matches_autograd(chunk_size):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, 17, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 17, (4, 6), generator=g)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    a = base.clone().requires_grad_(True)
    (token_logprobs(a, tokens, temperature=0.8, chunk_size=chunk_size) * w).sum().backward()
    b = base.clone().requires_grad_(True)
    ((torch.log_softmax(b / 0.8, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)
    assert torch.equal(a.detach(), base)  # the backward works on copies: the logits are left as they were


def test_token_logprobs_float32_and_bf16():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 1000, generator=g) * 4
    tokens = torch.randint(0, 1000, (3, 5), generator=g)
    exp = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got32 = token_logprobs(logits, tokens, chunk_size=2)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), exp, atol=1e-5, rtol=1e-6)
    bf = logits.bfloat16()
    exp_bf = torch.log_softmax(bf.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got_bf = token_logprobs(bf, tokens, chunk_size=2)
    assert got_bf.dtype == torch.float32  # logsumexp done in float32, not bf16
    torch.testing.assert_close(got_bf.double(), exp_bf, atol=1e-4, rtol=1e-5)
    bfg = bf.clone().requires_grad_(True)
    token_logprobs(bfg, tokens).sum().backward()
    assert bfg.grad.dtype == torch.bfloat16 and torch.isfinite(bfg.grad.float()).all()


def test_token_logprobs_bad_shapes():
    with pytest.raises(ValueError, match="tokens must be"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


# -------------------------------------------------------------------------------------------- masks
def test_completion_mask_positions():
    eos, pad = 9, 0
    ids = torch.tensor(
        [
            [5, 6, 9, pad, pad],  # EOS at 2
            [9, pad, pad, pad, pad],  # EOS at 0
            [5, 6, 7, 8, 4],  # no EOS
            [5, 9, 5, 9, pad],  # two EOS: first counts
            [1, 2, 3, 4, 9],  # EOS last
        ]
    )
    exp = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(completion_mask(ids, eos), exp)
    assert is_truncated(ids, eos).tolist() == [False, False, True, False, False]
    exp_trunc = exp.clone()
    exp_trunc[2] = 0
    assert torch.equal(completion_mask(ids, eos, mask_truncated=True), exp_trunc)


def test_completion_mask_multiple_eos_ids():
    ids = torch.tensor([[5, 7, 8, 9], [5, 8, 7, 9], [1, 2, 3, 4]])
    exp = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(completion_mask(ids, [7, 8]), exp)
    assert torch.equal(
        completion_mask(ids, (8, 7), mask_truncated=True), torch.tensor([[1, 1, 0, 0]] * 2 + [[0] * 4])
    )
    assert is_truncated(ids, [7, 8]).tolist() == [False, False, True]


# ----------------------------------------------------------------------------------------------- KL
def test_kl_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -0.1, -1.0], dtype=torch.float64)
    exp = torch.tensor(
        [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())], dtype=torch.float64
    )
    got = kl_k3(logp, ref)
    torch.testing.assert_close(got, exp, **TOL)
    assert got[1].item() == 0.0
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_k3(a, b) >= 0).all()
    assert torch.equal(kl_k3(a, a), torch.zeros(1000))


# --------------------------------------------------------------------------------------------- loss
def _ref_loss(
    logps, old, ref, adv, mask, beta, el, eh, loss_type, max_len=None, num_items=None, level="token"
):
    """Loop reference written straight from the GRPO/DAPO/Dr.GRPO/GSPO formulas."""
    n, t = logps.shape
    rows, total, active = [], 0.0, 0.0
    for i in range(n):
        mi = [float(mask[i, j]) for j in range(t)]
        cnt = sum(mi)
        if level == "sequence":
            s = sum(mi[j] * (float(logps[i, j]) - float(old[i, j])) for j in range(t)) / max(cnt, 1.0)
        row = 0.0
        for j in range(t):
            lr = s if level == "sequence" else float(logps[i, j]) - float(old[i, j])
            ratio = math.exp(lr)
            a = float(adv[i])
            lt = -min(ratio * a, min(max(ratio, 1 - el), 1 + eh) * a)
            if beta:
                d = float(ref[i, j]) - float(logps[i, j])
                lt += beta * (math.exp(d) - d - 1)
            row += mi[j] * lt
        rows.append(row / max(cnt, 1.0))
        total += row
        active += cnt
    if loss_type == "grpo":
        return sum(rows) / n
    if loss_type == "bnpo":  # the given batch count, else these rows' active tokens
        return total / (max(active, 1.0) if num_items is None else num_items)
    if loss_type == "dr_grpo":
        return total / (n * max_len)
    return total / num_items


def _random_inputs(seed=5, n=6, t=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.2]
    ref = logps + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) > 0.3).long()
    mask[2] = 0  # all-masked row
    mask[0] = 1
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_matches_loop_reference(loss_type, beta, level):
    logps, old, ref, adv, mask = _random_inputs()
    kw = dict(max_completion_length=8, num_items_in_batch=37)
    loss, stats = grpo_loss(
        logps,
        old,
        ref,
        adv,
        mask,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        importance_sampling_level=level,
        **kw,
    )
    exp = _ref_loss(logps, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, 8, 37, level)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(exp, rel=1e-6, abs=1e-6)
    # KL stat: masked token mean of k3 (logged even with beta = 0 when a reference is given)
    ks = [
        math.exp(float(ref[i, j] - logps[i, j])) - float(ref[i, j] - logps[i, j]) - 1
        for i in range(6)
        for j in range(5)
        if mask[i, j]
    ]
    assert stats.kl.item() == pytest.approx(sum(ks) / len(ks), rel=1e-6)
    assert stats.num_tokens.item() == mask.sum().item()


def test_loss_epsilon_high_defaults_to_low():
    logps, old, ref, adv, mask = _random_inputs(seed=6)
    loss, _ = grpo_loss(logps, old, None, adv, mask, epsilon_low=0.1)
    assert loss.item() == pytest.approx(
        _ref_loss(logps, old, ref, adv, mask, 0.0, 0.1, 0.1, "grpo"), rel=1e-6
    )


def test_clipping_by_hand():
    # one token per row; ratio = exp(logp - old)
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 1.0], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, -1.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    logps = torch.zeros(6, 1, dtype=torch.float64)
    old = -torch.log(ratios).unsqueeze(1)
    mask = torch.ones(6, 1)
    loss, st = grpo_loss(logps, old, None, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo")
    # row 0: min(1.5*2, 1.2*2) = 2.4 (clipped high); row 1: min(0.5*-1, 0.8*-1) = -0.8 (clipped low)
    # row 2: min(1.5*-1, 1.2*-1) = -1.5 (not clipped); row 3: min(0.5*3, 0.8*3) = 1.5 (not clipped)
    # row 4: 1.1 (inside); row 5: 0
    per_tok = [-2.4, 0.8, 1.5, -1.5, -1.1, 0.0]
    assert loss.item() == pytest.approx(sum(per_tok) / 6, rel=1e-9)
    assert st.clip_ratio_high.item() == pytest.approx(1 / 6)
    assert st.clip_ratio_low.item() == pytest.approx(1 / 6)
    assert st.clip_ratio_region.item() == pytest.approx(2 / 6)
    assert st.ratio_mean.item() == pytest.approx(ratios.mean().item())
    assert st.kl.item() == 0.0


def test_clip_stats_respect_mask():
    ratios = torch.tensor([[1.5, 1.5, 0.5]], dtype=torch.float64)
    logps = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    _, st = grpo_loss(logps, -torch.log(ratios), None, adv, torch.tensor([[1, 0, 1]]))
    assert st.clip_ratio_high.item() == pytest.approx(0.5)  # masked 1.5 not counted
    assert st.clip_ratio_low.item() == 0.0  # 0.5 with A > 0 is not a clip
    assert st.ratio_mean.item() == pytest.approx(1.0)


def test_beta_adds_beta_times_aggregated_kl():
    logps, old, ref, adv, mask = _random_inputs(seed=7)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        kw = dict(loss_type=lt, max_completion_length=8, num_items_in_batch=20)
        l0, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.0, **kw)
        l1, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.5, **kw)
        kl_only = _ref_loss(logps, logps, ref, torch.zeros(6), mask, 1.0, 0.2, 0.2, lt, 8, 20)
        assert (l1 - l0).item() == pytest.approx(0.5 * kl_only, rel=1e-6)


def test_on_policy_gradient_is_minus_advantage_over_denominator():
    g = torch.Generator().manual_seed(8)
    n, t = 4, 5
    base = -torch.rand(n, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    m = mask.double()
    denoms = {
        "grpo": n * m.sum(1, keepdim=True).clamp(min=1),  # d/dlogp of mean_n(sum_t / cnt_n)
        "bnpo": torch.full((n, 1), 11.0, dtype=torch.float64),  # the given count of the local batch
        "dr_grpo": torch.full((n, 1), n * 7.0, dtype=torch.float64),
        "dapo": torch.full((n, 1), 11.0, dtype=torch.float64),
    }
    for lt, den in denoms.items():
        logps = base.clone().requires_grad_(True)
        loss, st = grpo_loss(
            logps, None, None, adv, mask, loss_type=lt, max_completion_length=7, num_items_in_batch=11
        )
        loss.backward()
        # ratio == 1 in value, d ratio / d logp = 1, never clipped: dL/dlogp = -A m / denominator
        torch.testing.assert_close(logps.grad, -adv[:, None] * m / den, **TOL)
        assert st.ratio_mean.item() == 1.0 and st.clip_ratio_region.item() == 0.0


def test_zero_advantage_zero_beta_gives_exact_zero_gradient():
    logps, old, ref, _, mask = _random_inputs(seed=9)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for o in (None, old):
            x = logps.clone().requires_grad_(True)
            loss, _ = grpo_loss(
                x,
                o,
                ref,
                torch.zeros(6, dtype=torch.float64),
                mask,
                loss_type=lt,
                max_completion_length=5,
                num_items_in_batch=9,
            )
            loss.backward()
            assert torch.equal(x.grad, torch.zeros_like(x))


def test_loss_argument_errors():
    logps, old, ref, adv, mask = _random_inputs()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="mask must have the shape"):
        grpo_loss(logps, old, ref, adv, mask[:, :3])
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logps, old, ref, adv[:3], mask)


@pytest.mark.parametrize("rows_per_block", [None, 2])
def test_exp_shifted_in_place_gives_logsumexp_and_softmax(rows_per_block, monkeypatch):
    from emorl_pl import kernels
    from emorl_pl.kernels import exp_shifted_

    if rows_per_block:  # 15 rows: blocks of 2 and a last one (the default takes them in one block here)
        monkeypatch.setattr(kernels, "_EXP_BLOCK_BYTES", rows_per_block * 1001 * 8)
    g = torch.Generator().manual_seed(3)
    z = 30 * torch.randn(3, 5, 1001, generator=g, dtype=torch.float64)
    z[0, 1, ::3] = -float("inf")  # removed tokens (top-k, suppressed) weigh 0
    want_lse, want_p = torch.logsumexp(z, -1, keepdim=True), torch.softmax(z, -1)
    work = z.clone()
    peak, total = exp_shifted_(work)
    assert peak.shape == total.shape == (3, 5, 1)
    torch.testing.assert_close(peak + total.log(), want_lse)
    torch.testing.assert_close(work / total, want_p)
    assert (work[0, 1, ::3] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs_equal_the_full_logits_path(temperature, bias):
    from emorl_pl.kernels import linear_token_logprobs

    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(5, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    tokens = torch.randint(0, 30, (5, 4), generator=g)
    grad = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ours = linear_token_logprobs(hidden, weight, b, tokens, temperature, chunk_size=2)
    ref = torch.log_softmax(torch.nn.functional.linear(hidden, weight, b) / temperature, -1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    inputs = [hidden, weight] + ([b] if bias else [])
    got = torch.autograd.grad((ours * grad).sum(), inputs)
    want = torch.autograd.grad((ref * grad).sum(), inputs)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs_frozen_head_gradient_formed_in_forward(temperature, bias):
    """A frozen lm_head (LoRA): d logp / dh = (W_y - softmax(z / tau) W) / tau is formed in the forward pass;
    value and gradient equal autograd through the full logits, and it survives a very unlikely token."""
    from emorl_pl.kernels import linear_token_logprobs

    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(5, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    weight[7] = -40.0 * hidden.detach()[0, 0] / hidden.detach()[0, 0].norm()  # z_7 ~ -40 |h|: p_7 underflows
    b = torch.randn(30, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, 30, (5, 4), generator=g)
    tokens[0, 0] = 7
    grad = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ours = linear_token_logprobs(hidden, weight, b, tokens, temperature, chunk_size=2)
    ref = torch.log_softmax(torch.nn.functional.linear(hidden, weight, b) / temperature, -1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)
    assert ref[0, 0] < -100 and torch.isfinite(ours).all()
    # backward keeps one (N, T, D) tensor, not h, W and the tokens to recompute the logits from
    assert [t.shape for t in ours.grad_fn.saved_tensors] == [hidden.shape]
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)
    (got,) = torch.autograd.grad((ours * grad).sum(), [hidden])
    (want,) = torch.autograd.grad((ref * grad).sum(), [hidden])
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    # The same under no_grad (the reference pass) and in float32 (the gradient keeps hidden's dtype).
    with torch.no_grad():
        torch.testing.assert_close(linear_token_logprobs(hidden, weight, b, tokens, temperature, 3), ref.detach())
    h32 = hidden.detach().float().requires_grad_()
    out32 = linear_token_logprobs(h32, weight.float(), None if b is None else b.float(), tokens, temperature, 2)
    (g32,) = torch.autograd.grad((out32 * grad.float()).sum(), [h32])
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), want, atol=1e-4, rtol=1e-4)
