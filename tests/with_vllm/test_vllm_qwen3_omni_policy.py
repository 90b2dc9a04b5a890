"""``rollout_engine: vllm`` with the real-shape Qwen3-Omni-30B-A3B thinker (128 experts, fused in memory, one
tensor per expert in the published checkpoint vLLM loads), widened to what vLLM's CPU attention takes (head_dim
64): after the policy's weights move (LoRA adapters and the fused expert weights), its own sync (each fused
weight split per expert as it streams) makes the engine decode the updated model: its greedy tokens are the
fused decode's, its sampling log-probs are ours. CPU vLLM environment only (``VLLM_CPU_KVCACHE_SPACE=1
.venv-vllm/bin/pytest tests/with_vllm/test_vllm_qwen3_omni_policy.py``)."""

from __future__ import annotations

import pytest
import torch
from engine_setup import ENGINE, INSTRUCTION, SR, ours_greedy, waves

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.tiny import build_real_shape_qwen3_omni

MAX_NEW = 16
pytestmark = pytest.mark.usefixtures("torchvision_free")


def test_qwen3_omni_on_vllm_decodes_the_synced_lora_and_expert_weights(tmp_path):
    model_dir = build_real_shape_qwen3_omni(tmp_path / "model", hidden_size=128, num_heads=2, num_kv_heads=1,
                                            head_dim=64, audio_heads=1)
    policy = AudioLMPolicy(str(model_dir), lora=LoraSettings(r=4, alpha=8), rollout_engine="vllm", vllm=ENGINE,
                           dropout=False).load()
    prompts = policy.build_prompts(waves(), SR, INSTRUCTION)
    before = ours_greedy(policy, prompts, MAX_NEW)  # through the engine, on the weights as loaded
    moved = {}
    with torch.no_grad():  # an update: the adapters (attention) and the base experts (not adapted: LoRA skips them)
        g = torch.Generator().manual_seed(0)
        for name, p in policy.hf_model.named_parameters():
            if "lora_B" in name or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                moved[name] = (0.5 if "lora_B" in name else 0.05) * torch.randn(p.shape, generator=g)
                p.add_(moved[name])
    assert sum(".experts." in n for n in moved) == 2 * len(policy.hf_model.model.layers)

    after = ours_greedy(policy, prompts, MAX_NEW)  # the policy syncs the engine first
    assert after != before, "the update must change the greedy decode"
    assert min(map(len, after)) > 4
    fused = AudioLMPolicy(str(model_dir), lora=LoraSettings(r=4, alpha=8), dropout=False).load()
    fused.load_state_dict(policy.state_dict())
    assert after == ours_greedy(fused, prompts, MAX_NEW), "the engine's greedy tokens are the fused decode's"

    rollout = policy.rollout(prompts, 2, temperature=0.8, max_new_tokens=MAX_NEW)  # engine samples, seeded
    assert policy.sync_engine_weights() is False, "no change since the last sync: nothing to send"
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        ours = policy.completion_logps(rollout, temperature=0.8)
    diff = (ours - rollout.sampling_logps).abs()[mask]
    assert diff.numel() > 20 and diff.max().item() < 1e-3, diff.max().item()
    # the experts' update alone moves these log-probs far beyond that (6e-2 here): the check sees a mis-split
    # expert, and a reload that leaves the experts' CPU kernel layout stale (vllm_engine.repack_cpu_moe_after_reload)
    with torch.no_grad():
        params = dict(policy.hf_model.named_parameters())
        for name, delta in moved.items():
            if ".experts." in name:
                params[name].sub_(delta)
        stale = policy.completion_logps(rollout, temperature=0.8)
    assert (stale - rollout.sampling_logps).abs()[mask].max().item() > 1e-2
    policy.engine().close()
