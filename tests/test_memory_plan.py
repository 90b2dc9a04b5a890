"""emorl-plan: the memory model's pieces against hand computations and torch's own parameter count, the
verdict and suggestions, the CLI on the shipped recipes, and the plan against the measured peak memory of
real GRPO steps on CPU (real-shape test models: the 156,032-row vocabulary, the 30 s audio window).

Run as a script, this file is the measuring child process (see ``_measure_child``)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emorl_pl.memory_plan import (
    LM_PROJECTIONS,
    ModelGeometry,
    PlanSettings,
    audio_tokens,
    lm_params,
    lora_params,
    plan,
    suggestions,
    text_tokens,
    total_params,
    verdict,
)
from emorl_pl.plan_cli import PlanConfigError, geometry_from_config, main, merged_config, settings_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_JSON = ROOT / "configs/model/qwen2_audio_7b_config.json"
RECIPE = ["-c", str(ROOT / "configs/trainer/fsdp2_8gpu.yaml"), "--data", str(ROOT / "configs/data/iemocap.yaml"),
          "--model-config", str(CONFIG_JSON)]
FULL = ["--model", str(ROOT / "configs/model/emorl_qwen2_audio_7b.yaml")]
LORA = ["--model", str(ROOT / "configs/model/emorl_qwen2_audio_7b_lora.yaml")]
GiB = 2**30


@pytest.fixture(scope="module")
def g7b() -> ModelGeometry:
    return geometry_from_config(CONFIG_JSON)


def recipe_settings(**changes) -> PlanSettings:
    """The shipped 8-GPU recipe per rank: B = 1, G = 6, 30 s of audio + the esr prompt, 512 new tokens."""
    base = PlanSettings(batch_size=1, group_size=6, prompt_tokens=750 + 178, max_new_tokens=512, micro_batch_size=6,
                        precision="bf16-mixed", strategy="fsdp2", num_gpus=8, gradient_checkpointing=True)
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------- geometry and pieces
def test_shipped_config_is_qwen2_audio_7b_and_counts_like_torch(g7b):
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    assert (g7b.vocab_size, g7b.hidden_size, g7b.num_layers, g7b.num_heads, g7b.num_kv_heads, g7b.head_dim,
            g7b.intermediate_size) == (156032, 4096, 32, 32, 32, 128, 11008)
    assert (g7b.audio_d_model, g7b.audio_layers, g7b.audio_heads, g7b.audio_ffn, g7b.num_mel_bins,
            g7b.max_source_positions, g7b.window_seconds) == (1280, 32, 20, 5120, 128, 1500, 30.0)
    # The published config.json leaves the LM geometry to Qwen2Config's defaults: same result without it.
    sparse = json.loads(CONFIG_JSON.read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        del sparse["text_config"][key]
    config = Qwen2AudioConfig(**sparse)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    assert total_params(g7b) == sum(p.numel() for p in model.parameters()) == 8_397_094_912
    assert lm_params(g7b) == sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)


def test_7b_parameter_and_optimizer_bytes_by_hand(g7b):
    # By hand from the config: embed and lm_head 156032 x 4096 = 639,107,072 each; a layer has q 4096^2 + 4096,
    # k and v 4096^2 + 4096 each, o 4096^2, gate/up/down 3 x 4096 x 11008, 2 norms x 4096 = 202,387,456;
    # 32 layers + final norm 4096 -> LM = 2 x 639,107,072 + 32 x 202,387,456 + 4096 = 7,754,878,976.
    assert lm_params(g7b) == 7_754_878_976
    # LoRA r = 64 on q, k, v, o (64 x (4096 + 4096) each), gate, up, down (64 x (4096 + 11008) each), 32 layers.
    assert lora_params(g7b, 64, LM_PROJECTIONS) == 32 * 64 * (4 * 8192 + 3 * 15104) == 159_907_840

    full = plan(g7b, recipe_settings())
    assert full.piece("parameters").bytes == 8_397_094_912 * 4 / 8
    assert full.piece("optimizer: AdamW exp_avg + exp_avg_sq").bytes == 2 * 4 * 7_754_878_976 / 8
    # PlanSettings' default: the reference unsharded (frozen_copy, as without FSDP2), fp32.
    assert full.piece("reference model: frozen copy").bytes == 8_397_094_912 * 4
    shard_ref = plan(g7b, recipe_settings(reference_sharded=True, reference_dtype="bfloat16"))
    assert shard_ref.piece("reference model: frozen copy").bytes == 8_397_094_912 * 2 / 8

    lora = plan(g7b, recipe_settings(lora_rank=64, lora_dropout=0.05))
    assert lora.piece("parameters").bytes == (8_397_094_912 + 159_907_840) * 4 / 8  # base + adapters, fp32
    assert lora.piece("optimizer: AdamW exp_avg + exp_avg_sq").bytes == 2 * 4 * 159_907_840 / 8
    assert lora.piece("reference model").bytes == 0
    # bf16 base weights: peft keeps the adapters, their gradients and AdamW moments in fp32.
    bf16 = plan(g7b, recipe_settings(lora_rank=64, policy_dtype="bfloat16"))
    assert bf16.piece("parameters").bytes == (8_397_094_912 * 2 + 159_907_840 * 4) / 8
    assert bf16.piece("optimizer: AdamW exp_avg + exp_avg_sq").bytes == 2 * 4 * 159_907_840 / 8


def test_kv_cache_and_logits_by_hand(g7b):
    p = plan(g7b, recipe_settings())
    # 6 rollout rows x (928 prompt + 512 new) tokens x 32 layers x (K, V) x 4096 x 2 B (bf16 autocast).
    assert p.piece("KV cache of the rollout").bytes == 6 * 1440 * 32 * 2 * 4096 * 2
    # completion_logps: lm_head over the micro-batch's 6 rows x 512 tokens -> (6, 512, 156032) bf16 logits.
    assert p.piece("logits (rows, T, V), kept for backward").bytes == 6 * 512 * 156032 * 2
    assert p.piece("gradient of the logits").bytes == 6 * 512 * 156032 * 2
    # fp32 run: 4 B logits, and one fp32 (T, V) softmax per row in backward (no upcast copies).
    fp32 = plan(g7b, recipe_settings(precision="32-true"))
    assert fp32.piece("logits (rows, T, V), kept for backward").bytes == 6 * 512 * 156032 * 4
    assert fp32.piece("log-softmax chunk temporaries").bytes == 512 * 156032 * 4
    # One device, full fine-tuning: backward recomputes one row's (512, V) logits; fp32 z is the chunk itself,
    # and its softmax-gradient a new fp32 tensor on GPU, formed in place on CPU.
    single = dict(strategy="single", num_gpus=1, precision="32-true", gradient_checkpointing=False)
    gpu = plan(g7b, recipe_settings(**single))
    cpu = plan(g7b, recipe_settings(**single, device="cpu"))
    assert gpu.piece("logits recomputed per chunk in backward (chunked lm_head)").bytes == 512 * 156032 * (4 + 4)
    assert cpu.piece("logits recomputed per chunk in backward (chunked lm_head)").bytes == 512 * 156032 * 4
    # Checkpointing keeps each layer's fp32 input: 32 x 6 rows x (928 + 512) x 4096 x 4 B (full sequences
    # under FSDP2).
    assert p.piece("activations: layer inputs (checkpointing)").bytes == 32 * 6 * 1440 * 4096 * 4


def test_prompt_length_pieces():
    assert [audio_tokens(s) for s in (30, 60, 8, 4, 1)] == [750, 750, 200, 100, 25]
    assert text_tokens("esr", 4) == 178 and text_tokens("ir", 4) == 74 and text_tokens("esr", 7) == 184
    with pytest.raises(ValueError, match="mode"):
        text_tokens("cot")


def test_checkpointing_lora_micro_batch_and_gpus_lower_the_right_pieces(g7b):
    base = recipe_settings(gradient_checkpointing=False)
    no_ckpt, ckpt = plan(g7b, base), plan(g7b, recipe_settings())
    assert ckpt.peak_bytes < no_ckpt.peak_bytes
    assert no_ckpt.piece("activations: saved for backward").bytes > 10 * ckpt.piece(
        "activations: layer inputs (checkpointing)").bytes
    smaller = plan(g7b, recipe_settings(micro_batch_size=2))
    assert smaller.piece("gradient of the logits").bytes == plan(g7b, recipe_settings()).piece(
        "gradient of the logits").bytes / 3
    # More GPUs shard parameters and moments, not an unsharded reference copy.
    sixteen = plan(g7b, recipe_settings(num_gpus=16))
    assert sixteen.piece("parameters").bytes == ckpt.piece("parameters").bytes / 2
    assert sixteen.piece("reference model: frozen copy").bytes == ckpt.piece("reference model: frozen copy").bytes
    # beta = 0 drops the reference pass but not the reference copy (AudioLMPolicy.load makes it).
    no_kl = plan(g7b, recipe_settings(beta=0.0))
    assert not any("reference log-probs" in s.name for s in no_kl.stages)
    assert no_kl.piece("reference model: frozen copy").bytes == ckpt.piece("reference model: frozen copy").bytes


def test_issue12_settings_by_hand(g7b):
    """FSDP2 param_dtype bf16 (no autocast), the reference sharded in bf16, the hybrid-engine rollout and
    gradients kept unsharded until a step's last backward."""
    s = recipe_settings(precision="32-true", fsdp_param_dtype="bfloat16", reference_sharded=True,
                        rollout_gathered=True)
    p = plan(g7b, s)
    assert p.piece("reference model: frozen copy").bytes == 8_397_094_912 * 2 / 8
    assert p.piece("parameters").bytes == 8_397_094_912 * 4 / 8  # fp32 shards stay the master weights
    # The rollout gathers every unit in bf16: a whole bf16 copy next to the fp32 shards.
    assert p.piece("every FSDP2 unit gathered (hybrid engine)").bytes == 8_397_094_912 * 2
    # The fused decode holds the one prompt once for the 6 rows, and 512 + 1 columns per row for the new
    # tokens, in bf16 (the unit-by-unit decode of the defaults repeats the prompt: 6 x (928 + 512)).
    assert p.piece("KV cache of the rollout").bytes == (1 * 927 + 6 * 513) * 32 * 2 * 4096 * 2
    assert p.piece("shared prefill cache").bytes == 1 * 927 * 32 * 2 * 4096 * 2
    # bf16 compute without autocast: bf16 logits, a bf16 residual stream under checkpointing.
    assert p.piece("activations: layer inputs (checkpointing)").bytes == 32 * 6 * 1440 * 4096 * 2
    assert not any(x.name.startswith("bf16 weight copies") for st in p.stages for x in st.pieces)
    # Two micro-batches per step with sync per_step: the first one's gradients are whole (fp32) on every rank.
    two = plan(g7b, dataclasses.replace(s, micro_batch_size=3, fsdp_sync="per_step"))
    assert two.piece("gradients (earlier micro-batches)").bytes == 7_754_878_976 * 4
    per_backward = plan(g7b, dataclasses.replace(s, micro_batch_size=3, fsdp_sync="per_backward"))
    assert per_backward.piece("gradients (earlier micro-batches)").bytes == 7_754_878_976 * 4 / 8


# ------------------------------------------------------------------------------- verdict, suggestions
def test_verdict_thresholds():
    assert verdict(68.0, 80) == "fits"  # exactly 15% under
    assert verdict(68.1, 80) == "tight"
    assert verdict(80.0, 80) == "tight"
    assert verdict(80.1, 80) == "does not fit"


def test_suggestions_each_with_its_own_new_estimate(g7b):
    one_gpu = recipe_settings(strategy="single", num_gpus=1)
    peak = plan(g7b, one_gpu).peak_gib
    assert peak > 150  # fp32 weights + frozen fp32 copy + fp32 AdamW moments + gradients of 7.75 B
    found = suggestions(g7b, one_gpu, 80)
    assert found and all(s.peak_gib < 0.99 * peak for s in found)
    for s in found:
        assert s.peak_gib == pytest.approx(plan(g7b, s.settings).peak_gib)
        assert s.verdict == verdict(s.peak_gib, 80)
    by_change = {s.change.split(" (")[0]: s for s in found}
    assert by_change["LoRA r=64 on the LM projections"].verdict == "fits"
    assert by_change["FSDP2 over 8 GPUs"].settings.num_gpus == 8  # the first of 2, 4, 8 that fits
    assert plan(g7b, dataclasses.replace(one_gpu, strategy="fsdp2", num_gpus=4)).peak_gib > 0.85 * 80
    # Nothing to suggest when it fits with the margin.
    assert suggestions(g7b, recipe_settings(lora_rank=64), 80) == []


def test_suggestions_combine_changes_when_none_is_enough(g7b):
    tight = recipe_settings(strategy="single", num_gpus=1, gradient_checkpointing=False)
    found = suggestions(g7b, tight, 24)
    assert not any(s.verdict == "fits" for s in found if not s.combined)
    combined = [s for s in found if s.combined]
    assert len(combined) == 1 and combined[0].verdict == "fits"
    assert "LoRA" in combined[0].change and "gradient checkpointing" in combined[0].change


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_on_the_shipped_full_recipe(capsys, g7b):
    assert main([*RECIPE, *FULL]) == 0
    out = capsys.readouterr().out
    config, origin = merged_config([str(ROOT / "configs/trainer/fsdp2_8gpu.yaml")],
                                   {"model": FULL[1:], "data": [RECIPE[3]]})
    settings, assumed = settings_from_config(config, origin)
    # Independently from the YAML files: what the plan must have read.
    trainer = yaml.safe_load((ROOT / "configs/trainer/fsdp2_8gpu.yaml").read_text())["trainer"]
    module = yaml.safe_load((ROOT / FULL[1]).read_text())["init_args"]
    data = yaml.safe_load((ROOT / RECIPE[3]).read_text())["init_args"]
    assert (settings.strategy, settings.num_gpus) == ("fsdp2", trainer["devices"])
    assert settings.precision == trainer.get("precision", "32-true")
    assert settings.fsdp_param_dtype == (trainer["strategy"].get("init_args") or {}).get("param_dtype")
    assert (settings.batch_size, settings.group_size, settings.micro_batch_size, settings.max_new_tokens) == (
        data["batch_size"], module["group_size"], module["micro_batch_size"], module["max_new_tokens"])
    policy = module["policy"]["init_args"]
    assert (settings.policy_dtype, settings.lora_rank, settings.gradient_checkpointing) == (
        policy["dtype"], None, policy["gradient_checkpointing"])
    assert assumed["audio_seconds"] == min(data["max_duration"], 30.0)
    assert settings.prompt_tokens == audio_tokens(assumed["audio_seconds"]) + text_tokens(module["mode"], 4)
    # Under FSDP2 the full-fine-tuning reference is sharded like the policy in the compute dtype, and the
    # rollout gathers every unit once (hybrid engine).
    assert settings.reference_sharded and settings.rollout_gathered
    expected = plan(g7b, settings)
    assert f"peak per GPU: {expected.peak_gib:.2f} GiB" in out
    assert "FSDP2 over 8 GPUs" in out
    assert "sharded 1/8" in out and "every FSDP2 unit gathered (hybrid engine)" in out
    assert " fits (" in out  # with the 15% margin on 8 x 80 GiB


def test_cli_on_the_shipped_lora_recipe_and_overrides(capsys):
    assert main([*RECIPE, *LORA]) == 0
    lora_out = capsys.readouterr().out
    assert "LoRA r=64 on 7 LM projections" in lora_out and "LoRA: the same weights with the adapters off" in lora_out
    # A what-if through dotted overrides, as with emorl fit: 2 GPUs, no checkpointing, 80 GB -> suggestions.
    assert main([*RECIPE, *FULL, "--gpus", "2", "--model.init_args.policy.init_args.gradient_checkpointing", "false"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "change" in out and "GiB  fits" in out


def test_cli_errors_name_the_key_and_file(tmp_path, capsys):
    assert main(["-c", str(ROOT / "configs/trainer/fsdp2_8gpu.yaml"), *FULL]) == 2  # model_dir is not on disk here
    err = capsys.readouterr().err
    assert "model.init_args.policy.init_args.model_dir" in err and "emorl_qwen2_audio_7b.yaml" in err
    assert "--model-config" in err
    no_policy = tmp_path / "model.yaml"
    no_policy.write_text("class_path: emorl_pl.modules.grpo_module.GRPOModule\ninit_args: {group_size: 4}\n")
    assert main(["-c", str(ROOT / "configs/trainer/fsdp2_8gpu.yaml"), "--model", str(no_policy),
                 "--model-config", str(CONFIG_JSON)]) == 2
    assert "model.init_args.policy is not set" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama"}')
    with pytest.raises(PlanConfigError, match="model_type 'llama'"):
        geometry_from_config(bad)


def test_cli_defaults_are_the_constructors(monkeypatch):
    """emorl-plan fills in what a config leaves out from the constructors themselves: a changed default in
    GRPOModule changes the plan (issue 20: no copy to drift)."""
    from emorl_pl.datamodules.webdataset import ShardDataModule
    from emorl_pl.modules.grpo_module import GRPOModule
    from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
    from emorl_pl.plan_cli import constructor_defaults

    defaults = constructor_defaults()
    for cls, key in ((GRPOModule, "module"), (AudioLMPolicy, "policy"), (ShardDataModule, "data")):
        params = inspect.signature(cls.__init__).parameters
        assert defaults[key] == {k: params[k].default for k in defaults[key]}, cls.__name__
    assert defaults["lora"] == {f.name: f.default for f in dataclasses.fields(LoraSettings) if f.name in defaults["lora"]}
    model = {"model": {"class_path": "emorl_pl.modules.grpo_module.GRPOModule",
                       "init_args": {"policy": {"init_args": {"model_dir": "x"}}}}}
    before, _ = settings_from_config(model, {})
    assert before.group_size == defaults["module"]["group_size"]
    init = GRPOModule.__init__
    names = init.__code__.co_varnames[:init.__code__.co_argcount]
    changed = list(init.__defaults__)
    changed[names.index("group_size") - (len(names) - len(changed))] = 2 * before.group_size
    monkeypatch.setattr(init, "__defaults__", tuple(changed))
    after, _ = settings_from_config(model, {})
    assert after.group_size == 2 * before.group_size and after.rows == 2 * before.rows


def test_console_script_runs():
    script = Path(sys.executable).parent / "emorl-plan"
    assert script.is_file(), "pip install -e . (pyproject [project.scripts] emorl-plan)"
    done = subprocess.run([str(script), *RECIPE, *LORA], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "peak per GPU" in done.stdout


# ------------------------------------------------------------------------------- measured on CPU
def _cpu_shapes(real_model_dir: str, wide_dir: str) -> list[dict]:
    """Three runs that vary the width and depth, B x G, LoRA vs full fine-tuning, the micro-batch and
    checkpointing. Waveforms of 4 s: 100 audio tokens + the esr prompt (the encoder still sees 30 s)."""
    return [
        dict(name="LoRA r4, B2 x G4, m8", model_dir=real_model_dir, seconds=4, B=2, G=4, T=16, m=8, lora_r=4),
        dict(name="full FT, B1 x G4, m2", model_dir=wide_dir, seconds=4, B=1, G=4, T=12, m=2, lora_r=0),
        dict(name="LoRA r8 drop, ckpt, B1 x G6, m3", model_dir=wide_dir, seconds=4, B=1, G=6, T=16, m=3, lora_r=8,
             lora_dropout=0.05, ckpt=True),
    ]


def _cpu_settings(shape: dict, geometry: ModelGeometry) -> PlanSettings:
    return PlanSettings(
        batch_size=shape["B"], group_size=shape["G"], max_new_tokens=shape["T"], micro_batch_size=shape["m"],
        prompt_tokens=audio_tokens(shape["seconds"], geometry.window_seconds) + text_tokens("esr", 4),
        lora_rank=shape["lora_r"] or None, lora_dropout=shape.get("lora_dropout", 0.0),
        gradient_checkpointing=shape.get("ckpt", False), beta=0.04, precision="32-true", device="cpu")


@pytest.mark.slow
def test_plan_matches_measured_cpu_peak_within_10_percent(real_model_dir, tmp_path):
    """One child process measures every shape (its imports and a warm-up step are paid once): baseline =
    its resident memory after imports, the processor and the batches are in place (host-side things the
    GPU plan leaves out); measured = the high-water mark (VmHWM, reset after loading) of loading the
    policy and one GRPO step (rollout, reference pass, policy forward/backward, AdamW step), minus the
    baseline. Large allocations are mmapped (glibc MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the
    resident set, as in a GPU allocator's live bytes. The plan: its CPU variant (no CUDA allowance,
    AdamW's per-tensor loop) of the same settings, everything held plus the largest stage."""
    from emorl_pl.modules.tiny import build_real_shape_qwen2_audio

    wide = str(build_real_shape_qwen2_audio(tmp_path / "wide", hidden_size=128, num_layers=4))
    shapes = _cpu_shapes(real_model_dir, wide)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    done = subprocess.run([sys.executable, __file__, json.dumps(shapes)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(shapes)
    table, ratios = [], []
    for shape, row in zip(shapes, rows):
        geometry = geometry_from_config(Path(shape["model_dir"]) / "config.json")
        settings = _cpu_settings(shape, geometry)
        # The plan's prompt length is the real processor's and tokenizer's; completions ran to T.
        assert row["prompt_tokens"] == settings.prompt_tokens
        assert row["completion_tokens"] == settings.max_new_tokens
        planned = plan(geometry, settings)
        ratios.append(planned.peak_bytes / (row["peak_mib"] * 2**20))
        table.append(f"{shape['name']:<34} d={geometry.hidden_size:<4} L={geometry.num_layers} "
                     f"measured {row['peak_mib']:7.1f} MiB  plan {planned.peak_bytes / 2**20:7.1f} MiB "
                     f"({planned.peak_stage.name})  plan/measured {ratios[-1]:.3f}  [{row['seconds']} s]")
    print("\n" + "\n".join(table))
    for line, ratio in zip(table, ratios):
        assert 0.9 <= ratio <= 1.1, line


# ------------------------------------------------------------------------------- the measuring child
def _measure_child(shapes: list[dict]) -> None:
    """Print one JSON line per shape: the peak resident memory of loading the policy and one GRPO step,
    above the baseline (see the test's docstring)."""
    import ctypes
    import gc
    import re

    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor

    from emorl_pl.modules.grpo_module import GRPOModule
    from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
    from emorl_pl.rewards import REWARDS, register_reward

    if "plan_text_hash" not in REWARDS:

        @register_reward("plan_text_hash")
        class TextHash:  # rewards vary with the text, so advantages (and gradients) are non-zero
            def __init__(self, labels, mode="esr"):
                pass

            def __call__(self, completions, labels, **columns):
                return [(sum(map(ord, c)) % 5) / 4 for c in completions]

    libc = ctypes.CDLL("libc.so.6")

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def reset_peak() -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    # Every real-shape model has the same processor files: load it once, outside the measurement.
    processor = AutoProcessor.from_pretrained(shapes[0]["model_dir"])
    AutoProcessor.from_pretrained = classmethod(lambda cls, *a, **k: processor)

    def measure(shape: dict, steps: int = 1) -> dict:
        g = torch.Generator().manual_seed(0)
        B, n = shape["B"], int(shape["seconds"] * 16000)
        labels = ["neutral", "happy", "angry", "sad"]
        data = [{"waveforms": [0.1 * torch.randn(n, generator=g) for _ in range(B)], "sample_rate": 16000,
                 "labels": [labels[j % 4] for j in range(B)], "keys": [f"k{j}" for j in range(B)],
                 "texts": [None] * B, "corpus": ["m"] * B, "meta": [{} for _ in range(B)]} for _ in range(steps)]
        gc.collect()
        libc.malloc_trim(0)
        base = status("VmRSS")
        reset_peak()
        lora = LoraSettings(r=shape["lora_r"], alpha=2 * shape["lora_r"], dropout=shape.get("lora_dropout", 0.0))
        policy = AudioLMPolicy(shape["model_dir"], lora=lora if shape["lora_r"] else None,
                               gradient_checkpointing=shape.get("ckpt", False))
        module = GRPOModule(policy, labels="iemocap4", rewards={"plan_text_hash": 1.0}, group_size=shape["G"],
                            max_new_tokens=shape["T"], micro_batch_size=shape["m"], beta=0.04,
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5))
        policy.load()
        with torch.no_grad():  # safetensors are mmapped and paged in lazily; on a GPU every weight is resident
            for p in policy.hf_model.parameters():
                p.data = p.data.clone()
        gc.collect()
        reset_peak()  # the loading transient (file pages and their copies) is no part of a step
        seen: list[tuple[int, int]] = []
        rollout = policy.rollout

        def recording_rollout(*args, **kwargs):
            out = rollout(*args, **kwargs)
            seen.append((out.prompt.input_ids.shape[1], out.completion_ids.shape[1]))
            return out

        policy.rollout = recording_rollout
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, DataLoader(data, batch_size=None))
        peak = status("VmHWM")
        del trainer, module, policy, data
        gc.collect()
        libc.malloc_trim(0)
        return dict(name=shape["name"], peak_mib=(peak - base) / 2**20, prompt_tokens=seen[0][0],
                    completion_tokens=seen[0][1])

    torch.manual_seed(0)
    start = time.perf_counter()
    # Lazy imports and one-time initialisations (transformers, peft, Lightning) belong to no shape.
    measure(dict(shapes[0], B=1, G=2, T=2, m=2))
    for shape in shapes:
        result = measure(shape)
        print(json.dumps(dict(result, seconds=round(time.perf_counter() - start, 1))), flush=True)


if __name__ == "__main__":
    _measure_child(json.loads(sys.argv[1]))


def rollout_pieces(p) -> list[str]:
    return [x.name for x in next(s for s in p.stages if s.name == "rollout").pieces]


def test_plan_constants_are_the_code_objects(monkeypatch, g7b):
    """The logits chunk, the CPU lm_head packing thresholds and the default LoRA targets are read from the
    modules that use them, when the plan is made: changing them there changes the plan (issue 20)."""
    from emorl_pl import kernels, memory_plan
    from emorl_pl.modules import fused_decode, policy

    assert not hasattr(memory_plan, "LOGITS_CHUNK_TOKENS") and not hasattr(memory_plan, "PACK_MIN_DECODE_STEPS")
    assert memory_plan.LM_PROJECTIONS is policy.LM_PROJECTIONS
    assert PlanSettings(1, 1, 10, 10, 1).lora_targets is policy.LM_PROJECTIONS
    # One device, LoRA, no grad chunk: c = LOGITS_CHUNK_TOKENS // T rows of (T, V) logits, bf16 + fp32 copy.
    s = recipe_settings(strategy="single", num_gpus=1, lora_rank=8, max_new_tokens=16)
    name = "logits, a chunk of rows at a time (chunked lm_head)"
    assert plan(g7b, s).piece(name).bytes == min(6, kernels.LOGITS_CHUNK_TOKENS // 16) * 16 * 156032 * (2 + 4)
    monkeypatch.setattr(kernels, "LOGITS_CHUNK_TOKENS", 32)
    assert plan(g7b, s).piece(name).bytes == 2 * 16 * 156032 * (2 + 4)
    # The CPU fp32 decode prepacks lm_head when T + 1 >= _PACK_MIN_CALLS and V x D >= _PACK_MIN_ELEMENTS.
    cpu = recipe_settings(strategy="single", num_gpus=1, precision="32-true", device="cpu", max_new_tokens=20)
    packed = "prepacked lm_head (CPU)"
    assert packed in rollout_pieces(plan(g7b, cpu))
    monkeypatch.setattr(fused_decode, "_PACK_MIN_CALLS", 22)
    assert packed not in rollout_pieces(plan(g7b, cpu))
    monkeypatch.setattr(fused_decode, "_PACK_MIN_CALLS", 21)
    assert packed in rollout_pieces(plan(g7b, cpu))
    monkeypatch.setattr(fused_decode, "_PACK_MIN_ELEMENTS", 156032 * 4096 + 1)
    assert packed not in rollout_pieces(plan(g7b, cpu))


def test_hsdp_shards_within_a_node(capsys, g7b):
    """FSDP2Strategy on 2 nodes x 8 GPUs shards within a node and replicates across (strategies.mesh_shape):
    each rank holds 1/8 of the parameters, not 1/16; shard_degree 16 shards over every rank."""
    two = ROOT / "configs/trainer/fsdp2_2x8gpu.yaml"
    config, origin = merged_config([str(two)], {"model": FULL[1:], "data": [RECIPE[3]]})
    settings, _ = settings_from_config(config, origin)
    assert (settings.num_gpus, settings.num_nodes, settings.shards) == (16, 2, 8)
    one_node, _ = settings_from_config(*merged_config([str(ROOT / "configs/trainer/fsdp2_8gpu.yaml")],
                                                      {"model": FULL[1:], "data": [RECIPE[3]]}))
    assert plan(g7b, settings).piece("parameters").bytes == plan(g7b, one_node).piece("parameters").bytes
    assert plan(g7b, settings).piece("parameters").bytes == 8_397_094_912 * 4 / 8
    wide, _ = settings_from_config(*merged_config([str(two)], {"model": FULL[1:], "data": [RECIPE[3]]},
                                                  [("trainer.strategy.init_args.shard_degree", "16")]))
    assert wide.shards == 16 and plan(g7b, wide).piece("parameters").bytes == 8_397_094_912 * 4 / 16
    assert main(["-c", str(two), *FULL, "--data", RECIPE[3], "--model-config", str(CONFIG_JSON)]) == 0
    assert "FSDP2 over 16 GPUs (HSDP: 2 replicas of 8 shards)" in capsys.readouterr().out
    with pytest.raises(PlanConfigError, match="shard_degree.*fsdp2_2x8gpu.yaml"):
        settings_from_config(*merged_config([str(two)], {"model": FULL[1:], "data": [RECIPE[3]]},
                                            [("trainer.strategy.init_args.shard_degree", "5")]))
