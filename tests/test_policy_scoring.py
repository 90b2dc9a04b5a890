"""Scoring with the policy: the dropout switch (dropout acts in gradient passes only, as TRL, or nowhere), the
policy in training mode after loading (Hugging Face gradient checkpointing needs it), and log-probs that
never build the (n, T, V) logits."""

from __future__ import annotations

import torch
from torch import nn

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings


def _policy(model_dir: str, dropout: bool) -> AudioLMPolicy:
    policy = AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.5), dropout=dropout).load()
    with torch.no_grad():  # non-zero adapters, so that their dropout changes the output
        g = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return policy


def _rollout(policy: AudioLMPolicy):
    g = torch.Generator().manual_seed(1)
    prompts = policy.build_prompts([0.1 * torch.randn(16000, generator=g)], 16000, "Which emotion?")
    torch.manual_seed(2)
    return policy.rollout(prompts, 2, max_new_tokens=5)


def test_dropout_acts_in_gradient_passes_only(real_model_dir):
    policy = _policy(real_model_dir, dropout=True)
    assert policy.model.training and all(m.training for m in policy.model.modules())
    assert {m.p for m in policy.model.modules() if isinstance(m, nn.Dropout)} == {0.5}
    rollout = _rollout(policy)
    with torch.no_grad():  # scoring without gradient: eval mode, deterministic
        a, b = policy.completion_logps(rollout), policy.completion_logps(rollout)
    assert torch.equal(a, b)
    assert policy.model.training, "the mode is restored after scoring"
    torch.manual_seed(3)
    c = policy.completion_logps(rollout)  # gradient pass: LoRA dropout active
    assert (c.detach() - a).abs().max() > 1e-4


def test_dropout_false_sets_every_dropout_to_zero(real_model_dir):
    policy = _policy(real_model_dir, dropout=False)
    assert {m.p for m in policy.model.modules() if isinstance(m, nn.Dropout)} == {0.0}
    rates = [getattr(m, n) for m in policy.model.modules() for n in ("dropout", "attention_dropout", "activation_dropout")
             if isinstance(getattr(m, n, None), float)]
    assert rates and set(rates) == {0.0}
    rollout = _rollout(policy)
    with torch.no_grad():
        a = policy.completion_logps(rollout)
    torch.manual_seed(3)
    torch.testing.assert_close(policy.completion_logps(rollout).detach(), a, atol=1e-5, rtol=0)


def test_completion_logps_never_build_the_full_logits_and_match_them(real_model_dir, monkeypatch):
    """Full fine-tuning (lm_head trained): the chunked lm_head path gives the log-probs and gradients of
    log_softmax(lm_head(h)), the full (n, T, V) logits path, which the test substitutes as the oracle."""
    import emorl_pl.modules.policy as policy_module
    from emorl_pl.kernels import token_logprobs

    policy = AudioLMPolicy(real_model_dir, lora=None, dropout=False).load()
    rollout = _rollout(policy)
    params = [p for p in policy.trainable_parameters()]

    def run():
        for p in params:
            p.grad = None
        logps = policy.completion_logps(rollout, temperature=0.8)
        (logps * rollout.completion_mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    ours, ours_grads = run()
    monkeypatch.setattr(policy_module, "linear_token_logprobs", lambda h, w, b, tok, tau, chunk: token_logprobs(
        torch.nn.functional.linear(h, w, b), tok, temperature=tau, chunk_size=chunk))
    full, full_grads = run()
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    assert any("lm_head" in n for n in ours_grads) and set(ours_grads) == set(full_grads)
    for name in full_grads:
        torch.testing.assert_close(ours_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)
