"""Audio Flamingo 3 as a policy family, on its real-shape test model (emorl_pl.modules.tiny_audioflamingo3, built
once per session in tests/conftest.py): the files are the release's (tokenizer ids, chat template, feature
extractor and window, vocabulary rows, checkpoint key layout) and transformers loads them; the policy's
log-probs, greedy decode and fused decode equal the model's own forward; a cold start, a GRPO step,
validation, prediction and export run on it, and a GRPO run under 2-process FSDP2 (gloo).

Oracles: the published values written out here (config.json's ids and sizes as convert_audioflamingo3_to_hf.py
writes them; transformers' own AF3 processor tests for the tokenisation and the rendered chat template), the
model's own ``forward`` (its audio tower, projector and merge) with ``generate``'s positions, and transformers'
loaders.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from family_helpers import (
    INSTRUCTION,
    SR,
    G,
    decode_both,
    fit_cold_start_grpo_and_validate,
    full_sequence_logits,
    grpo_module,
    perturbed_lora_policy,
    token_logps,
    waves,
)
from test_distributed import CACHE, CONFIGS, EMORL, check_emorl, emorl_env

from emorl_pl.export import export_policy
from emorl_pl.modules.families import family_for
from emorl_pl.modules.fused_decode import unsupported
from emorl_pl.modules.hub_layout import hub_key_map, hub_layout_problems, saved_weight_names
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.sampling import fusion_allowed, loop_supported

# nvidia/audio-flamingo-3-hf: config.json as convert_audioflamingo3_to_hf.py writes it (the Qwen2.5 ids, the
# <sound> id of AudioFlamingo3Config, 151,672 rows), the template's system turn.
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<sound>": 151669}
VOCAB_ROWS = 151672
# transformers' tests/models/audioflamingo3/test_processing_audioflamingo3.py (huggingface/transformers@1af49d6f):
# test_tokenizer_full_integration, the published tokenizer's tokens of this prompt...
HF_PROMPT = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<sound>What is it?<|im_end|>"
             "<|im_start|>assistant\n")
HF_TOKENS = ["<|im_start|>", "system", "Ċ", "Answer", "Ġthe", "Ġquestions", ".", "<|im_end|>", "<|im_start|>", "user",
             "Ċ", "<sound>", "What", "Ġis", "Ġit", "?", "<|im_end|>", "<|im_start|>", "assistant", "Ċ"]
# ... and test_chat_template, the published processor's rendering of this conversation.
HF_QUESTION = "What is surprising about the relationship between the barking and the music?"
HF_RENDERED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               f"<|im_start|>user\n<sound>{HF_QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def processor(audioflamingo3_model_dir):
    return family_for("audioflamingo3").load_processor(audioflamingo3_model_dir)


@pytest.fixture(scope="module")
def lora_policy(audioflamingo3_model_dir) -> AudioLMPolicy:
    return perturbed_lora_policy(audioflamingo3_model_dir)


def _model_logits(model, prompts, rollout):
    """The model's own forward (its tower, projector and merge) on prompt + completion, at the positions
    ``generate`` gives a left-padded batch (cumsum(mask) - 1)."""
    return full_sequence_logits(model, prompts, rollout, feature_mask="input_features_mask", generate_positions=True)


# ------------------------------------------------------------------------------------------ the files
def test_real_shape_files_are_the_releases_and_transformers_loads_them(audioflamingo3_model_dir, processor):
    from safetensors import safe_open
    from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor, AutoProcessor

    model_dir = audioflamingo3_model_dir
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["model_type"] == "audioflamingo3"
    assert config["architectures"] == ["AudioFlamingo3ForConditionalGeneration"]
    assert config["audio_token_id"] == 151669
    text, audio = config["text_config"], config["audio_config"]
    assert text["vocab_size"] == VOCAB_ROWS and text["tie_word_embeddings"] is False
    assert (text["bos_token_id"], text["eos_token_id"], text["rope_parameters"]["rope_theta"]) == (151643, 151645, 1e6)
    assert (audio["max_source_positions"], audio["num_mel_bins"]) == (1500, 128)
    generation = json.loads((Path(model_dir) / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([151645, 151643], 151643)

    # the published key layout (Qwen2-Audio's, which vLLM's AF3 reads): by hand, and as hub_key_map derives it
    names = saved_weight_names(model_dir)
    prefixes = ("audio_tower.", "multi_modal_projector.", "language_model.model.")
    assert all(n.startswith(prefixes) or n == "language_model.lm_head.weight" for n in names)
    assert "language_model.lm_head.weight" in names and "multi_modal_projector.linear_2.weight" in names
    assert hub_layout_problems(model_dir) == []
    model, info = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sorted(hub_key_map(model).values()) == names
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("language_model.lm_head.weight"), model.lm_head.weight)
        assert torch.equal(f.get_tensor("language_model.model.embed_tokens.weight"),
                           model.get_input_embeddings().weight)
    assert model.lm_head.weight.shape == (VOCAB_ROWS, 64)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied

    # the saved processor is the release's class (what vLLM and AutoProcessor load)
    assert type(AutoProcessor.from_pretrained(model_dir)) is AudioFlamingo3Processor
    assert isinstance(processor, AudioFlamingo3Processor)
    tok, fe = processor.tokenizer, processor.feature_extractor
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS and len(tok) == VOCAB_ROWS
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.tokenize(HF_PROMPT) == HF_TOKENS
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_fft, fe.chunk_length) == (128, SR, 160, 400, 30)
    assert fe.n_samples == 30 * SR and fe.nb_max_frames == 3000
    chat = [{"role": "user", "content": [{"type": "text", "text": HF_QUESTION}, {"type": "audio", "path": "x.wav"}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == HF_RENDERED


def test_processor_pads_windows_to_the_encoder_and_expands_sound(processor):
    """One <sound> per clip, expanded to the tower's length: ((L - 1) // 2 + 1 - 2) // 2 + 1 tokens for L mel
    frames (137 frames: 34; a whole 30 s window: 750), every window padded to the encoder's 3000 frames even when
    the call pads the text (the stock processor then pads the windows to the longest clip)."""
    from transformers import AudioFlamingo3Processor

    chat = [{"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.count("<sound>") == 1
    clips = [np.zeros(int(1.37 * SR), dtype=np.float32), np.zeros(30 * SR, dtype=np.float32)]
    out = processor(text=[text, text], audio=clips, sampling_rate=SR, padding=True, return_tensors="pt")
    assert out["input_features"].shape == (2, 128, 3000)
    assert out["feature_attention_mask"].sum(-1).tolist() == [137, 3000]
    assert (out["input_ids"] == 151669).sum(-1).tolist() == [34, 750]
    stock = AudioFlamingo3Processor.__call__(processor, text=[text, text], audio=clips[:1] * 2, sampling_rate=SR,
                                             padding=True, return_tensors="pt")
    assert stock["input_features"].shape[-1] < 3000  # why the policy's processor keeps padding to the text


def test_prompts_crop_to_the_window(lora_policy):
    prompts = lora_policy.build_prompts(waves((8000, 40 * SR)), SR, INSTRUCTION)
    assert prompts.seconds_ignored == (0.0, 10.0)
    assert (prompts.input_ids == 151669).sum(-1).tolist() == [12, 750]  # 50 frames: ((50 - 1)//2 + 1 - 2)//2 + 1
    assert all(t.count("<sound>") == 1 for t in prompts.texts)  # what vLLM gets: one placeholder per audio


# ------------------------------------------------------------------------------------------ the policy
def test_policy_log_probs_greedy_and_reference_match_the_model(audioflamingo3_model_dir, lora_policy):
    from transformers import AudioFlamingo3ForConditionalGeneration

    assert type(lora_policy.hf_model).__name__ == "AudioFlamingo3ForConditionalGeneration"
    assert lora_policy.audio_token_ids == [151668, 151669, 151670, 151671]
    assert lora_policy.eos_token_ids == [151645] and lora_policy.pad_token_id == 151643
    # LoRA only in the language model (the audio tower also has q_proj/k_proj/v_proj)
    lora_names = [n for n, _ in lora_policy.named_parameters() if "lora_" in n]
    assert lora_names and all(".language_model." in n for n in lora_names)
    prompts = lora_policy.build_prompts(waves(), SR, INSTRUCTION, texts=[None, "let me go"])
    assert prompts.attention_mask[0, 0] == 0  # the shorter prompt is left-padded
    torch.manual_seed(1)
    rollout = lora_policy.rollout(prompts, G, max_new_tokens=6, temperature=1.3)
    expected = token_logps(_model_logits(lora_policy.hf_model, prompts, rollout), rollout.completion_ids)
    torch.testing.assert_close(lora_policy.completion_logps(rollout).double(), expected, atol=1e-5, rtol=1e-5)
    # greedy decoding (the fused step) follows the model's argmax
    greedy = lora_policy.rollout(prompts, 1, do_sample=False, max_new_tokens=6)
    argmax = _model_logits(lora_policy.hf_model, prompts, greedy).argmax(-1)
    keep = greedy.completion_mask.bool()
    assert torch.equal(greedy.completion_ids[keep], argmax[keep])
    # the reference (adapters off) is the released base model
    base = AudioFlamingo3ForConditionalGeneration.from_pretrained(audioflamingo3_model_dir,
                                                                  attn_implementation="sdpa").eval()
    ref = token_logps(_model_logits(base, prompts, rollout), rollout.completion_ids)
    torch.testing.assert_close(lora_policy.completion_logps(rollout, reference=True).double(), ref, atol=1e-5,
                               rtol=1e-5)
    assert (ref - expected).abs().max() > 1e-2  # the adapters change the policy


@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_fused_decode_serves_af3_and_equals_the_decoder_forward(lora_policy, merge):
    hf = lora_policy.hf_model
    decoder = lora_policy.family.decoder(hf)
    assert type(decoder).__name__ == "Qwen2Model"
    assert unsupported(decoder, hf.lm_head) is None and fusion_allowed(decoder, hf.lm_head, "adapters")
    pe = lora_policy.encode_prompts(lora_policy.build_prompts(waves(), SR, INSTRUCTION, texts=[None, "let me go"]))
    assert loop_supported(decoder, pe)
    hf.eval()
    try:
        expected, got = decode_both(lora_policy, pe, merge)
    finally:
        hf.train()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)  # test_fused_decode.py's tolerance


# ------------------------------------------------------------------------------------------ training
def test_cold_start_grpo_validation_prediction_and_export(audioflamingo3_model_dir, tmp_path):
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    module = grpo_module(perturbed_lora_policy(audioflamingo3_model_dir))
    fit_cold_start_grpo_and_validate(module)
    rows = module.predict_step({"waveforms": waves((8000, 31 * SR)), "sample_rate": SR, "keys": ["a.wav", "b.wav"]}, 0)
    assert [r["key"] for r in rows] == ["a.wav", "b.wav"] and all(isinstance(r["text"], str) for r in rows)
    assert [r["seconds_ignored"] for r in rows] == [0.0, 1.0]

    out = export_policy(module.policy, tmp_path / "exported")
    assert hub_layout_problems(out) == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "audioflamingo3"
    exported = AudioFlamingo3ForConditionalGeneration.from_pretrained(out).eval()
    assert not any("lora" in k for k in exported.state_dict())
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "AudioFlamingo3Processor"
    processor = family_for("audioflamingo3").load_processor(out)
    assert processor.tokenizer.get_vocab() == module.policy.processor.tokenizer.get_vocab()
    assert processor.chat_template == module.policy.processor.chat_template
    prompts = module.policy.build_prompts(waves((12000,)), SR, INSTRUCTION)
    inputs = dict(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                  input_features=prompts.input_features, input_features_mask=prompts.feature_attention_mask)
    with torch.no_grad():
        module.policy.model.eval()
        want = module.policy.model(**inputs).logits
        got = exported(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fsdp2_grpo_run_on_two_processes(audioflamingo3_model_dir, tmp_path):
    """``emorl fit`` with FSDP2 on 2 CPU processes (gloo): 2 cold-start steps, then a GRPO step, checkpointed."""
    args = ["fit", "-c", str(CONFIGS / "tiny_grpo.yaml"), "-c", str(CONFIGS / "fsdp2.yaml"),
            "--model.init_args.policy.init_args.model_dir", audioflamingo3_model_dir,
            "--data.init_args.root", str(CACHE / "synth_3spk"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "3"]
    proc = subprocess.run([EMORL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**emorl_env(), "OMP_NUM_THREADS": "1"})
    check_emorl(proc)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    sft = [r for r in rows if r.get("sft/loss")]
    rl = [r for r in rows if r.get("loss")]
    assert len(sft) == 2 and len(rl) == 1, rows
    assert float(rl[0]["grad_norm"]) > 0 and all(float(r["sft/loss"]) > 0 for r in sft)
    assert (tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt").exists()


# ------------------------------------------------------------------------------------------ the recipe
def test_recipe_config_json_has_the_published_geometry_and_layout(audioflamingo3_model_dir):
    """configs/model/audioflamingo3_config.json (convert_audioflamingo3_to_hf.py's values) loads in transformers
    as the 7B release's geometry, and its checkpoint names are the test model's, layer for layer."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    config = AudioFlamingo3Config.from_json_file(str(Path(__file__).parents[1] / "configs/model/audioflamingo3_config.json"))
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(config)
    layer = model.model.language_model.layers[0]
    assert model.lm_head.weight.shape == (VOCAB_ROWS, 3584) and len(model.model.language_model.layers) == 28
    assert layer.self_attn.k_proj.weight.shape == (4 * 128, 3584) and layer.mlp.up_proj.weight.shape == (18944, 3584)
    tower = model.model.audio_tower
    assert len(tower.layers) == 32 and tower.embed_positions.weight.shape == (1500, 1280)
    assert tower.conv1.weight.shape == (1280, 128, 3) and config.audio_token_id == SPECIAL_IDS["<sound>"]

    def unnumbered(names):  # the names with the layer index taken out, so that 2 layers compare with 28 / 32
        return {".".join(p for p in n.split(".") if not p.isdigit()) for n in names}

    assert unnumbered(hub_key_map(model).values()) == unnumbered(saved_weight_names(audioflamingo3_model_dir))


# ------------------------------------------------------------------------------------------ the toy
def test_toy_builds_loads_and_rolls_out(tmp_path):
    from emorl_pl.modules.tiny_audioflamingo3 import build_tiny_audioflamingo3

    model_dir = build_tiny_audioflamingo3(tmp_path / "toy")
    assert build_tiny_audioflamingo3(tmp_path / "toy") == model_dir  # an existing model is kept
    assert hub_layout_problems(model_dir) == []
    policy = AudioLMPolicy(str(model_dir), lora=None).load()
    tok = policy.processor.tokenizer
    assert len(tok) <= policy.hf_model.config.text_config.vocab_size == 1024  # the BPE runs out of merges first
    assert tok.convert_tokens_to_ids("<sound>") == policy.hf_model.config.audio_token_id
    prompts = policy.build_prompts(waves((8000, 3 * SR)), SR, INSTRUCTION)
    assert prompts.input_features.shape[-1] == 200 and prompts.seconds_ignored == (0.0, 1.0)  # the 2 s window
    assert (prompts.input_ids == tok.convert_tokens_to_ids("<sound>")).sum(-1).tolist() == [12, 50]
    rollout = policy.rollout(prompts, 2, max_new_tokens=4)
    assert rollout.completion_ids.shape[0] == 4
    with pytest.raises(ValueError, match="chunk_length"):
        build_tiny_audioflamingo3(tmp_path / "bad", chunk_length=0)
