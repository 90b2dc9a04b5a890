"""The test-model builders (emorl_pl.modules.tiny).

Real-shape model: the real Qwen2 token ids and special-token ids, Qwen2-Audio-7B-Instruct's published chat
template (audio parts by key only), its feature extractor and encoder window, its vocabulary size. Toy
model: saved files reload offline, trained tokenizer, determinism.
"""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from emorl_pl.modules.tiny import (
    CHAT_TEMPLATE,
    build_real_shape_qwen2_audio,
    build_tiny_qwen2_audio,
    ensure_real_shape_model,
    ensure_tiny_model,
    qwen2_bpe_dir,
)

SR = 16000
HOP = 160  # Whisper mel hop at 16 kHz -> 100 frames per second
# Qwen2-Audio-7B-Instruct's special tokens (its config.json: audio_token_index 151646, bos 151643, eos 151645)
REAL_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
                    "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_audio_tokens(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


# ------------------------------------------------------------------------------------------ real shape
@pytest.fixture(scope="module")
def real(real_model_dir):
    return AutoProcessor.from_pretrained(real_model_dir), Qwen2AudioForConditionalGeneration.from_pretrained(real_model_dir)


def test_real_shape_has_qwen2_audio_7b_instruct_geometry(real):
    processor, model = real
    cfg, fe, tok = model.config, processor.feature_extractor, processor.tokenizer
    assert cfg.text_config.vocab_size == 156032 and model.lm_head.weight.shape == (156032, 64)
    assert model.get_input_embeddings().weight.shape == (156032, 64)
    assert cfg.audio_config.max_source_positions == 1500 and cfg.audio_config.num_mel_bins == 128
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_fft, fe.chunk_length) == (128, 16000, 160, 400, 30)
    assert fe.n_samples == 30 * SR and fe.nb_max_frames == 3000 == 2 * cfg.audio_config.max_source_positions
    # thin random layers
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 2
    assert cfg.audio_config.d_model == 64 and cfg.audio_config.encoder_layers == 2
    assert cfg.audio_token_index == 151646
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id) == (151643, 151645)
    assert len(tok) == 151649 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == {151645, 151643}
    assert model.generation_config.pad_token_id == 151643


def test_special_token_ids_are_the_real_ones(real):
    tok = real[0].tokenizer
    for token, token_id in REAL_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
        assert tok.encode(token, add_special_tokens=False) == [token_id], token
    assert tok.decode([151644, 9707, 151646, 151645], skip_special_tokens=True) == "Hello"


def test_text_tokenises_to_the_real_qwen2_ids(real):
    tok = real[0].tokenizer
    # Independently of the tokenizer: single entries of the real vocabulary ("Ġ" is a leading space).
    vocab = json.loads((qwen2_bpe_dir() / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151643
    assert tok.encode("Hello world", add_special_tokens=False) == [vocab["Hello"], vocab["Ġworld"]] == [9707, 1879]
    assert tok.encode(" happy", add_special_tokens=False) == [vocab["Ġhappy"]]
    assert tok.encode("<answer>", add_special_tokens=False) == [vocab["<"], vocab["answer"], vocab[">"]]
    text = "<think>\n<acoustics>high pitch, fast rate</acoustics>\n</think>\n<answer>angry</answer> ünï 42! 你好"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_published_template_recognises_audio_only_by_key(real):
    processor = real[0]
    assert processor.chat_template == CHAT_TEMPLATE
    assert "content['type'] == 'audio'" not in CHAT_TEMPLATE  # as published: no widening
    audio = np.zeros(SR, dtype=np.float32)
    typed_only = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Which emotion?"}]}]
    rendered = processor.apply_chat_template(typed_only, add_generation_prompt=True, tokenize=False)
    assert "<|AUDIO|>" not in rendered  # why build_prompts sends an "audio" key
    with pytest.raises(ValueError, match=re.escape("Found 0 <|AUDIO|> token in provided text but received 1 audio")):
        processor(text=[rendered], audio=[audio], sampling_rate=SR, return_tensors="pt")
    keyed = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "text", "text": "Which emotion?"}]}]
    assert processor.apply_chat_template(keyed, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhich emotion?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *keyed]
    rendered = processor.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert not rendered.endswith("<|im_start|>assistant\n")


def test_real_shape_is_deterministic_and_idempotent(real_model_dir, tmp_path):
    from pathlib import Path

    built = Path(real_model_dir)
    again = build_real_shape_qwen2_audio(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(again / name) == _digest(built / name), name
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_real_shape_model(again) == again and (again / "model.safetensors").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------------- toy
@pytest.fixture(scope="module")
def toy(toy_model_dir):
    return AutoProcessor.from_pretrained(toy_model_dir), Qwen2AudioForConditionalGeneration.from_pretrained(toy_model_dir)


def test_toy_reloads_with_matching_shapes(toy):
    processor, model = toy
    cfg = model.config
    assert cfg.audio_config.d_model == 64 and cfg.audio_config.encoder_layers == 2
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.num_key_value_heads == 2 and cfg.text_config.intermediate_size == 128
    # 2 s chunk -> 200 mel frames -> the encoder needs 2 * max_source_positions == 200
    assert processor.feature_extractor.chunk_length == 2
    assert 2 * cfg.audio_config.max_source_positions == 2 * SR // HOP
    assert processor.chat_template == CHAT_TEMPLATE
    tok = processor.tokenizer
    assert cfg.audio_token_index == tok.convert_tokens_to_ids("<|AUDIO|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = model.generation_config
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id
    assert len(tok) <= cfg.text_config.vocab_size


@pytest.mark.parametrize(("which", "window_s", "n_samples"), [
    ("real", 30, 8000), ("real", 30, 20000), ("real", 30, 29 * SR), ("real", 30, 31 * SR),
    ("toy", 2, 8000), ("toy", 2, 32000), ("toy", 2, 48000),
])
def test_audio_token_expansion_matches_formula(request, which, window_s, n_samples):
    processor, model = request.getfixturevalue(which)
    audio = np.random.default_rng(0).standard_normal(n_samples).astype(np.float32) * 0.1
    out = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>hi"], audio=[audio], sampling_rate=SR,
                    return_tensors="pt")
    assert out["input_features"].shape == (1, 128, 100 * window_s)  # always padded to the window
    mel_len = min(n_samples, window_s * SR) // HOP  # the feature extractor itself truncates at the window
    assert int(out["feature_attention_mask"].sum()) == mel_len
    assert int((out["input_ids"] == model.config.audio_token_index).sum()) == _expected_audio_tokens(mel_len)
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_toy_tokenizer_covers_esr_tags_and_emotions(toy):
    tok = toy[0].tokenizer
    for tag in ("think", "content", "acoustics", "summary", "answer"):
        for text in (f"<{tag}>", f"</{tag}>"):
            assert len(tok.encode(text, add_special_tokens=False)) <= 3, text
    for word in ("neutral", "happy", "angry", "sad", "surprise", "disgust", "fear", "calm", "contempt",
                 "pitch", "loud", "breathy", "rising"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    for special in REAL_SPECIAL_IDS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = "<think>\n<acoustics>high pitch, fast rate</acoustics>\n</think>\n<answer>angry</answer> ünï 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_toy_deterministic_and_idempotent(toy_model_dir, tmp_path):
    from pathlib import Path

    toy_dir = Path(toy_model_dir)
    again = build_tiny_qwen2_audio(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(again / name) == _digest(toy_dir / name), name
    other = build_tiny_qwen2_audio(tmp_path / "other", seed=1)
    assert _digest(other / "model.safetensors") != _digest(toy_dir / "model.safetensors")
    # an existing model is returned untouched unless overwrite
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again) == again
    assert build_tiny_qwen2_audio(again, seed=1) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    build_tiny_qwen2_audio(again, seed=1, overwrite=True)
    assert _digest(again / "model.safetensors") == _digest(other / "model.safetensors")


def test_toy_extra_texts_and_bad_arguments(tmp_path):
    path = build_tiny_qwen2_audio(tmp_path / "extra", extra_texts=["zyxwvut " * 50])
    tok = AutoProcessor.from_pretrained(path).tokenizer
    assert len(tok.encode("zyxwvut", add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="chunk_length"):
        build_tiny_qwen2_audio(tmp_path / "bad", chunk_length=0)
