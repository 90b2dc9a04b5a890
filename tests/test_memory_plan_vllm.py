"""emorl-plan with ``rollout_engine: vllm``: the colocated engine's pieces against hand computations (its weight
copy, its reservation of gpu_memory_utilization x GPU, the LoRA weight sync), sleep mode moving the engine
out of the update stages, its settings read from ``emorl_pl.modules.vllm_engine`` (not copied), the shipped
7B recipes on 8 x 80 GiB with the engine, the advice when it does not fit, and the fused output unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emorl_pl.memory_plan import (
    PlanSettings,
    engine_activation_bytes,
    engine_kv_tokens,
    engine_min_utilization,
    engine_reserved_bytes,
    engine_weight_bytes,
    lora_target_weight_params,
    plan,
    rollout_engines,
    suggestions,
    verdict,
    vllm_engine_defaults,
)
from emorl_pl.plan_cli import PlanConfigError, geometry_from_config, main, merged_config, settings_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_JSON = ROOT / "configs/model/qwen2_audio_7b_config.json"
TRAINER = str(ROOT / "configs/trainer/fsdp2_8gpu.yaml")
DATA = str(ROOT / "configs/data/iemocap.yaml")
RECIPE = ["-c", TRAINER, "--data", DATA, "--model-config", str(CONFIG_JSON)]
FULL = str(ROOT / "configs/model/emorl_qwen2_audio_7b.yaml")
LORA = str(ROOT / "configs/model/emorl_qwen2_audio_7b_lora.yaml")
ENGINE = ["--model.init_args.policy.init_args.rollout_engine", "vllm"]
SLEEP = ["--model.init_args.policy.init_args.vllm", "{enable_sleep_mode: true}"]
GiB = 2**30
N_PARAMS = 8_397_094_912  # Qwen2-Audio-7B, counted like torch in tests/test_memory_plan.py
KV_PER_TOKEN = 32 * 2 * 4096 * 2  # L x (K, V) x kv_heads x head_dim x bf16


@pytest.fixture(scope="module")
def g7b():
    return geometry_from_config(CONFIG_JSON)


def recipe(**changes) -> PlanSettings:
    """The shipped 8-GPU full fine-tuning recipe per rank (as tests/test_memory_plan.py), as emorl-plan reads it."""
    base = PlanSettings(batch_size=1, group_size=6, prompt_tokens=750 + 178, max_new_tokens=512, micro_batch_size=6,
                        precision="32-true", fsdp_param_dtype="bfloat16", strategy="fsdp2", num_gpus=8,
                        gradient_checkpointing=True, reference_sharded=True, rollout_gathered=True, eval_batch_size=8,
                        fsdp_sync="per_step")
    return dataclasses.replace(base, **changes)


def engine(**changes) -> PlanSettings:
    return recipe(**{"rollout_engine": "vllm", "gpu_memory_gib": 80.0, **changes})


def stage(p, prefix: str):
    return next(s for s in p.stages if s.name.startswith(prefix))


# ------------------------------------------------------------------------------------------- pieces
def test_engine_pieces_by_hand(g7b):
    assert g7b.torch_dtype == "bfloat16"  # config.json: what dtype "auto" follows
    s = engine()
    w = N_PARAMS * 2  # the whole model in bf16 on every rank: 16,794,189,824 B
    # Activation estimate: 8192 tokens x (4 x 4096 + 2 x 4096 + 3 x 11008) x 2 B + 256 rows x 156032 x 4 B.
    a = 8192 * 57_600 * 2 + 256 * 156_032 * 4
    r = 0.3 * 80 * GiB  # gpu_memory_utilization 0.3 (VLLMSettings' default) x 80 GiB > W + A
    assert (engine_weight_bytes(g7b, s), engine_activation_bytes(g7b, s)) == (w, a) == (16_794_189_824, 1_103_495_168)
    assert engine_reserved_bytes(g7b, s) == r == 25_769_803_776
    assert engine_kv_tokens(g7b, s) == (25_769_803_776 - 16_794_189_824 - 1_103_495_168) // KV_PER_TOKEN == 15_014
    p, fused = plan(g7b, s), plan(g7b, recipe())
    # Held throughout without sleep mode: W, and the rest of the reservation (KV cache pool + activations).
    always = {x.name: x.bytes for x in p.always}
    assert always["vLLM engine: its copy of the weights"] == w
    assert always["vLLM engine: KV cache pool + activations"] == r - w
    # ... on top of what the fused run holds, + the engine's sampling log-probs (6 rows x 512 tokens x fp32).
    assert p.always_bytes == fused.always_bytes + r + 6 * 512 * 4
    # The trainer's own decode pieces are not used: no rollout KV cache, no gathered units, no sampling logits.
    names = {x.name for st in p.stages for x in st.pieces}
    assert not names & {"KV cache of the rollout", "shared prefill cache", "sampling temporaries", "KV cache",
                        "every FSDP2 unit gathered (hybrid engine)"}
    # Full fine-tuning under FSDP2 (fp32 shards, param_dtype bf16): the sync gathers one weight at a time in
    # bf16, cast locally first; the largest is the 156032 x 4096 embedding: V x D x 2 B x (1 + 1/8).
    sync = 156_032 * 4096 * 2 * (1 + 1 / 8)
    assert stage(p, "rollout").bytes == sync

    # A fraction too small for W + A still costs W + A (and vLLM would refuse to start: said in a note).
    small = engine(gpu_memory_gib=48.0)
    assert engine_reserved_bytes(g7b, small) == w + a and engine_kv_tokens(g7b, small) == 0
    # Smallest fraction vLLM starts with: W + A + one 4096-token sequence's KV cache, over the GPU.
    assert engine_min_utilization(g7b, s) == (w + a + 4096 * KV_PER_TOKEN) / (80 * GiB)
    assert any("refuses to start" in n and f"{engine_min_utilization(g7b, small):.2f}" in n
               for n in plan(g7b, small).notes)
    assert not any("refuses to start" in n for n in p.notes)
    # An explicit dtype: float32 weights, 4 B each.
    assert engine_weight_bytes(g7b, engine(vllm_dtype="float32")) == N_PARAMS * 4
    assert engine_reserved_bytes(g7b, engine(vllm_gpu_memory_utilization=0.5)) == 0.5 * 80 * GiB


def test_lora_weight_sync_by_hand(g7b):
    # weight_sync.iter_merged_weights moves one weight at a time to the CPU. Unsharded fp32: the largest adapted
    # projection's delta B A (4096 x 11008 fp32), summed in place with the base (the parameter itself), cast
    # to fp32 = no copy.
    n = 4096 * 11008
    assert lora_target_weight_params(g7b) == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    name = "engine weight sync: one weight at a time"
    one = plan(g7b, engine(lora_rank=64, strategy="single", num_gpus=1, rollout_gathered=False))
    sync = one.piece(name)
    assert sync.bytes == n * 4
    assert sync in stage(one, "validation").pieces  # a validation after a step syncs the new weights too
    # bf16 weights: the fp32 delta + its bf16 cast.
    bf16 = plan(g7b, engine(lora_rank=64, strategy="single", num_gpus=1, rollout_gathered=False,
                            policy_dtype="bfloat16"))
    assert bf16.piece(name).bytes == n * (4 + 2)
    # FSDP2 (fp32 shards, param_dtype bf16): per adapted weight the gathered fp32 base + fp32 delta + bf16 cast
    # = 10 n; but every weight is gathered in bf16 (cast locally first: + its 1/8 shard), and the largest, the
    # 156032 x 4096 embedding, is the larger: V x D x 2 x (1 + 1/8).
    sharded = plan(g7b, engine(lora_rank=64, lora_dropout=0.05))
    assert stage(sharded, "rollout").pieces[-1].name == name
    assert stage(sharded, "rollout").pieces[-1].bytes == 156032 * 4096 * 2 * (1 + 1 / 8)
    assert 156032 * 4096 * 2 * (1 + 1 / 8) > 10 * n
    # Full fine-tuning on one device: the state dict is the parameters themselves: nothing on the device.
    full = plan(g7b, engine(strategy="single", num_gpus=1, rollout_gathered=False, reference_sharded=False))
    assert not any(x.name == name for st in full.stages for x in st.pieces)


def test_sleep_mode_moves_the_engine_to_the_sampling_stages(g7b):
    awake, asleep = plan(g7b, engine()), plan(g7b, engine(vllm_sleep=True))
    r = engine_reserved_bytes(g7b, engine())
    # Asleep (level 1) the engine keeps nothing on the GPU besides the trainer's CUDA context.
    assert asleep.piece("vLLM engine, asleep (sleep mode)").bytes == 0
    assert asleep.always_bytes == awake.always_bytes - r
    sync = asleep.piece("engine weight sync: one weight at a time").bytes  # see test_engine_pieces_by_hand
    assert stage(asleep, "rollout").bytes == r + sync
    assert sum(x.bytes for x in stage(asleep, "validation").pieces if x.name.startswith("vLLM engine:")) == r
    for name in ("reference log-probs", "policy forward+backward", "optimizer step"):
        assert stage(asleep, name).bytes == stage(awake, name).bytes  # the update stages: without the engine
    # The peak moves from the backward (engine held throughout) to validation (engine awake to sample), lower.
    assert awake.peak_stage.name == "policy forward+backward: decoder layers"
    assert awake.peak_bytes == awake.always_bytes + stage(awake, "policy forward+backward: decoder layers").bytes
    assert asleep.peak_stage.name == "validation (greedy, vLLM engine)"
    encoder = asleep.piece("audio encoder activations (no grad)").bytes
    assert asleep.peak_bytes == asleep.always_bytes + r + encoder + sync
    assert asleep.peak_bytes < awake.peak_bytes
    # Without validation the rollout is the engine's one stage.
    no_eval = plan(g7b, engine(vllm_sleep=True, eval_batch_size=0))
    assert no_eval.peak_stage.name == "rollout (vLLM engine)" and no_eval.peak_bytes == no_eval.always_bytes + r + sync


# ------------------------------------------------------------------------------------------- settings
def test_engine_settings_are_the_code_defaults():
    from emorl_pl.modules.vllm_engine import ROLLOUT_ENGINES, VLLMSettings

    defaults = {f.name: f.default for f in dataclasses.fields(VLLMSettings)}
    assert vllm_engine_defaults() == defaults
    assert rollout_engines() == ROLLOUT_ENGINES
    assert engine().engine_settings == {**defaults}
    assert engine(vllm_sleep=True).engine_settings == {**defaults, "enable_sleep_mode": True}


def test_a_changed_default_in_the_engine_code_changes_the_plan(monkeypatch, capsys, g7b):
    """If the plan copied VLLMSettings' defaults, this would fail: change them in the engine's module and the
    plan, the CLI and its printout follow."""
    from emorl_pl.modules import vllm_engine

    u, sleep = vllm_engine_defaults()["gpu_memory_utilization"], vllm_engine_defaults()["enable_sleep_mode"]
    fields = [(f.name, f.type, dataclasses.field(default={"gpu_memory_utilization": u + 0.15,
                                                           "enable_sleep_mode": not sleep}.get(f.name, f.default)))
              for f in dataclasses.fields(vllm_engine.VLLMSettings)]
    monkeypatch.setattr(vllm_engine, "VLLMSettings", dataclasses.make_dataclass("VLLMSettings", fields))
    config, origin = merged_config([TRAINER], {"model": [FULL], "data": [DATA]},
                                   [("model.init_args.policy.init_args.rollout_engine", "vllm")])
    settings, _ = settings_from_config(config, origin, gpu_memory_gib=80.0)
    assert settings.engine_settings["gpu_memory_utilization"] == pytest.approx(u + 0.15)
    assert settings.engine_sleeps is (not sleep)
    assert engine_reserved_bytes(g7b, settings) == pytest.approx((u + 0.15) * 80 * GiB)
    assert engine(vllm_gpu_memory_utilization=None).engine_settings["gpu_memory_utilization"] == pytest.approx(u + 0.15)
    assert main([*RECIPE, "--model", FULL, *ENGINE]) == 0
    out = capsys.readouterr().out
    assert f"gpu_memory_utilization {u + 0.15:g} x 80 GiB" in out
    assert f"sleep mode {'off' if sleep else 'on'})" in out


def test_cli_reads_the_engine_settings_and_names_bad_ones(capsys):
    config, origin = merged_config([TRAINER], {"model": [LORA], "data": [DATA]},
                                   [("model.init_args.policy.init_args.rollout_engine", "vllm"),
                                    ("model.init_args.policy.init_args.vllm",
                                     "{gpu_memory_utilization: 0.4, enable_sleep_mode: true, dtype: float16}")])
    settings, _ = settings_from_config(config, origin, gpu_memory_gib=80.0)
    assert (settings.rollout_engine, settings.vllm_gpu_memory_utilization, settings.vllm_sleep, settings.vllm_dtype) \
        == ("vllm", 0.4, True, "float16")
    assert not settings.rollout_gathered  # the trainer does not gather the model to sample
    bad = [("{gpu_memory_utilization: 1.5}", "gpu_memory_utilization"), ("{sleep: true}", "unknown VLLMSettings"),
           ("{dtype: int8}", ".dtype")]
    for value, message in bad:
        assert main([*RECIPE, "--model", LORA, *ENGINE, "--model.init_args.policy.init_args.vllm", value]) == 2
        err = capsys.readouterr().err
        assert message in err and "emorl_qwen2_audio_7b_lora.yaml" in err, err
    assert main([*RECIPE, "--model", LORA, "--model.init_args.policy.init_args.rollout_engine", "sglang"]) == 2
    assert "rollout_engine must be one of fused, vllm" in capsys.readouterr().err
    with pytest.raises(PlanConfigError, match="gpu_memory_utilization"):
        settings_from_config(*merged_config([TRAINER], {"model": [LORA]}, [
            ("model.init_args.policy.init_args.rollout_engine", "vllm"),
            ("model.init_args.policy.init_args.vllm.gpu_memory_utilization", "0")]))
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        PlanSettings(batch_size=1, group_size=2, prompt_tokens=10, max_new_tokens=4, micro_batch_size=2,
                     rollout_engine="vllm")


# ------------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("model", [FULL, LORA], ids=["full", "lora"])
def test_cli_7b_recipes_with_the_engine_on_8_x_80(capsys, g7b, model):
    """Colocate at 7B on 8 x 80 GiB: both shipped recipes fit with the engine, with and without sleep mode;
    sleep mode lowers the peak but does not change the verdict."""
    peaks = {}
    for sleep in (False, True):
        assert main([*RECIPE, "--model", model, *ENGINE, *(SLEEP if sleep else [])]) == 0
        out = capsys.readouterr().out
        config, origin = merged_config([TRAINER], {"model": [model], "data": [DATA]},
                                       [("model.init_args.policy.init_args.rollout_engine", "vllm"),
                                        *([("model.init_args.policy.init_args.vllm", SLEEP[1])] if sleep else [])])
        settings, _ = settings_from_config(config, origin, gpu_memory_gib=80.0)
        p = plan(g7b, settings)
        peaks[sleep] = p.peak_gib
        assert verdict(p.peak_gib, 80) == "fits" and " fits (" in out
        assert f"peak per GPU: {p.peak_gib:.2f} GiB" in out
        assert "vLLM engine: 24.00 GiB per GPU = max(gpu_memory_utilization 0.3 x 80 GiB, W + A)" in out
        assert "sleep mode does not change the verdict (fits either way)" in out
        assert "one process only" in out and "what-if of TRL's colocate mode" in out
        assert ("held throughout (no sleep mode)" in out) != sleep
        assert "to get 15% under" not in out  # nothing to suggest
    assert peaks[True] < peaks[False]


def test_advice_when_the_engine_does_not_fit(capsys, g7b):
    # The full recipe with the engine at 40 GiB: tight without sleep mode; sleep mode alone makes it fit.
    tight = engine(gpu_memory_gib=40.0)
    assert verdict(plan(g7b, tight).peak_gib, 40) == "tight"
    by_change = {x.change.split(" (")[0]: x for x in suggestions(g7b, tight, 40)}
    assert by_change["vLLM sleep mode: the engine off the GPU outside the rollout"].verdict == "fits"
    assert main([*RECIPE, "--model", FULL, *ENGINE, "--gpu-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "sleep mode changes the verdict: fits with it, tight (under 15% headroom) without it" in out
    assert "policy.init_args.vllm: {enable_sleep_mode: true}" in out
    # A large reservation: lowering gpu_memory_utilization (to the first 0.05 step that fits) is advised too.
    big = engine(vllm_gpu_memory_utilization=0.6)
    assert verdict(plan(g7b, big).peak_gib, 80) != "fits"
    lower = [x for x in suggestions(g7b, big, 80) if x.change.startswith("vLLM gpu_memory_utilization")]
    assert len(lower) == 1 and lower[0].verdict == "fits"
    assert lower[0].settings.vllm_gpu_memory_utilization == 0.55


# ------------------------------------------------------------------------------------------- fused: unchanged
def test_fused_runs_are_unchanged(capsys, g7b):
    for model in (FULL, LORA):
        assert main([*RECIPE, "--model", model]) == 0
        default = capsys.readouterr().out
        assert main([*RECIPE, "--model", model, "--model.init_args.policy.init_args.rollout_engine", "fused",
                     *SLEEP]) == 0  # engine settings without the engine: ignored
        assert capsys.readouterr().out == default
        assert "vLLM" not in default and "engine weight sync" not in default
    p = plan(g7b, recipe())
    assert [s.name for s in p.stages] == [
        "prompt encoding (audio tower)", "rollout", "reference log-probs (no grad)",
        "policy forward+backward: logits", "policy forward+backward: decoder layers", "optimizer step",
        "validation (greedy)"]
    assert p.piece("every FSDP2 unit gathered (hybrid engine)").bytes == N_PARAMS * 2


def test_sync_host_ram_note_counts_a_fused_expert_weight_and_its_split(g7b):
    """The writing rank holds one shard being filled (write_hub_shards' max_shard_bytes) plus the weight being
    added; a MoE's fused gate-up of all experts is held together with its per-expert split (HubConverter)."""
    import inspect
    import re

    from emorl_pl.modules.weight_sync import write_hub_shards

    shard = 1 << 30
    assert inspect.signature(write_hub_shards).parameters["max_shard_bytes"].default == shard

    def sync_gib(g) -> float:
        note = next(n for n in plan(g, engine()).notes if n.startswith("host RAM for the engine"))
        return float(re.search(r"about ([\d.]+) GiB on the writing rank", note).group(1))

    dense = (shard + 156_032 * 4096 * 2) / GiB  # Qwen2-Audio: the embedding (V x D) is the largest, bf16
    assert sync_gib(g7b) == pytest.approx(dense, abs=0.05)
    moe = geometry_from_config(ROOT / "configs/model/qwen3_omni_30b_a3b_config.json")
    fused = 128 * 2 * 768 * 2048  # experts x (gate, up) x moe_intermediate x hidden: 402,653,184 > 152,064 x 2048
    assert sync_gib(moe) == pytest.approx((shard + 2 * fused * 2) / GiB, abs=0.05)
