"""emorl-plan on the other audio-LM families (issue 20): Audio Flamingo 3, the Qwen2.5-Omni and Qwen3-Omni
thinkers. Their geometry against torch's own parameter count of the shipped config.json, the verdicts of
their shipped recipes on 8 x 80 GiB, and the plan against the measured peak memory of real GRPO steps on
CPU of the real-shape test models, within 10% (measured as in tests/test_memory_plan.py, whose measuring
child this file's child reuses).

Run as a script, this file is the measuring child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emorl_pl.memory_plan import (
    ModelGeometry,
    PlanSettings,
    audio_params,
    audio_tokens,
    feature_extraction_bytes,
    feature_frames,
    feature_samples,
    lm_layer_params,
    lm_params,
    lora_adapted_targets,
    lora_params,
    plan,
    total_params,
)
from emorl_pl.plan_cli import geometry_from_config, main

ROOT = Path(__file__).resolve().parents[1]
AF3_JSON = ROOT / "configs/model/audioflamingo3_config.json"
TRAINER = str(ROOT / "configs/trainer/fsdp2_8gpu.yaml")
DATA = str(ROOT / "configs/data/iemocap.yaml")


def _torch_count(config_json: Path, config_class: str, model_class: str) -> dict[str, int]:
    import torch
    import transformers

    config = getattr(transformers, config_class)(**json.loads(config_json.read_text()))
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    lm = sum(p.numel() for n, p in named.items() if "language_model" in n or n.startswith("lm_head"))
    return {"total": total, "lm": lm, "audio": total - lm}


# ------------------------------------------------------------------------------------------ Audio Flamingo 3
def test_af3_geometry_counts_like_torch():
    g = geometry_from_config(AF3_JSON)
    assert (g.vocab_size, g.hidden_size, g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim,
            g.intermediate_size) == (151672, 3584, 28, 28, 4, 128, 18944)
    assert (g.audio_d_model, g.audio_layers, g.max_source_positions, g.projector_layers) == (1280, 32, 1500, 2)
    counted = _torch_count(AF3_JSON, "AudioFlamingo3Config", "AudioFlamingo3ForConditionalGeneration")
    assert (total_params(g), lm_params(g), audio_params(g)) == (counted["total"], counted["lm"], counted["audio"])
    # By hand: the projector is 1280 x 3584 + 3584 and 3584 x 3584 + 3584.
    one_layer = dataclasses_replace(g, projector_layers=1)
    assert audio_params(g) - audio_params(one_layer) == 3584 * 3584 + 3584
    assert total_params(g) == 8_267_215_360


def dataclasses_replace(g: ModelGeometry, **changes) -> ModelGeometry:
    import dataclasses

    return dataclasses.replace(g, **changes)


# ------------------------------------------------------------------------------------------ the Omni thinkers
OMNI_JSON = ROOT / "configs/model/qwen2_5_omni_7b_config.json"
MOE_JSON = ROOT / "configs/model/qwen3_omni_30b_a3b_config.json"


def test_omni_geometry_counts_like_torch():
    omni, moe = geometry_from_config(OMNI_JSON), geometry_from_config(MOE_JSON)
    for g, path, config_class, model_class in (
            (omni, OMNI_JSON, "Qwen2_5OmniThinkerConfig", "Qwen2_5OmniThinkerForConditionalGeneration"),
            (moe, MOE_JSON, "Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeThinkerForConditionalGeneration")):
        counted = _torch_count_thinker(path, config_class, model_class)
        assert (total_params(g), lm_params(g), audio_params(g)) == (counted["total"], counted["lm"], counted["towers"])
    # Qwen2.5-Omni: Qwen2 layers (as Qwen2-Audio's LM, 152064 rows): 28 x (q 3584^2 + 3584, k and v 3584 x 512 + 512,
    # o 3584^2, gate/up/down 3 x 3584 x 18944, 2 norms) + embed + lm_head + norm.
    layer = 3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert lm_params(omni) == 28 * layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    # Qwen3-Omni-MoE: q 2048 -> 32 x 128 = 4096, k and v 2048 -> 512, o 4096 -> 2048, no biases, q/k norms (128
    # each), router 128 x 2048, 128 experts x (gate, up, down) 2048 x 768, 2 norms: every expert is a parameter.
    attention = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128
    experts = 128 * 3 * 2048 * 768
    assert lm_layer_params(moe) == attention + 128 * 2048 + experts + 2 * 2048 == 623_120_640
    assert lm_params(moe) == 48 * 623_120_640 + 2 * 152064 * 2048 + 2048 == 30_532_646_912
    assert total_params(moe) == 31_719_205_488
    # Activations see k = 8 of the 128 experts per token: the layer's MLP width is 8 x 768, not 128 x 768.
    assert moe.active_intermediate == 8 * 768
    # 30 s of audio: 30 chunks of 100 frames x 13 tokens (Qwen3-Omni's encoder); 4 s: 52; 4.5 s: 52 + 7.
    assert [audio_tokens(x, 30.0, moe.audio_chunk_tokens) for x in (30, 4, 4.5)] == [390, 52, 59]


def _torch_count_thinker(config_json: Path, config_class: str, model_class: str) -> dict[str, int]:
    import torch
    import transformers

    config = getattr(transformers, config_class)(**json.loads(config_json.read_text())["thinker_config"])
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    named = dict(model.named_parameters())
    lm = sum(p.numel() for n, p in named.items() if n.startswith(("model.", "lm_head.")))
    towers = sum(p.numel() for n, p in named.items() if n.startswith(("audio_tower.", "visual.")))
    return {"total": sum(p.numel() for p in named.values()), "lm": lm, "towers": towers}


def test_moe_lora_adapts_attention_only_and_counts_router_and_experts():
    """The policy excludes the fused experts from LoRA: the default targets adapt q, k, v, o; the moments are
    the adapters' only, while every expert stays resident (sharded) in the parameters."""
    moe = geometry_from_config(MOE_JSON)
    assert lora_adapted_targets(moe) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lora_params(moe, 64) == 48 * 64 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048)) == 53_477_376
    s = PlanSettings(batch_size=1, group_size=6, prompt_tokens=390 + 178, max_new_tokens=512, micro_batch_size=6,
                     lora_rank=64, strategy="fsdp2", num_gpus=8, fsdp_param_dtype="bfloat16",
                     gradient_checkpointing=True, reference_sharded=True, rollout_gathered=True)
    p = plan(moe, s)
    assert p.piece("parameters").bytes == (31_719_205_488 + 53_477_376) * 4 / 8
    assert p.piece("optimizer: AdamW exp_avg + exp_avg_sq").bytes == 2 * 53_477_376 * 4 / 8
    # FSDP2 gathers a whole layer (all 128 experts) at a time, in bf16, next to the 152064 x 2048 embedding.
    assert p.piece("FSDP2 all-gathered weights").bytes == (623_120_640 + 623_120_640) * 2
    # Per token and layer, the router's logits (bf16) and fp32 softmax over 128 experts and the 8 routed copies.
    full = plan(moe, dataclasses_replace_settings(s, gradient_checkpointing=False))
    dense = dataclasses_replace(moe, num_experts=0, intermediate_size=8 * 768)
    router = 128 * (2 + 4) + 8 * (2048 * 2 + 8)
    tokens = 6 * (568 + 512)
    lora_dense = plan(dense, dataclasses_replace_settings(s, gradient_checkpointing=False, lora_targets=(
        "q_proj", "k_proj", "v_proj", "o_proj")))
    assert (full.piece("activations: saved for backward").bytes - lora_dense.piece("activations: saved for backward")
            .bytes) == 48 * tokens * router


def dataclasses_replace_settings(s: PlanSettings, **changes) -> PlanSettings:
    import dataclasses

    return dataclasses.replace(s, **changes)


# ------------------------------------------------------------------------------------------ the feature window
def test_feature_extraction_bytes_by_hand():
    """Qwen2.5-Omni's 300 s window: N = 4,800,000 samples, F = 30,000 frames, K = 201 frequencies, M = 128 mels.
    Padding: waveform + int32 mask, 8 N; the STFT moment: centre-padded 4 (N + 400), frames 4 x 400 x (F + 1),
    spectrum 8 K (F + 1); the log-mel moment: spectrum + power 4 K F + mel and three log-mel arrays 4 x 4 M F."""
    g = geometry_from_config(OMNI_JSON)
    assert (g.feature_seconds, g.features_padded_to_window, g.sampling_rate, g.hop_length, g.n_fft) == (
        300.0, True, 16000, 160, 400)
    assert feature_samples(g, 4.0) == 4_800_000 and feature_frames(g, 4.0) == 30_000
    stft = 4 * 4_800_400 + 4 * 400 * 30_001 + 8 * 201 * 30_001
    after = 8 * 201 * 30_001 + 4 * 201 * 30_000 + 16 * 128 * 30_000
    assert after > stft
    assert feature_extraction_bytes(g, 4.0) == (8 * 4_800_000 + after, 4 * 128 * 30_000 + 4 * 4_800_000)
    assert feature_extraction_bytes(g, 4.0)[0] == 172_201_608  # 164.2 MiB
    # Qwen3-Omni pads to the longest clip: 4 s is 64,000 samples, 400 frames; past the window, the window.
    moe = geometry_from_config(MOE_JSON)
    assert not moe.features_padded_to_window and moe.feature_seconds == 300.0
    assert (feature_samples(moe, 4.0), feature_frames(moe, 4.0), feature_frames(moe, 400.0)) == (64_000, 400, 30_000)
    # Qwen2-Audio and AF3: the encoder's 30 s window (WhisperFeatureExtractor's chunk_length).
    assert feature_frames(geometry_from_config(AF3_JSON), 4.0) == 3000
    # On a GPU: the features held on the device, the extraction a host-RAM note; on the CPU a stage.
    s = PlanSettings(batch_size=2, group_size=2, prompt_tokens=300, max_new_tokens=8, micro_batch_size=4, lora_rank=4)
    gpu, cpu = plan(g, s), plan(g, dataclasses_replace_settings(s, device="cpu"))
    assert gpu.piece("prompt audio features").bytes == 2 * (128 * 30_000 * 4 + 4 * 30_000)
    assert any("host RAM while building a batch's prompts: 2 x 164 MiB" in n for n in gpu.notes)
    assert "prompt features (feature extractor)" not in [x.name for x in gpu.stages]
    assert cpu.piece("prompt audio features").bytes == 2 * (128 * 30_000 * 4 + 4 * 4_800_000)
    assert cpu.piece("feature extraction temporaries").bytes == 2 * (172_201_608 - 128 * 30_000 * 4 - 4 * 4_800_000)


@pytest.mark.parametrize("fixture", ["real_model_dir", "audioflamingo3_model_dir", "qwen2_5_omni_model_dir",
                                     "qwen3_omni_model_dir"])
def test_feature_window_and_padding_are_the_processors(request, fixture):
    """The plan's feature frames per clip (window, padding, hop) against what each family's processor makes of a
    1 s and a 4 s clip in the policy's prompts (``prompting.build_prompts``), read from the test model's folder."""
    import torch

    from emorl_pl.modules.families import family_for
    from emorl_pl.modules.prompting import build_prompts

    model_dir = Path(request.getfixturevalue(fixture))
    g = geometry_from_config(model_dir / "config.json")
    processor = family_for(json.loads((model_dir / "config.json").read_text())["model_type"]).load_processor(model_dir)
    waves = [0.1 * torch.randn(n, generator=torch.Generator().manual_seed(0)) for n in (16000, 64000)]
    prompts = build_prompts(processor, waves, 16000, "What is the emotion?")
    assert prompts.input_features.shape[1:] == (g.num_mel_bins, feature_frames(g, 4.0))
    assert prompts.feature_attention_mask.sum(-1).tolist() == [100, 400]
    assert processor.feature_extractor.n_samples == round(g.feature_seconds * g.sampling_rate)
    assert (processor.feature_extractor.hop_length, processor.feature_extractor.n_fft) == (g.hop_length, g.n_fft)


# ------------------------------------------------------------------------------------------ 8 x 80 GiB verdicts
RECIPES = {
    "audioflamingo3": ("emorl_audioflamingo3.yaml", AF3_JSON),
    "qwen2_5_omni": ("emorl_qwen2_5_omni_7b.yaml", OMNI_JSON),
    "qwen3_omni": ("emorl_qwen3_omni_30b_a3b_lora.yaml", MOE_JSON),
}


def _cli(capsys, family: str, *extra: str) -> str:
    recipe, config_json = RECIPES[family]
    assert main(["-c", TRAINER, "--model", str(ROOT / "configs/model" / recipe), "--data", DATA,
                 "--model-config", str(config_json), *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family", ["audioflamingo3", "qwen2_5_omni"])
def test_full_fine_tuning_fits_8_x_80(capsys, family):
    out = _cli(capsys, family)
    assert "full fine-tuning of the LM" in out and "FSDP2 over 8 GPUs" in out
    assert " fits (" in out and "sharded 1/8" in out


def test_qwen3_omni_full_fine_tuning_does_not_fit_lora_does(capsys):
    full = _cli(capsys, "qwen3_omni", "--model.init_args.policy.init_args.lora", "null")
    assert "DOES NOT FIT" in full and "LoRA r=64 on the LM projections" in full
    lora = _cli(capsys, "qwen3_omni")
    assert "LoRA r=64 on 4 LM projections: 0.0535 B trainable" in lora and "128 experts, 8 per token" in lora
    assert " fits (" in lora  # the recipe's bf16 frozen base
    fp32 = _cli(capsys, "qwen3_omni", "--model.init_args.policy.init_args.dtype", "float32")
    assert "fits, but only" in fp32  # an fp32 frozen base: under the 15% margin


# ------------------------------------------------------------------------------------------ measured on CPU
def _cpu_settings(shape: dict, geometry: ModelGeometry, prompt_tokens: int) -> PlanSettings:
    return PlanSettings(
        batch_size=shape["B"], group_size=shape["G"], max_new_tokens=shape["T"], micro_batch_size=shape["m"],
        prompt_tokens=prompt_tokens, lora_rank=shape["lora_r"] or None, lora_dropout=shape.get("lora_dropout", 0.0),
        gradient_checkpointing=shape.get("ckpt", False), beta=0.04, precision="32-true", device="cpu",
        audio_seconds=shape["seconds"])


def _measure(shapes: list[dict]) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, json.dumps(shapes)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(shapes)
    return rows


def _compare(shapes: list[dict], rows: list[dict], tolerance: float) -> None:
    table, ratios = [], []
    for shape, row in zip(shapes, rows):
        geometry = geometry_from_config(Path(shape["model_dir"]) / "config.json")
        assert row["completion_tokens"] == shape["T"]
        # The prompt: audio_tokens of the cropped waveform + the template's text (measured, as the plan's
        # input: the text length is the family's chat template's).
        assert row["prompt_tokens"] > audio_tokens(shape["seconds"], geometry.window_seconds)
        planned = plan(geometry, _cpu_settings(shape, geometry, row["prompt_tokens"]))
        ratios.append(planned.peak_bytes / (row["peak_mib"] * 2**20))
        table.append(f"{shape['name']:<34} d={geometry.hidden_size:<4} L={geometry.num_layers} P={row['prompt_tokens']} "
                     f"measured {row['peak_mib']:7.1f} MiB  plan {planned.peak_bytes / 2**20:7.1f} MiB "
                     f"({planned.peak_stage.name})  plan/measured {ratios[-1]:.3f}  [{row['seconds']} s]")
    print("\n" + "\n".join(table))
    for line, ratio in zip(table, ratios):
        assert 1 - tolerance <= ratio <= 1 + tolerance, line


def _shapes(narrow: str, wide: str) -> list[dict]:
    return [
        dict(name="LoRA r4, B2 x G4, m8", model_dir=narrow, seconds=4, B=2, G=4, T=16, m=8, lora_r=4),
        dict(name="full FT, B1 x G4, m2", model_dir=wide, seconds=4, B=1, G=4, T=12, m=2, lora_r=0),
        dict(name="LoRA r8 drop, ckpt, B1 x G6, m3", model_dir=wide, seconds=4, B=1, G=6, T=16, m=3, lora_r=8,
             lora_dropout=0.05, ckpt=True),
    ]


@pytest.mark.slow
def test_af3_plan_matches_measured_cpu_peak_within_10_percent(tmp_path):
    from emorl_pl.modules.tiny_audioflamingo3 import build_real_shape_audioflamingo3

    narrow = str(build_real_shape_audioflamingo3(tmp_path / "narrow"))
    wide = str(build_real_shape_audioflamingo3(tmp_path / "wide", hidden_size=128, num_layers=4))
    shapes = _shapes(narrow, wide)
    _compare(shapes, _measure(shapes), 0.10)


# ------------------------------------------------------------------------------------------ the measuring child
def _child(shapes: list[dict]) -> None:
    """tests/test_memory_plan.py's measuring child, with each family's processor loaded once, outside the
    measurement (that child does so for AutoProcessor, which Qwen2-Audio's family uses)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_memory_plan

    from emorl_pl.modules import families

    cache: dict[type, object] = {}
    for cls in {type(f) for f in families.FAMILIES.values()}:
        original = cls.load_processor

        def load(self, model_dir, _original=original, **kwargs):
            if type(self) not in cache:
                cache[type(self)] = _original(self, model_dir, **kwargs)
            return cache[type(self)]

        cls.load_processor = load
    import transformers

    family = families.family_for(json.loads((Path(shapes[0]["model_dir"]) / "config.json").read_text())["model_type"])
    processor = family.load_processor(shapes[0]["model_dir"])
    # That child loads its processor with AutoProcessor (the Omni ones need torchvision that way): this one.
    transformers.AutoProcessor.from_pretrained = classmethod(lambda cls, *a, **k: processor)
    test_memory_plan._measure_child(shapes)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni"])
def test_omni_plan_matches_measured_cpu_peak_within_10_percent(tmp_path, family):
    """Qwen2.5-Omni's processor pads every clip to its 300 s feature window (input_features (B, 128, 30000)):
    the step's peak on the CPU is the feature extraction (164 MiB per clip), which the plan's CPU variant
    counts as a stage (``feature_extraction_bytes``); Qwen3-Omni's pads to the longest clip only."""
    from emorl_pl.modules import tiny

    build = {"qwen2_5_omni": tiny.build_real_shape_qwen2_5_omni, "qwen3_omni": tiny.build_real_shape_qwen3_omni}[family]
    narrow = str(build(tmp_path / "narrow"))
    wide = str(build(tmp_path / "wide", hidden_size=128, num_layers=4))
    shapes = _shapes(narrow, wide)
    _compare(shapes, _measure(shapes), 0.10)
