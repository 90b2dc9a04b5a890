"""Every model we write has the published key layout of its family (emorl_pl.modules.hub_layout).

Qwen2-Audio-7B-Instruct's safetensors hold ``audio_tower.*``, ``multi_modal_projector.*``,
``language_model.model.{embed_tokens,layers.N,norm}.*`` and ``language_model.lm_head.weight``; transformers 5.17
saves a freshly built model as ``language_model.model.model.*``, which vLLM refuses. Checked here for the
real-shape and toy builders, ``emorl-export`` (LoRA merged; from a base in either layout), a fresh model
through ``save_in_hub_layout``, and the Qwen2.5-Omni thinker (no renaming in transformers: its own names).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoProcessor, Qwen2AudioForConditionalGeneration

from emorl_pl.modules.hub_layout import (
    hub_key_map,
    hub_layout_problems,
    save_in_hub_layout,
    saved_weight_names,
)
from emorl_pl.modules.tiny import build_tiny_qwen2_audio, ensure_tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import CONFIGS  # noqa: E402

SR = 16000
# Qwen2-Audio-7B-Instruct's key prefixes (its model.safetensors.index.json), written out independently of
# hub_layout's derivation from transformers.
PUBLISHED = re.compile(
    r"^(audio_tower\.|multi_modal_projector\.|language_model\.model\.(embed_tokens|layers\.\d+|norm)\."
    r"|language_model\.lm_head\.weight$)"
)


def _assert_published_qwen2_audio(names: list[str]) -> None:
    assert names, "no weights saved"
    assert not [n for n in names if n.startswith("language_model.model.model.")], "doubled layout"
    assert [n for n in names if not PUBLISHED.match(n)] == []
    assert "language_model.lm_head.weight" in names and "language_model.model.embed_tokens.weight" in names
    assert any(n.startswith("audio_tower.layers.0.") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)


def _load_cleanly(cls, folder):
    """The model in ``folder``; every saved key loads onto exactly one parameter and every parameter is loaded."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert len(saved_weight_names(folder)) == len(model.state_dict())
    return model.eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == [], different[:5]


def _logits(model, processor) -> torch.Tensor:
    wave = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    inputs = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>Which emotion?"], audio=[wave], sampling_rate=SR,
                       return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def doubled_toy(toy_model_dir, tmp_path) -> Path:
    """A copy of the toy in the layout our builders wrote before (transformers' doubled one), written out
    explicitly so the test does not depend on transformers keeping its bug."""
    folder = tmp_path / "doubled"
    shutil.copytree(toy_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    doubled = {re.sub(r"^language_model\.model\.", "language_model.model.model.", k): v for k, v in weights.items()}
    save_file(doubled, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------------------------------- the builders
@pytest.mark.parametrize("fixture", ["real_model_dir", "toy_model_dir"])
def test_built_models_are_in_the_published_layout(request, fixture):
    folder = Path(request.getfixturevalue(fixture))
    _assert_published_qwen2_audio(saved_weight_names(folder))
    assert hub_layout_problems(folder) == []
    _load_cleanly(Qwen2AudioForConditionalGeneration, folder)


def test_toy_reloads_and_resaves_in_the_published_layout(toy_model_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(toy_model_dir)
    loaded = _load_cleanly(Qwen2AudioForConditionalGeneration, toy_model_dir)
    loaded.save_pretrained(tmp_path / "plain")  # plain transformers save of a loaded model keeps the layout
    save_in_hub_layout(loaded, tmp_path / "ours")
    for folder in (tmp_path / "plain", tmp_path / "ours"):
        _assert_published_qwen2_audio(saved_weight_names(folder))
        again = _load_cleanly(Qwen2AudioForConditionalGeneration, folder)
        _assert_same_state(loaded, again)
        assert torch.equal(_logits(again, processor), _logits(loaded, processor))
    assert _digest(tmp_path / "ours" / "model.safetensors") == _digest(Path(toy_model_dir) / "model.safetensors")


def test_ensure_rebuilds_an_old_doubled_build(doubled_toy, toy_model_dir):
    assert any("language_model.model.model." in p for p in hub_layout_problems(doubled_toy))
    assert ensure_tiny_model(doubled_toy) == doubled_toy
    assert hub_layout_problems(doubled_toy) == []
    assert _digest(doubled_toy / "model.safetensors") == _digest(Path(toy_model_dir) / "model.safetensors")


def test_builders_refuse_other_models_not_in_the_published_layout(toy_model_dir, tmp_path):
    """In-memory names (save_original_format=False) are not an old build of ours: refused, not deleted."""
    folder = tmp_path / "in_memory_names"
    shutil.copytree(toy_model_dir, folder)
    Qwen2AudioForConditionalGeneration.from_pretrained(toy_model_dir).save_pretrained(folder, save_original_format=False)
    problems = hub_layout_problems(folder)
    assert "lm_head.weight: not a key of the published layout" in problems, problems
    assert any(p.startswith("audio_tower.conv1.weight: missing") for p in problems), problems
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match="published key layout"):
        build_tiny_qwen2_audio(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------- save_in_hub_layout
def test_fresh_model_saves_in_the_published_layout_and_reloads_bitwise(toy_model_dir, tmp_path):
    """The case transformers gets wrong: a model built from its config, never loaded."""
    processor = AutoProcessor.from_pretrained(toy_model_dir)
    torch.manual_seed(3)
    fresh = Qwen2AudioForConditionalGeneration(AutoConfig.from_pretrained(toy_model_dir)).eval()
    mapping = hub_key_map(fresh)
    assert mapping["lm_head.weight"] == "language_model.lm_head.weight"
    assert mapping["model.language_model.layers.0.self_attn.q_proj.weight"] == (
        "language_model.model.layers.0.self_attn.q_proj.weight")
    assert mapping["model.audio_tower.conv1.weight"] == "audio_tower.conv1.weight"
    assert mapping["model.multi_modal_projector.linear.weight"] == "multi_modal_projector.linear.weight"
    assert not hasattr(fresh, "_weight_conversions")

    save_in_hub_layout(fresh, tmp_path / "fresh")
    assert not hasattr(fresh, "_weight_conversions"), "the save must leave the model as it found it"
    names = saved_weight_names(tmp_path / "fresh")
    _assert_published_qwen2_audio(names)
    assert sorted(mapping.values()) == names
    loaded = _load_cleanly(Qwen2AudioForConditionalGeneration, tmp_path / "fresh")
    _assert_same_state(fresh, loaded)
    assert torch.equal(_logits(loaded, processor), _logits(fresh, processor))
    loaded.save_pretrained(tmp_path / "resaved")
    assert saved_weight_names(tmp_path / "resaved") == names


def test_save_in_hub_layout_refuses_in_memory_names(toy_model_dir, tmp_path):
    model = Qwen2AudioForConditionalGeneration.from_pretrained(toy_model_dir)
    with pytest.raises(ValueError, match="save_original_format"):
        save_in_hub_layout(model, tmp_path / "x", save_original_format=False)


# -------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("base", ["published", "doubled"])
def test_export_writes_the_published_layout(request, base, tmp_path):
    """emorl-export (LoRA merged) writes the published layout whatever the base folder's layout (a base in the
    doubled layout is loaded with transformers' nested renaming, which save_pretrained would undo again);
    the export reloads bitwise as the merge done in memory."""
    from emorl_pl.export import load_trained_policy, main, policy_from_config

    base_dir = Path(request.getfixturevalue("toy_model_dir" if base == "published" else "doubled_toy"))
    config = CONFIGS / "tiny_grpo.yaml"
    policy = policy_from_config(config, str(base_dir)).load()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v.clone() for k, v in policy.state_dict().items() if ".lora_" in k}}, ckpt)

    out = tmp_path / "exported"
    assert main(["--config", str(config), "--model_dir", str(base_dir), "--ckpt", str(ckpt), "--out", str(out)]) == 0
    _assert_published_qwen2_audio(saved_weight_names(out))
    assert hub_layout_problems(out) == []
    exported = _load_cleanly(Qwen2AudioForConditionalGeneration, out)
    assert not any("lora" in k for k in exported.state_dict())

    merged = load_trained_policy(config, ckpt, str(base_dir)).model.merge_and_unload().eval()
    _assert_same_state(merged, exported)
    processor = AutoProcessor.from_pretrained(out)
    assert torch.equal(_logits(exported, processor), _logits(merged, processor))


# ------------------------------------------------------------------------------- Qwen2.5-Omni thinker
def test_omni_thinker_saves_in_the_whole_omni_layout(tmp_path):
    """The published Qwen2.5-Omni checkpoint is the whole Omni model: the Omni config around the thinker's and
    the thinker's weights under ``thinker.``, the folder vLLM serves the thinker from; transformers loads the
    thinker class from it."""
    import json

    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    config = Qwen2_5OmniThinkerConfig(
        audio_config={"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
                      "num_mel_bins": 128, "output_dim": 16, "n_window": 50, "max_source_positions": 50},
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
                       "out_hidden_size": 16, "fullatt_block_indexes": [0]},
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}},
    )
    torch.manual_seed(0)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    assert all(v == "thinker." + k for k, v in hub_key_map(thinker).items())
    save_in_hub_layout(thinker, tmp_path / "thinker")
    names = saved_weight_names(tmp_path / "thinker")
    assert names == sorted("thinker." + k for k in thinker.state_dict())
    assert {n.split(".")[1] for n in names} == {"audio_tower", "visual", "model", "lm_head"}
    config = json.loads((tmp_path / "thinker" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["enable_audio_output"] is False
    assert hub_layout_problems(tmp_path / "thinker") == []
    loaded = _load_cleanly(Qwen2_5OmniThinkerForConditionalGeneration, tmp_path / "thinker")
    _assert_same_state(thinker, loaded)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, thinker(input_ids=ids).logits)
