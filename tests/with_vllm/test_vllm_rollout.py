"""vLLM as the rollout engine, against our own decode on the real-shape Qwen2-Audio (the real tokenizer,
the published chat template, the 30 s window, the 156,032-row vocabulary), widened to what vLLM's CPU
attention takes (head_dim 64). Runs in the CPU vLLM environment only (``bash scripts/vllm_cpu_env.sh``;
``.venv-vllm/bin/pytest tests/with_vllm``): one engine for the module, its load is most of the time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_setup import INSTRUCTION, SR, colocated_engine, engine_greedy, ours_greedy, waves

from emorl_pl.modules.hub_layout import save_in_hub_layout
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.sampling import Rollout
from emorl_pl.modules.tiny import build_real_shape_qwen2_audio
from emorl_pl.modules.vllm_engine import pack_completions

MAX_NEW = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = build_real_shape_qwen2_audio(tmp_path_factory.mktemp("vllm") / "model", hidden_size=128,
                                             num_heads=2, num_kv_heads=1, audio_heads=1)
    policy = AudioLMPolicy(str(model_dir), lora=None, dropout=False)
    policy.load()
    engine = colocated_engine(model_dir, policy)
    prompts = policy.build_prompts(waves(4), SR, INSTRUCTION)
    yield policy, engine, prompts, tmp_path_factory.mktemp("weights")
    engine.close()


def test_prompt_has_one_audio_placeholder_per_audio(setup):
    policy, _, prompts, _ = setup
    assert all(t.count("<|AUDIO|>") == 1 for t in prompts.texts)
    assert len(prompts.audio) == len(prompts.texts) == 4
    # the ids transformers takes are the expanded run: the engine must not get those
    audio_id = policy.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert ((prompts.input_ids == audio_id).sum(1) > 1).all()


def test_greedy_tokens_equal_our_decode(setup):
    """vLLM's greedy tokens equal our fused decode's for every prompt, in fp32 (24 tokens each)."""
    policy, engine, prompts, _ = setup
    assert engine_greedy(engine, prompts, MAX_NEW) == ours_greedy(policy, prompts, MAX_NEW)


def test_sampled_logprobs_agree_with_the_trainers(setup):
    """The engine's per-token sampling log-probs (temperature 0.8) equal the trainer's recomputed ones on
    the same tokens within 1e-3 (fp32, different kernels)."""
    policy, engine, prompts, _ = setup
    G, temperature = 3, 0.8
    samples = engine.sample(prompts.texts, prompts.audio, SR, G, max_new_tokens=MAX_NEW, temperature=temperature,
                            seeds=[11, 12, 13, 14])
    ids, logps = pack_completions(samples, MAX_NEW, policy.pad_token_id)
    from emorl_pl.grpo import completion_mask, is_truncated

    mask = completion_mask(ids, policy.eos_token_ids)
    truncated = is_truncated(ids, policy.eos_token_ids)
    pe = policy.encode_prompts(prompts)
    texts = policy.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    rollout = Rollout(pe, ids, mask, truncated, texts, G, sampling_logps=logps)
    with torch.no_grad():
        ours = policy.completion_logps(rollout, temperature=temperature)
    diff = (ours - logps).abs()[mask.bool()]
    assert diff.numel() > 20 and diff.max().item() < 1e-3, diff.max().item()
    # seeded requests draw the same again
    again = engine.sample(prompts.texts, prompts.audio, SR, G, max_new_tokens=MAX_NEW, temperature=temperature,
                          seeds=[11, 12, 13, 14])
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in samples]


def test_weight_sync_makes_the_engine_decode_the_updated_model(setup):
    """After an update to the trainer's weights, saved in the hub layout and reloaded in place, the engine's
    greedy tokens and log-probs are the updated model's."""
    policy, engine, prompts, out = setup
    before = ours_greedy(policy, prompts, MAX_NEW)
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in policy.hf_model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    after = ours_greedy(policy, prompts, MAX_NEW)
    assert after != before, "the update must change the greedy decode"
    save_in_hub_layout(policy.hf_model, Path(out) / "step1")
    engine.load_weights(Path(out) / "step1")
    assert engine_greedy(engine, prompts, MAX_NEW) == after
    assert not math.isnan(sum(s.logprobs[0] for g in engine.sample(prompts.texts, prompts.audio, SR, 1,
                                                                   max_new_tokens=4) for s in g))
