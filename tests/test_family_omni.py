"""The Omni thinkers as policy families, on their real-shape test models (emorl_pl.modules.tiny, built once per
session in tests/conftest.py): the files are the releases' (tokenizer ids, chat template, feature extractor
and window, vocabulary rows, whole-Omni checkpoint layout) and transformers loads them; the adapter's rotary
positions are the model's own; the policy's log-probs, greedy decode and fused decode equal the thinker's own
forward; a cold start, a GRPO step, validation, prediction and export run on them, and a GRPO run under
2-process FSDP2 (gloo).

Oracles: the published values written out here (config.json, tokenizer_config.json, chat_template.json of
the model repositories), the thinker's own ``forward`` (its audio merge and its ``get_rope_index`` positions)
on the full sequence, and transformers' loaders.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from family_helpers import (
    INSTRUCTION,
    SR,
    G,
    batches,
    decode_both,
    fit_cold_start_grpo_and_validate,
    full_sequence_logits,
    grpo_module,
    perturbed_lora_policy,
    token_logps,
    waves,
)
from torch.utils.data import DataLoader

from emorl_pl.export import export_policy
from emorl_pl.modules.families import family_for
from emorl_pl.modules.fused_decode import unsupported
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.hub_layout import hub_layout_problems, hub_tensors, published_names, saved_weight_names
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.tiny import QWEN3_OMNI_CHAT_TEMPLATE


@dataclass(frozen=True)
class Release:
    """What the published repository of one Omni release says (config.json, tokenizer_config.json,
    chat_template.json, preprocessor_config.json), written out by hand as the oracle."""

    fixture: str
    model_type: str  # config.json
    architecture: str
    thinker_class: str
    special_ids: dict  # tokenizer added tokens
    named: dict  # tokenizer_config.json's processor-facing token names
    audio: tuple  # (start, audio, end) tokens around an audio clip
    config_ids: dict  # thinker_config's token ids
    vocab_rows: int
    chat_template: str
    n_window: int
    default_system: bool  # the template opens with "You are a helpful assistant." when no system turn is given
    non_special: tuple = ()  # added tokens that decoding keeps (special: false)
    experts: tuple = ()  # (experts, top-k) of a mixture-of-experts language model

    def audio_tokens(self, mel_frames: int) -> int:
        """Audio tokens of a clip of ``mel_frames`` frames: the processor's formula, written out."""
        if self.n_window == 100:  # Qwen2.5-Omni: two stride-2 convolutions and a pooling by 2
            return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
        chunk = 2 * self.n_window  # Qwen3-Omni: 13 tokens per full 100-frame chunk, three stride-2 convs on the rest
        rest = mel_frames % chunk
        return ((((rest - 1) // 2 + 1) - 1) // 2 + 1 - 1) // 2 + 1 + (mel_frames // chunk) * 13


# Qwen2.5-Omni-7B (huggingface.co/Qwen/Qwen2.5-Omni-7B). The template as transformers' processor test sets it
# (tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py, prepare_processor_dict).
QWEN2_5_OMNI = Release(
    fixture="qwen2_5_omni_model_dir",
    model_type="qwen2_5_omni",
    architecture="Qwen2_5OmniForConditionalGeneration",
    thinker_class="Qwen2_5OmniThinkerForConditionalGeneration",
    special_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
                 "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
                 "<|quad_end|>": 151651, "<|vision_bos|>": 151652, "<|vision_eos|>": 151653, "<|vision_pad|>": 151654,
                 "<|IMAGE|>": 151655, "<|VIDEO|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
                 "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
                 "<|repo_name|>": 151663, "<|file_sep|>": 151664},
    named={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
           "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
           "vision_eos_token": "<|vision_eos|>"},
    audio=("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
    config_ids={"audio_token_index": 151646, "image_token_index": 151655, "video_token_index": 151656,
                "audio_start_token_id": 151647, "audio_end_token_id": 151648, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653},
    vocab_rows=152064,
    chat_template=(
        "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
        "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
        "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
        "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == 'audio' or 'audio' in content or "
        "'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
        "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' "
        "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
        "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}"
        "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
        "%}<|im_start|>assistant\n{% endif %}"
    ),
    n_window=100,
    default_system=True,
    non_special=("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>"),
)

# Qwen3-Omni-30B-A3B-Instruct (huggingface.co/Qwen/Qwen3-Omni-30B-A3B-Instruct): config.json's thinker_config
# ids and text_config (128 experts, 8 per token), the tokenizer's added tokens. Its chat_template.json is
# tiny.QWEN3_OMNI_CHAT_TEMPLATE, verbatim (provenance and the rendered prompt: tests/test_model_provenance.py).
QWEN3_OMNI = Release(
    fixture="qwen3_omni_model_dir",
    model_type="qwen3_omni_moe",
    architecture="Qwen3OmniMoeForConditionalGeneration",
    thinker_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    special_ids={t: 151643 + i for i, t in enumerate((
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
        "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
        "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
        "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
        "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
        "<tts_text_bos_single>", "<|audio_pad|>"))},
    named={"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
           "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
           "vision_eos_token": "<|vision_end|>"},
    audio=("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"),
    config_ids={"audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
                "audio_start_token_id": 151669, "audio_end_token_id": 151670, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653},
    vocab_rows=152064,
    chat_template=QWEN3_OMNI_CHAT_TEMPLATE,
    n_window=50,
    default_system=False,
    non_special=("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
    experts=(128, 8),
)

RELEASES = [QWEN2_5_OMNI, QWEN3_OMNI]


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: r.model_type)
def omni(request) -> tuple[Release, str]:
    release = request.param
    return release, request.getfixturevalue(release.fixture)


@pytest.fixture(scope="module")
def lora_policy(omni) -> AudioLMPolicy:
    return perturbed_lora_policy(omni[1])


@pytest.fixture(scope="module")
def prompts(lora_policy):
    """Two utterances (0.5 s, 1.5 s), one with a transcript: uneven left padding, real 300 s feature windows."""
    return lora_policy.build_prompts(waves(), SR, INSTRUCTION, texts=[None, "let me go"])


# ------------------------------------------------------------------------------------------ the files
def test_real_shape_files_are_the_releases_and_transformers_loads_them(omni):
    import transformers

    release, model_dir = omni
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["model_type"] == release.model_type and config["architectures"] == [release.architecture]
    assert config["enable_audio_output"] is False  # the thinker only; vLLM and transformers skip the talker
    thinker_config = config["thinker_config"]
    assert {k: thinker_config[k] for k in release.config_ids} == release.config_ids
    assert thinker_config["text_config"]["vocab_size"] == release.vocab_rows
    assert thinker_config["text_config"]["tie_word_embeddings"] is False
    assert thinker_config["audio_config"]["n_window"] == release.n_window
    assert thinker_config["audio_config"]["max_source_positions"] == 1500 and thinker_config["audio_config"][
        "num_mel_bins"] == 128
    # the whole-Omni key layout: every weight under thinker., as hub_key_map says, and nothing else
    names = saved_weight_names(model_dir)
    assert names and all(n.startswith("thinker.") for n in names)
    assert hub_layout_problems(model_dir) == []

    # transformers loads the thinker class from it: every weight from the file, none left random
    cls = getattr(transformers, release.thinker_class)
    thinker, info = cls.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert published_names(thinker) == names
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("thinker.lm_head.weight"), thinker.lm_head.weight)
        assert torch.equal(f.get_tensor("thinker.model.embed_tokens.weight"), thinker.get_input_embeddings().weight)
    assert thinker.lm_head.weight.shape[0] == thinker.get_input_embeddings().weight.shape[0] == release.vocab_rows
    assert thinker.lm_head.weight.data_ptr() != thinker.get_input_embeddings().weight.data_ptr()  # untied

    processor = family_for(release.model_type).load_processor(model_dir)
    tok, fe = processor.tokenizer, processor.feature_extractor
    assert {t: tok.convert_tokens_to_ids(t) for t in release.special_ids} == release.special_ids
    assert len(tok) == max(release.special_ids.values()) + 1
    assert {name: getattr(tok, name) for name in release.named} == release.named
    assert processor.chat_template == release.chat_template
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_fft, fe.chunk_length) == (128, SR, 160, 400, 300)
    assert fe.n_samples == 300 * SR and fe.nb_max_frames == 30000
    assert isinstance(processor, getattr(transformers, type(processor).__name__))  # the release's processor class

    # one audio placeholder per clip in the rendered prompt, expanded by the processor to the tower's length
    start, audio, end = release.audio
    chat = [{"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if release.default_system else ""
    assert text == f"{system}<|im_start|>user\n{start}{audio}{end}Hi<|im_end|>\n<|im_start|>assistant\n"
    # the tool-call and think tags are added but not special: decoding keeps them (ESR answers carry <think>)
    for token in release.non_special:
        assert tok.decode([release.special_ids[token]], skip_special_tokens=True) == token
    assert tok.decode([release.special_ids[audio]], skip_special_tokens=True) == ""
    import numpy as np

    out = processor(text=[text], audio=[np.zeros(int(1.37 * SR), dtype=np.float32)], sampling_rate=SR,
                    return_tensors="pt")
    frames = int(out["feature_attention_mask"].sum())
    assert frames == 137 and (out["input_ids"] == release.special_ids[audio]).sum() == release.audio_tokens(137)


@pytest.mark.parametrize(("release", "config_json"), [(QWEN2_5_OMNI, "qwen2_5_omni_7b_config.json"),
                                                     (QWEN3_OMNI, "qwen3_omni_30b_a3b_config.json")],
                         ids=["qwen2_5_omni", "qwen3_omni_moe"])
def test_recipe_config_is_the_release_and_its_thinker_publishes_under_thinker(release, config_json):
    """The full-size thinker from the recipe's config.json, on the meta device: the family reads the whole-Omni
    config, the token ids are the ones the real-shape model carries, and every published weight is under
    ``thinker.`` (Qwen3-Omni: one tensor per expert, 48 layers x 128 experts x 3 projections)."""
    from transformers import AutoConfig

    from emorl_pl.modules.families import import_class

    config = AutoConfig.from_pretrained(Path(__file__).parents[1] / "configs" / "model" / config_json)
    family = family_for(config.model_type)
    thinker_config = family.model_config(config)
    assert {k: getattr(thinker_config, k) for k in release.config_ids} == release.config_ids
    assert thinker_config.text_config.vocab_size == release.vocab_rows
    with torch.device("meta"):
        thinker = import_class(family.model_class)(thinker_config)
    names = published_names(thinker)
    assert all(n.startswith("thinker.") for n in names) and "thinker.lm_head.weight" in names
    if release.experts:
        layers = thinker_config.text_config.num_hidden_layers
        assert sum(".mlp.experts." in n for n in names) == layers * release.experts[0] * 3 == 48 * 128 * 3


# ------------------------------------------------------------------------------------------ positions
def test_positions_are_the_models_own_and_other_positions_are_refused(lora_policy, prompts, monkeypatch):
    mask = prompts.attention_mask
    assert mask[0, 0] == 0  # the shorter prompt is left-padded
    rows, offset = lora_policy.family.positions(lora_policy.hf_model, prompts.input_ids, mask,
                                                prompts.feature_attention_mask)
    assert rows.shape == (3, *mask.shape) and torch.equal(offset, torch.zeros(2, 1, dtype=offset.dtype))
    for b in range(2):  # by hand: 0, 1, 2, ... over each row's real tokens, in all three sections
        n = int(mask[b].sum())
        assert (rows[:, b, mask[b].bool()] == torch.arange(n)).all()
    # the thinker's forward leaves the same decode offset (rope_deltas) for these prompts
    with torch.no_grad():
        lora_policy.hf_model(input_ids=prompts.input_ids, attention_mask=mask, input_features=prompts.input_features,
                             feature_attention_mask=prompts.feature_attention_mask)
    assert torch.equal(lora_policy.hf_model.rope_deltas.long(), offset.long())
    # positions the policy's code does not give the decoder (time-aligned video, say) stop the encoding
    real = lora_policy.hf_model.get_rope_index

    def shifted(*args, **kwargs):
        positions, deltas = real(*args, **kwargs)
        positions = positions.clone()
        positions[0, 1, -3:] += 5  # row 1's last three tokens later in time
        return positions, deltas + torch.tensor([[0], [5]], dtype=deltas.dtype)

    monkeypatch.setattr(lora_policy.hf_model, "get_rope_index", shifted)
    with pytest.raises(NotImplementedError, match="row 1's rotary positions"):
        lora_policy.encode_prompts(prompts)


# ------------------------------------------------------------------------------------------ the policy
def test_policy_log_probs_and_greedy_decode_match_the_thinker(omni, lora_policy, prompts):
    release, _ = omni
    assert type(lora_policy.hf_model).__name__ == release.thinker_class
    assert lora_policy.audio_token_ids == sorted(release.special_ids[t] for t in release.audio)
    # the adapters sit in the language model's layers only (not the audio or vision towers' attention)
    trainable = [n for n, p in lora_policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".model.layers." in n for n in trainable), trainable[:3]
    assert not any(".mlp.experts" in n for n in trainable)  # MoE: adapters on attention, not the fused experts
    torch.manual_seed(1)
    rollout = lora_policy.rollout(prompts, G, max_new_tokens=6, temperature=1.3)
    # the thinker's own forward (its audio merge, its multimodal positions) on prompt + completion
    expected = token_logps(full_sequence_logits(lora_policy.hf_model, prompts, rollout), rollout.completion_ids)
    torch.testing.assert_close(lora_policy.completion_logps(rollout).double(), expected, atol=1e-5, rtol=1e-5)
    # greedy decoding (the fused step) follows the thinker's argmax
    greedy = lora_policy.rollout(prompts, 1, do_sample=False, max_new_tokens=6)
    argmax = full_sequence_logits(lora_policy.hf_model, prompts, greedy).argmax(-1)
    keep = greedy.completion_mask.bool()
    assert torch.equal(greedy.completion_ids[keep], argmax[keep]) and keep.sum() > 2


def test_moe_router_experts_and_load_balancing_loss(qwen3_omni_model_dir):
    """Qwen3-Omni's MoE layers: the release's router (a linear map to all 128 experts, top-8, renormalised),
    saved one tensor per expert as published; the router's auxiliary loss is off as the release sets it and equals
    transformers' own when asked for (tests/test_router_aux_loss.py: the trainer adding it)."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(qwen3_omni_model_dir).eval()
    text = thinker.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.norm_topk_prob) == (128, 8, True)
    assert (text.output_router_logits, text.router_aux_loss_coef) == (False, 0.001)
    for layer in thinker.model.layers:
        assert layer.mlp.gate.weight.shape == (128, text.hidden_size)
        assert layer.mlp.experts.gate_up_proj.shape == (128, 2 * text.moe_intermediate_size, text.hidden_size)
    experts = {n for n in saved_weight_names(qwen3_omni_model_dir) if ".mlp.experts." in n}
    assert experts == {f"thinker.model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(len(thinker.model.layers))
                       for e in range(128) for p in ("gate_proj", "up_proj", "down_proj")}
    # one fused weight streamed as published (the engine sync's unit): one tensor per expert and projection
    layer = thinker.model.layers[1].mlp.experts
    gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
    split = hub_tensors(thinker, "model.layers.1.mlp.experts.gate_up_proj", gate_up)
    inter = text.moe_intermediate_size
    assert sorted(split) == sorted(f"thinker.model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(128)
                                   for p in ("gate_proj", "up_proj"))
    for e in (0, 77, 127):
        assert torch.equal(split[f"thinker.model.layers.1.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :inter])
        assert torch.equal(split[f"thinker.model.layers.1.mlp.experts.{e}.up_proj.weight"], gate_up[e, inter:])
        assert torch.equal(hub_tensors(thinker, "model.layers.1.mlp.experts.down_proj", down)[
            f"thinker.model.layers.1.mlp.experts.{e}.down_proj.weight"], down[e])
    family = family_for("qwen3_omni_moe")
    settings = family.router_settings(thinker)
    assert (settings.enabled, settings.coef, settings.num_experts, settings.top_k) == (False, 0.001, 128, 8)
    family.check_model(thinker)  # off: accepted
    ids = torch.randint(0, 151643, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = thinker(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        logits = thinker.model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    aux = family.router_aux_loss(thinker, logits, mask)
    assert len(logits) == len(thinker.model.layers) and logits[0].shape == (ids.numel(), 128)
    torch.testing.assert_close(aux, expected) and float(aux) > 0
    text.output_router_logits = True  # the flag is no refusal: the trainer's router_aux_loss_coef decides (TRL's)
    family.check_model(thinker)


@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_fused_decode_equals_the_decoder_forward(lora_policy, prompts, merge):
    hf = lora_policy.hf_model
    assert unsupported(lora_policy.family.decoder(hf), hf.lm_head) is None
    pe = lora_policy.encode_prompts(prompts)
    hf.eval()
    try:
        expected, got = decode_both(lora_policy, pe, merge)
    finally:
        hf.train()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)  # the Qwen2-Audio step's tolerance


# ------------------------------------------------------------------------------------------ training
def test_cold_start_grpo_validation_prediction_and_export(omni, tmp_path):
    import transformers

    release, model_dir = omni
    module = grpo_module(perturbed_lora_policy(model_dir))
    fit_cold_start_grpo_and_validate(module)
    rows = module.predict_step({"waveforms": waves((8000, 40 * SR // 100)), "sample_rate": SR,
                                "keys": ["a.wav", "b.wav"]}, 0)
    assert [r["key"] for r in rows] == ["a.wav", "b.wav"] and all(isinstance(r["text"], str) for r in rows)

    out = export_policy(module.policy, tmp_path / "exported")
    assert hub_layout_problems(out) == []
    assert json.loads((out / "config.json").read_text())["model_type"] == release.model_type
    exported = getattr(transformers, release.thinker_class).from_pretrained(out).eval()
    assert not any("lora" in k for k in exported.state_dict())
    processor = family_for(release.model_type).load_processor(out)
    assert processor.tokenizer.get_vocab() == module.policy.processor.tokenizer.get_vocab()
    assert processor.chat_template == release.chat_template
    prompts = module.policy.build_prompts(waves((12000,)), SR, INSTRUCTION)
    inputs = dict(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                  input_features=prompts.input_features, feature_attention_mask=prompts.feature_attention_mask)
    with torch.no_grad():
        module.policy.model.eval()
        want = module.policy.model(**inputs).logits
        got = exported(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _fsdp2_worker(rank: int, model_dirs: dict[str, str], out: str, port: int) -> None:
    """One rank of a 2-process FSDP2 run (gloo), launched as torchrun would (Lightning joins, launches nothing):
    per release, one after the other in the same process group, one cold-start step, then one GRPO step, each
    rank on its own batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), GROUP_RANK="0", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="omni")
    torch.set_num_threads(1)
    from emorl_pl.strategies import FSDP2Strategy

    for name, model_dir in model_dirs.items():
        module = GRPOModule(AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8)), labels="iemocap4",
                            rewards={"format": 1.0, "accuracy": 1.0}, group_size=G, max_new_tokens=6,
                            micro_batch_size=4, beta=0.04, sft_steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy=FSDP2Strategy(), logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(module, DataLoader(batches(2, seed=rank), batch_size=None))
        params = dict(module.policy.named_parameters())
        lora = {n: p.full_tensor().tolist() for n, p in params.items() if p.requires_grad}  # a collective: all ranks
        record = {"loss": float(trainer.callback_metrics["loss"]), "sft": float(trainer.callback_metrics["sft/loss"]),
                  "sharded": all(type(p).__name__ == "DTensor" for p in params.values()), "lora": lora,
                  "local_rows": params[next(n for n in params if n.endswith("embed_tokens.weight"))].to_local().shape[0],
                  "local_experts": [p.to_local().shape[0] for n, p in params.items() if n.endswith("gate_up_proj")]}
        Path(out, f"{name}_rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def fsdp2_records(request, tmp_path_factory) -> dict[str, list[dict]]:
    """One 2-process launch for both releases (the processes' imports and process group paid once)."""
    out = tmp_path_factory.mktemp("omni_fsdp2")
    dirs = {release.model_type: request.getfixturevalue(release.fixture) for release in RELEASES}
    port = 29500 + (os.getpid() + 7) % 1000
    mp.start_processes(_fsdp2_worker, args=(dirs, str(out), port), nprocs=2, start_method="spawn")
    return {name: [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in (0, 1)] for name in dirs}


def test_fsdp2_cold_start_and_grpo_step_on_two_processes(omni, fsdp2_records):
    release, model_dir = omni
    records = fsdp2_records[release.model_type]
    for record in records:
        assert record["sharded"] and record["local_rows"] == release.vocab_rows // 2  # each rank holds half
        # the experts are sharded with their layer: half of each layer's experts on each rank
        assert record["local_experts"] == ([release.experts[0] // 2] * 2 if release.experts else [])
        assert math.isfinite(record["loss"]) and record["sft"] > 0
    assert records[0]["lora"] == records[1]["lora"]  # one model: the ranks' gradients were reduced together
    fresh = AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8)).load()
    before = {n: p.tolist() for n, p in fresh.named_parameters() if p.requires_grad}
    assert sorted(before) == sorted(records[0]["lora"])
    assert any(records[0]["lora"][n] != before[n] for n in before)  # the steps moved the adapters
