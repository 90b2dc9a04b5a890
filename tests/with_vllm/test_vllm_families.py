"""vLLM 0.32 serves the Omni thinkers from their real-shape test models (whole-Omni layout, emorl_pl.modules.tiny),
widened to what vLLM's CPU attention takes (head_dim 64), one engine per family: its greedy tokens are our
thinker's own argmax (up to near-ties), its sampling log-probs are ours, and it reloads in place the weights
``save_in_hub_layout`` writes. CPU vLLM environment only (``bash scripts/vllm_cpu_env.sh``;
``VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/pytest tests/with_vllm``). The engine is the policy's
(``VLLMColocateEngine``: audio-only ``limit_mm_per_prompt``); without torchvision the Omni processors load
through the ``torchvision_free`` shim (engine_setup.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_setup import INSTRUCTION, SR, assert_greedy_under, colocated_engine, engine_greedy, waves

from emorl_pl.modules.hub_layout import save_in_hub_layout
from emorl_pl.modules.policy import AudioLMPolicy

MAX_NEW = 16
pytestmark = pytest.mark.usefixtures("torchvision_free")


def _build_qwen2_5_omni(folder: Path) -> Path:
    from emorl_pl.modules.tiny import build_real_shape_qwen2_5_omni

    return build_real_shape_qwen2_5_omni(folder, hidden_size=128, num_heads=2, num_kv_heads=1, audio_heads=1)


def _build_qwen3_omni(folder: Path) -> Path:
    from emorl_pl.modules.tiny import build_real_shape_qwen3_omni

    return build_real_shape_qwen3_omni(folder, hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
                                       audio_heads=1)


@pytest.mark.parametrize("build", [_build_qwen2_5_omni, _build_qwen3_omni], ids=["qwen2_5_omni", "qwen3_omni_moe"])
def test_vllm_serves_the_thinker_and_reloads_its_weights(build, tmp_path):
    model_dir = build(tmp_path / "model")
    policy = AudioLMPolicy(str(model_dir), lora=None, dropout=False).load()
    engine = colocated_engine(model_dir, policy)
    prompts = policy.build_prompts(waves(), SR, INSTRUCTION)
    assert all(text.count(policy.processor.audio_token) == 1 for text in prompts.texts)  # vLLM expands it
    before = engine_greedy(engine, prompts, MAX_NEW)
    assert min(map(len, before)) > 4
    assert_greedy_under(policy, prompts, before)
    # sampled: the engine's log-probs of its tokens are ours (temperature 0.8)
    from emorl_pl.grpo import completion_mask, is_truncated
    from emorl_pl.modules.sampling import Rollout
    from emorl_pl.modules.vllm_engine import pack_completions

    samples = engine.sample(prompts.texts, prompts.audio, SR, 2, max_new_tokens=MAX_NEW, temperature=0.8,
                            seeds=[11, 12, 13])
    ids, logps = pack_completions(samples, MAX_NEW, policy.pad_token_id)
    mask = completion_mask(ids, policy.eos_token_ids)
    rollout = Rollout(policy.encode_prompts(prompts), ids, mask, is_truncated(ids, policy.eos_token_ids),
                      [""] * len(ids), 2, sampling_logps=logps)
    with torch.no_grad():
        ours = policy.completion_logps(rollout, temperature=0.8)
    diff = (ours - logps).abs()[mask.bool()]
    assert diff.numel() > 20 and diff.max().item() < 1e-3, diff.max().item()
    # an update to the language model, saved as the engine sync saves it, reloaded in place
    with torch.no_grad():
        torch.manual_seed(0)
        for p in policy.family.decoder(policy.hf_model).parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    save_in_hub_layout(policy.hf_model, tmp_path / "step1")
    engine.load_weights(tmp_path / "step1")
    after = engine_greedy(engine, prompts, MAX_NEW)
    assert after != before, "the update must change the greedy decode"
    assert_greedy_under(policy, prompts, after)
    engine.close()
