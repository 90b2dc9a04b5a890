"""The tiny Qwen2-Audio builder: saved files reload offline, processor, template, tokenizer, determinism."""

import hashlib

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from emorl_pl.modules.tiny import build_tiny_qwen2_audio, ensure_tiny_model

SR = 16000
HOP = 160  # Whisper mel hop at 16 kHz -> 100 frames per second


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir), Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reloads_with_matching_shapes(tiny_dir, loaded):
    processor, model = loaded
    cfg = model.config
    assert cfg.audio_config.d_model == 64 and cfg.audio_config.encoder_layers == 2
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.num_key_value_heads == 2 and cfg.text_config.intermediate_size == 128
    # 2 s chunk -> 200 mel frames -> the encoder needs 2 * max_source_positions == 200
    assert processor.feature_extractor.chunk_length == 2
    assert 2 * cfg.audio_config.max_source_positions == 2 * SR // HOP
    tok = processor.tokenizer
    assert cfg.audio_token_index == tok.convert_tokens_to_ids("<|AUDIO|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = model.generation_config
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id
    assert len(tok) <= cfg.text_config.vocab_size


def test_chat_template_renders_qwen2_audio_format(loaded):
    processor, _ = loaded
    conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Which emotion?"}]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhich emotion?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == expected
    with_system = [{"role": "system", "content": "Be brief."}, *conversation]
    rendered = processor.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert not rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("n_samples", [8000, 20000, 32000, 48000])
def test_audio_token_expansion_matches_formula(loaded, n_samples):
    processor, model = loaded
    audio = np.random.default_rng(0).standard_normal(n_samples).astype(np.float32) * 0.1
    out = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>hi"], audio=[audio], sampling_rate=SR,
                    return_tensors="pt")
    assert out["input_features"].shape == (1, 128, 200)  # always padded to chunk_length
    mel_len = min(n_samples, 2 * SR) // HOP  # cropped to 2 s
    assert int(out["feature_attention_mask"].sum()) == mel_len
    expected_tokens = ((mel_len - 1) // 2 + 1 - 2) // 2 + 1
    assert int((out["input_ids"] == model.config.audio_token_index).sum()) == expected_tokens
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_covers_esr_tags_and_emotions(loaded):
    tok = loaded[0].tokenizer
    for tag in ("think", "content", "acoustics", "summary", "answer"):
        for text in (f"<{tag}>", f"</{tag}>"):
            assert len(tok.encode(text, add_special_tokens=False)) <= 3, text
    for word in ("neutral", "happy", "angry", "sad", "surprise", "disgust", "fear", "calm", "contempt",
                 "pitch", "loud", "breathy", "rising"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    for special in ("<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = "<think>\n<acoustics>high pitch, fast rate</acoustics>\n</think>\n<answer>angry</answer> ünï 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_deterministic_and_idempotent(tiny_dir, tmp_path):
    again = build_tiny_qwen2_audio(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(again / name) == _digest(tiny_dir / name), name
    other = build_tiny_qwen2_audio(tmp_path / "other", seed=1)
    assert _digest(other / "model.safetensors") != _digest(tiny_dir / "model.safetensors")
    # an existing model is returned untouched unless overwrite
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again) == again
    assert build_tiny_qwen2_audio(again, seed=1) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    build_tiny_qwen2_audio(again, seed=1, overwrite=True)
    assert _digest(again / "model.safetensors") == _digest(other / "model.safetensors")


def test_extra_texts_and_bad_arguments(tmp_path):
    path = build_tiny_qwen2_audio(tmp_path / "extra", extra_texts=["zyxwvut " * 50])
    tok = AutoProcessor.from_pretrained(path).tokenizer
    assert len(tok.encode("zyxwvut", add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="chunk_length"):
        build_tiny_qwen2_audio(tmp_path / "bad", chunk_length=0)
