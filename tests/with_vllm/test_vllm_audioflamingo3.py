"""vLLM serves the real-shape Audio Flamingo 3 (the real tokenizer and <sound> id, the published chat template,
the 30 s window, 151,672 rows; emorl_pl.modules.tiny_audioflamingo3) from its published key layout, and its
greedy tokens and sampling log-probs equal our decode's. Widened to what vLLM's CPU attention takes (head_dim
64 in the text and audio layers). Runs in the CPU vLLM environment only (``.venv-vllm/bin/pytest
tests/with_vllm``); one engine for the module."""

from __future__ import annotations

import pytest
import torch
from engine_setup import INSTRUCTION, SR, colocated_engine, engine_greedy, ours_greedy, waves

from emorl_pl.grpo import completion_mask, is_truncated
from emorl_pl.modules.hub_layout import save_in_hub_layout
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.sampling import Rollout
from emorl_pl.modules.tiny_audioflamingo3 import build_real_shape_audioflamingo3
from emorl_pl.modules.vllm_engine import pack_completions

MAX_NEW = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = build_real_shape_audioflamingo3(tmp_path_factory.mktemp("vllm_af3") / "model", hidden_size=128,
                                                num_heads=2, num_kv_heads=1, audio_heads=1)
    policy = AudioLMPolicy(str(model_dir), lora=None, dropout=False)
    policy.load()
    engine = colocated_engine(model_dir, policy)
    prompts = policy.build_prompts(waves(), SR, INSTRUCTION, texts=[None, "let me go", None])
    yield policy, engine, prompts, tmp_path_factory.mktemp("weights")
    engine.close()


def test_engine_gets_one_sound_per_audio(setup):
    policy, _, prompts, _ = setup
    assert all(t.count("<sound>") == 1 for t in prompts.texts) and len(prompts.audio) == 3
    assert ((prompts.input_ids == 151669).sum(1) > 1).all()  # the expanded run is transformers' input only


def test_greedy_tokens_equal_our_fused_decode(setup):
    policy, engine, prompts, _ = setup
    ours = ours_greedy(policy, prompts, MAX_NEW)
    assert engine_greedy(engine, prompts, MAX_NEW) == ours and all(len(t) > 1 for t in ours)


def test_sampled_logprobs_agree_with_the_trainers(setup):
    """The engine's sampling log-probs (temperature 0.8) equal the trainer's recomputed ones within 1e-3."""
    policy, engine, prompts, _ = setup
    G, temperature = 2, 0.8
    samples = engine.sample(prompts.texts, prompts.audio, SR, G, max_new_tokens=MAX_NEW, temperature=temperature,
                            seeds=[11, 12, 13])
    ids, logps = pack_completions(samples, MAX_NEW, policy.pad_token_id)
    mask = completion_mask(ids, policy.eos_token_ids)
    pe = policy.encode_prompts(prompts)
    texts = policy.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    rollout = Rollout(pe, ids, mask, is_truncated(ids, policy.eos_token_ids), texts, G, sampling_logps=logps)
    with torch.no_grad():
        ours = policy.completion_logps(rollout, temperature=temperature)
    diff = (ours - logps).abs()[mask.bool()]
    assert diff.numel() > 20 and diff.max().item() < 1e-3, diff.max().item()


def test_weights_reloaded_from_the_hub_layout_decode_as_the_updated_model(setup):
    """The trainer's updated weights, saved in AF3's published layout and reloaded in place (vLLM's RL reload
    path, as the policy's weight sync does), make the engine decode the updated model."""
    policy, engine, prompts, out = setup
    before = ours_greedy(policy, prompts, MAX_NEW)
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in policy.hf_model.named_parameters():
            if ("language_model" in name or "multi_modal_projector" in name) and p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    after = ours_greedy(policy, prompts, MAX_NEW)
    assert after != before, "the update must change the greedy decode"
    save_in_hub_layout(policy.hf_model, out / "step1")
    engine.load_weights(out / "step1")
    assert engine_greedy(engine, prompts, MAX_NEW) == after
