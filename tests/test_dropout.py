"""The policy's dropout switch: dropout acts in gradient passes only (default, as TRL) or nowhere; the policy
is in training mode after loading (Hugging Face gradient checkpointing needs it)."""

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
