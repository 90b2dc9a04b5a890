"""What the model-family tests share (tests/test_family_*.py, test_fused_decode.py, test_policy_omni.py): test
waveforms, a LoRA policy whose adapters are perturbed (B = 0 at init would leave them without effect), the
model's own forward on prompt + completion (the oracle of the policy's log-probs and greedy decode), the fused
decode step against the decoder's own forward, and a cold start + GRPO + validation run of a ``GRPOModule``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from emorl_pl.modules.fused_decode import FusedDecodeStep
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.sampling import shared_prefill

SR = 16000
G = 2
INSTRUCTION = "What is the emotion of the speaker?"
LABELS = ["neutral", "happy", "angry", "sad"]


def waves(lengths=(8000, 24000), seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


def perturb_lora(policy: AudioLMPolicy, seed: int = 0, scale: float = 0.3) -> AudioLMPolicy:
    """Random adapters (``scale`` x N(0, 1)), so that the adapted model differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return policy


def perturbed_lora_policy(model_dir: str, **kwargs) -> AudioLMPolicy:
    return perturb_lora(AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8), **kwargs).load())


def full_sequence_logits(model, prompts, rollout, *, feature_mask: str = "feature_attention_mask",
                         generate_positions: bool = False) -> Tensor:
    """The model's own forward (its audio tower, merge and positions) on prompt + completion: the float64 logits
    that predict each completion token. ``feature_mask``: the forward's name for the mel-frame mask;
    ``generate_positions``: pass the positions ``generate`` gives a left-padded batch (cumsum(mask) - 1)."""
    utt = torch.arange(len(rollout)) // rollout.group_size
    completion = rollout.completion_ids
    ids = torch.cat([prompts.input_ids[utt], completion], 1)
    attention = torch.cat([prompts.attention_mask[utt], torch.ones_like(completion)], 1)
    kwargs = {feature_mask: prompts.feature_attention_mask[utt]}
    if generate_positions:
        kwargs["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, input_features=prompts.input_features[utt],
                       **kwargs).logits
    p, t = prompts.input_ids.shape[1], completion.shape[1]
    return logits[:, p - 1 : p + t - 1].double()


def token_logps(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at ``ids``."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None])[..., 0]


def decode_both(policy: AudioLMPolicy, pe, merge: bool = False, group_size: int = 2, steps: int = 5, seed: int = 0,
                pack_lm_head: bool | None = None) -> tuple[Tensor, Tensor]:
    """The same random text tokens through the decoder's own forward (a KV cache of B*G rows) and through
    ``FusedDecodeStep`` (the prompt cached once per utterance): the per-step logits of each, (B*G, steps, V)."""
    hf = policy.hf_model
    decoder, embed = policy.family.decoder(hf), policy.family.embed(hf)
    mask = pe.attention_mask.repeat_interleave(group_size, 0)
    n, p = mask.shape
    attention = torch.cat([mask, mask.new_ones(n, steps)], 1)
    position = mask.long().sum(-1, keepdim=True) - 1
    tokens = torch.randint(0, 151643, (n, steps), generator=torch.Generator().manual_seed(seed))  # text ids
    with torch.no_grad():
        shared = shared_prefill(hf, policy.family, pe, 1)  # B rows: the fused step repeats each G times itself
        fused = FusedDecodeStep(decoder, hf.lm_head, [(c.keys, c.values) for c in shared.layers], attention,
                                merge=merge, repeat=group_size, pack_lm_head=pack_lm_head)
        cache = shared_prefill(hf, policy.family, pe, group_size)  # B*G rows, for the module forward
        x = pe.inputs_embeds[:, -1:].repeat_interleave(group_size, 0)
        expected, got = [], []
        for t in range(steps):
            hidden = decoder(inputs_embeds=x, attention_mask=attention[:, : p + t], position_ids=position + t,
                             past_key_values=cache, use_cache=True).last_hidden_state
            expected.append(hf.lm_head(hidden[:, -1]).float())
            got.append(fused(x, position + t))
            x = embed(tokens[:, t]).unsqueeze(1)
    return torch.stack(expected, 1), torch.stack(got, 1)


def batches(n: int, B: int = 2, seed: int = 0) -> list[dict]:
    """``n`` training batches of ``B`` utterances (0.75 s + 0.125 s per row), the 4 IEMOCAP labels in turn."""
    g = torch.Generator().manual_seed(seed)
    return [{"waveforms": [0.1 * torch.randn(12000 + 2000 * j, generator=g) for j in range(B)], "sample_rate": SR,
             "labels": [LABELS[(i + j) % 4] for j in range(B)], "keys": [f"u{i}_{j}" for j in range(B)],
             "texts": [None] * B, "corpus": ["mem"] * B, "meta": [{} for _ in range(B)]} for i in range(n)]


def grpo_module(policy: AudioLMPolicy) -> GRPOModule:
    """One cold-start (SFT) step, then GRPO: G = 2, 6 new tokens, format + accuracy rewards, SGD."""
    return GRPOModule(policy, labels="iemocap4", rewards={"format": 1.0, "accuracy": 1.0}, group_size=G,
                      max_new_tokens=6, micro_batch_size=4, beta=0.04, sft_steps=1,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5))


def fit_cold_start_grpo_and_validate(module: GRPOModule) -> None:
    """2 steps (a cold-start step, then a GRPO step) move the trainable weights with finite losses; then a
    validation pass gives rates in [0, 1]."""
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainable = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer.fit(module, DataLoader(batches(2), batch_size=None))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["sft/loss"]) and torch.isfinite(metrics["loss"]) and "kl" in metrics
    assert any(not torch.equal(p, trainable[n]) for n, p in module.policy.named_parameters() if n in trainable)

    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    evaluator.validate(module, DataLoader(batches(1, seed=3), batch_size=None), verbose=False)
    assert 0.0 <= float(evaluator.callback_metrics["val/wa"]) <= 1.0
    assert 0.0 <= float(evaluator.callback_metrics["val/format_rate"]) <= 1.0
