"""AudioLMPolicy on a tiny random Qwen2.5-Omni thinker, unchanged module: model class auto-detected,
prompts through Omni's published chat template, completion log-probs vs the thinker's own forward, greedy
rollout vs its argmax, audio encoded once, LoRA scoped to the language model, reference = base model.

The thinker has the real Qwen2 BPE with Qwen2.5-Omni's special tokens at their real ids and Omni's text
vocabulary (152,064 rows); its layers are thin and random. Its processor is a Qwen2AudioProcessor with
Omni's published chat template: Qwen2_5OmniProcessor needs a video processor (torchvision), and both
expand one ``<|AUDIO|>`` to ((L - 1) // 2 + 1 - 2) // 2 + 1 tokens for L mel frames, which is what the
Omni audio tower outputs. The feature extractor has a 30 s window (Omni's own is 300 s; the policy takes
either from the feature extractor).
"""

import pytest
import torch
from encoder_calls import encoder_calls_of_a_step
from family_helpers import INSTRUCTION, SR, G, full_sequence_logits, perturb_lora, token_logps, waves
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.tiny import real_qwen2_tokenizer

VOCAB = 152064  # Qwen2.5-Omni-7B thinker text_config.vocab_size
# Qwen2.5-Omni's added tokens, in id order from the end of the Qwen2 BPE (151643).
OMNI_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                       "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
                       "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>")
OMNI_IDS = {token: 151643 + i for i, token in enumerate(OMNI_SPECIAL_TOKENS)}
# Qwen2.5-Omni-7B's chat template as published (it accepts an audio part by its type or by an audio key).
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    """A tiny thinker: text 2 layers x 64, audio tower 2 layers x 64, a 1-block vision tower (unused)."""
    root = tmp_path_factory.mktemp("omni")
    tokenizer = real_qwen2_tokenizer(OMNI_IDS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, hop_length=160, n_fft=400,
                                                chunk_length=30)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=OMNI_CHAT_TEMPLATE)
    config = Qwen2_5OmniThinkerConfig(
        audio_config={
            "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
            "num_mel_bins": 128, "output_dim": 64,  # output_dim = text hidden: the tower projects itself
            "n_window": 50, "max_source_positions": 50,  # 100-frame chunks: the 1.5 s clip spans two
        },
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
                       "out_hidden_size": 64, "fullatt_block_indexes": [0]},
        text_config={
            "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
            # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "eos_token_id": OMNI_IDS["<|im_end|>"], "pad_token_id": OMNI_IDS["<|endoftext|>"],
        },
        audio_token_index=OMNI_IDS["<|AUDIO|>"],
        audio_start_token_id=OMNI_IDS["<|audio_bos|>"],
        audio_end_token_id=OMNI_IDS["<|audio_eos|>"],
        image_token_index=OMNI_IDS["<|IMAGE|>"],
        video_token_index=OMNI_IDS["<|VIDEO|>"],
        vision_start_token_id=OMNI_IDS["<|vision_bos|>"],  # read by get_rope_index even for audio-only input
    )
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    out = root / "thinker"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _rollout(policy, prompts, group_size, **kwargs):
    return policy.rollout(prompts, group_size, **kwargs)


def _thinker_logits(model, prompts, rollout):
    """Independent path: the thinker's own forward (own audio merge, own 3-D rope positions) on the full
    sequence input_ids + input_features + feature_attention_mask."""
    return full_sequence_logits(model, prompts, rollout)


def _thinker_logps(model, prompts, rollout, temperature=1.0):
    return token_logps(_thinker_logits(model, prompts, rollout), rollout.completion_ids, temperature)


@pytest.fixture(scope="module")
def full_policy(omni_dir):
    return AudioLMPolicy(omni_dir, lora=None).load()


@pytest.fixture(scope="module")
def lora_policy(omni_dir):
    policy = AudioLMPolicy(omni_dir, lora=LoraSettings(r=4, alpha=8)).load()
    return perturb_lora(policy)


def test_model_class_detected_from_model_type(full_policy, omni_dir):
    assert AutoProcessor.from_pretrained(omni_dir) is not None
    assert full_policy.model_class is None  # nothing passed: chosen from config.model_type
    assert full_policy.hf_model.config.model_type == "qwen2_5_omni_thinker"
    assert type(full_policy.hf_model) is Qwen2_5OmniThinkerForConditionalGeneration
    tok = full_policy.processor.tokenizer
    assert full_policy.audio_token_ids == sorted(
        tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"))


def test_prompts_through_omni_template_hold_one_audio_token_per_tower_output(full_policy):
    tok = full_policy.processor.tokenizer
    assert full_policy.processor.chat_template == OMNI_CHAT_TEMPLATE
    assert {t: tok.convert_tokens_to_ids(t) for t in OMNI_IDS} == OMNI_IDS
    prompts = full_policy.build_prompts(waves(), SR, INSTRUCTION)
    expected = [((n // 160 - 1) // 2 + 1 - 2) // 2 + 1 for n in (8000, 24000)]  # L = n // 160 mel frames
    assert (prompts.input_ids == OMNI_IDS["<|AUDIO|>"]).sum(-1).tolist() == expected == [12, 37]
    text = tok.decode(prompts.input_ids[1][prompts.attention_mask[1].bool()])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|audio_bos|>"
                    + "<|AUDIO|>" * 37 + f"<|audio_eos|>{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    pe = full_policy.encode_prompts(prompts)
    assert [h.shape[0] for h in pe.audio_hidden] == expected


@pytest.mark.parametrize(("which", "temperature"), [("full_policy", 1.0), ("lora_policy", 0.7)])
def test_completion_logps_match_thinker_forward(request, which, temperature):
    policy = request.getfixturevalue(which)
    prompts = policy.build_prompts(waves(), SR, INSTRUCTION, texts=[None, "let me go"])
    assert prompts.attention_mask[0, 0] == 0  # the shorter prompt is left-padded: positions matter
    torch.manual_seed(1)
    rollout = _rollout(policy, prompts, G, max_new_tokens=6, temperature=1.3)
    assert rollout.completion_ids.shape[0] == 2 * G
    expected = _thinker_logps(policy.hf_model, prompts, rollout, temperature)
    got = policy.completion_logps(rollout, temperature=temperature)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    rows = torch.tensor([3, 0])
    torch.testing.assert_close(policy.completion_logps(rollout, rows, temperature=temperature).double(),
                               expected[rows], atol=1e-5, rtol=1e-5)


def test_greedy_rollout_follows_thinker_argmax(lora_policy):
    # generate() runs on cached prompt embeds after a shared prefill: its positions must be the thinker's
    prompts = lora_policy.build_prompts(waves(), SR, INSTRUCTION)
    rollout = _rollout(lora_policy, prompts, G, do_sample=False, max_new_tokens=6)
    argmax = _thinker_logits(lora_policy.hf_model, prompts, rollout).argmax(-1)
    mask = rollout.completion_mask.bool()
    assert torch.equal(rollout.completion_ids[mask], argmax[mask])


def test_audio_encoded_once_per_utterance(lora_policy):
    prompts = lora_policy.build_prompts(waves(), SR, INSTRUCTION)
    encoder = encoder_calls_of_a_step(lora_policy, prompts, G, (slice(0, 1), slice(1, 4)), max_new_tokens=5)
    assert encoder.calls == 1
    assert encoder.utterances == 2


def test_lora_scoped_to_language_model(lora_policy):
    trainable = [n for n, p in lora_policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_layers = [n for n, m in lora_policy.hf_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    # the thinker's text model is hf.model; the audio tower and vision tower also have q/k/v-like layers
    assert all(n.startswith("model.layers.") for n in lora_layers)
    for tower in (lora_policy.hf_model.audio_tower, lora_policy.hf_model.visual):
        assert not any("lora_" in n for n, _ in tower.named_parameters())
        assert not any(isinstance(m, LoraLayer) for m in tower.modules())


def test_reference_equals_fresh_base_thinker(lora_policy, omni_dir):
    prompts = lora_policy.build_prompts(waves(), SR, INSTRUCTION)
    torch.manual_seed(3)
    rollout = _rollout(lora_policy, prompts, G, max_new_tokens=6)
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(omni_dir, attn_implementation="sdpa").eval()
    expected = _thinker_logps(base, prompts, rollout)
    ref = lora_policy.completion_logps(rollout, reference=True)
    assert not ref.requires_grad
    torch.testing.assert_close(ref.double(), expected, atol=1e-5, rtol=1e-5)
    policy = lora_policy.completion_logps(rollout)
    assert (policy.double() - expected).abs().max() > 1e-2  # the perturbed adapters do change the policy


def test_rollout_after_another_row_count(full_policy):
    clips = waves()
    full_policy.rollout(full_policy.build_prompts(clips, SR, INSTRUCTION), G, max_new_tokens=3)  # 4 rows
    # The thinker keeps rope_deltas of shape (rows, 1) from its last call; the policy must reset them.
    rollout = full_policy.rollout(full_policy.build_prompts(clips[:1], SR, INSTRUCTION), 3, max_new_tokens=3)
    assert rollout.completion_ids.shape[0] == 3
