"""``emorl-toy-model`` (emorl_pl.toy_model): each family's toy builds from the command line, loads in the policy
(family detected from config.json) and rolls out; the default toy is the quickstart's ``ensure_tiny_model``
build byte for byte; a folder that is not a model is refused, a model already there is kept.

Oracles: the audio-token counts of a 2 s window are the releases' formulas for 200 mel frames (Whisper-style
stride-2 convolution then pooling by 2: ((200 - 1) // 2 + 1 - 2) // 2 + 1 = 50 for Qwen2-Audio, AF3 and
Qwen2.5-Omni; Qwen3-Omni's 13 tokens per 100-frame chunk: 26), and ``ensure_tiny_model``'s own files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.tiny import ensure_tiny_model
from emorl_pl.toy_model import FAMILIES, build_toy, main

SR = 16000
# family -> (config.json model_type, the text config's path in config.json, audio tokens of a full 2 s window)
EXPECTED = {
    "qwen2_audio": ("qwen2_audio", ("text_config",), 50),
    "audioflamingo3": ("audioflamingo3", ("text_config",), 50),
    "qwen2_5_omni": ("qwen2_5_omni", ("thinker_config", "text_config"), 50),
    "qwen3_omni": ("qwen3_omni_moe", ("thinker_config", "text_config"), 26),
}


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> dict[str, str]:
    """Each family's toy, built through the command line (its printed path)."""
    root = tmp_path_factory.mktemp("toys")
    built = {}
    for family in FAMILIES:
        out = root / family
        assert main([str(out), "--family", family]) == 0
        built[family] = str(out)
    return built


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_builds_the_familys_toy_and_the_policy_rolls_out(toys, family, capsys):
    model_type, text_path, window_tokens = EXPECTED[family]
    config = json.loads((Path(toys[family]) / "config.json").read_text())
    text = config
    for key in text_path:
        text = text[key]
    assert config["model_type"] == model_type and text["vocab_size"] == 1024
    if family == "qwen3_omni":  # a few experts behind the release's router (top-k of a linear map to all)
        assert (text["num_experts"], text["num_experts_per_tok"], text["norm_topk_prob"]) == (8, 2, True)

    policy = AudioLMPolicy(toys[family], lora=None).load()
    fe = policy.processor.feature_extractor
    assert (fe.chunk_length, fe.n_samples) == (2, 2 * SR)  # the 2 s window
    # the BPE learns what its corpus holds (under 1024 tokens); the embedding and lm_head have 1024 rows
    assert 800 < len(policy.processor.tokenizer) <= 1024 == policy.hf_model.get_output_embeddings().weight.shape[0]
    if family == "qwen3_omni":
        routers = [m for n, m in policy.hf_model.named_modules() if n.endswith("mlp.gate")]
        assert routers and all(tuple(r.weight.shape) == (8, 64) for r in routers)
    g = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(n, generator=g) for n in (3 * SR, SR)]
    prompts = policy.build_prompts(waves, SR, "What is the emotion of the speaker?")
    assert prompts.seconds_ignored == (1.0, 0.0)  # cropped to the window
    placeholder = policy.family.audio_token_id(policy.hf_model)
    assert int((prompts.input_ids[0] == placeholder).sum()) == window_tokens
    torch.manual_seed(0)
    rollout = policy.rollout(prompts, 2, max_new_tokens=4)
    assert rollout.completion_ids.shape[0] == 4 and 1 <= rollout.completion_ids.shape[1] <= 4
    logps = policy.completion_logps(rollout)
    assert torch.isfinite(logps[rollout.completion_mask.bool()]).all()


def test_default_toy_is_the_quickstarts_byte_for_byte(toys, tmp_path, capsys):
    cli_dir = tmp_path / "cli"
    assert main([str(cli_dir)]) == 0  # default family: qwen2_audio
    assert capsys.readouterr().out.strip() == str(cli_dir)
    reference = ensure_tiny_model(tmp_path / "ensure")
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in cli_dir.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (cli_dir / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_model_there_is_kept_unless_overwrite(tmp_path, capsys):
    out = build_toy("qwen2_audio", tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, a new modification time to compare
    stamp = weights.stat().st_mtime_ns
    (out / "marker").write_text("kept")
    assert build_toy("qwen2_audio", out) == out and weights.stat().st_mtime_ns == stamp
    assert (out / "marker").read_text() == "kept"
    assert main([str(out), "--family", "audioflamingo3"]) == 2  # another family's model is not returned
    assert "holds a 'qwen2_audio' model, not the audioflamingo3 toy" in capsys.readouterr().err
    assert main([str(out), "--overwrite"]) == 0
    assert not (out / "marker").exists()  # rebuilt from an empty folder


def test_a_folder_that_is_not_a_model_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    for argv in ([str(out)], [str(out), "--overwrite"], [str(out), "--family", "qwen3_omni"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "holds no model" in err
    assert [p.name for p in out.iterdir()] == ["todo.txt"] and (out / "todo.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([str(a_file)]) == 2 and "is a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown family 'llama'"):
        build_toy("llama", tmp_path / "x")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--family", "llama"])
