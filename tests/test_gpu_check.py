"""benchmarks/gpu_check.sh runs anywhere with ``--cpu --smoke`` (toy sizes) and prints, for one device and
for FSDP2 in one process, every field it promises; the real-shape builder takes the realistic layer sizes."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("step_s", "rollout_tokens_per_s", "peak_mem_gib", "plan_peak_gib", "plan_tensors_gib", "floor_s",
          "floor_over_step", "matmul_tflops", "memory_gbps")


@pytest.mark.slow
def test_gpu_check_script_on_cpu(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", "--smoke", "--model-root",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["strategy"] for r in results] == ["single", "fsdp2"]
    for r in results:
        assert r["device"] == "cpu" and r["shape"] == "toy" and r["tuning"] == "lora"
        # Timings and their ratios are only checked to be there and finite: floor_over_step sets measured
        # machine rates against a measured step, and on a shared CPU it came out at 3.5 (the benchmark prints it).
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in FIELDS), r
        assert r["plan_tensors_gib"] == r["plan_peak_gib"]  # on the CPU the plan adds no CUDA allowance
    for text in ("gpu_check single (bf16-mixed", "gpu_check fsdp2 (32-true, FSDP2 param_dtype bfloat16",
                 "roofline floor per phase", "plan_peak_stage:"):
        assert text in done.stdout
    print(f"gpu_check.sh --cpu --smoke: {elapsed:.1f} s")


def test_gpu_check_refuses_without_cuda_unless_cpu(monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        gpu_check = __import__("gpu_check")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="pass --cpu"):
        gpu_check.device_of(gpu_check.parse_args([]))
    args = gpu_check.parse_args(["--cpu", "--smoke"])
    assert gpu_check.device_of(args).type == "cpu"
    assert (args.shape, args.batch_size, args.group_size, args.max_new_tokens, args.warmup, args.reps) == (
        "toy", 2, 2, 8, 1, 1)
    real = gpu_check.parse_args(["--strategy", "fsdp2"])
    assert (real.shape, real.batch_size, real.group_size, real.max_new_tokens, real.seconds) == (
        "realistic", 4, 6, 64, 4.0)


def test_real_shape_builder_takes_layer_sizes(tmp_path):
    """``build_real_shape_qwen2_audio``'s size keywords reach the config, checked for the head counts."""
    from emorl_pl.modules.tiny import build_real_shape_qwen2_audio

    out = build_real_shape_qwen2_audio(tmp_path / "sized", hidden_size=32, num_layers=1, encoder_layers=1,
                                       audio_d_model=16, audio_heads=2, audio_ffn=48, num_heads=2, num_kv_heads=1,
                                       intermediate_size=80)
    config = json.loads((out / "config.json").read_text())
    audio, text = config["audio_config"], config["text_config"]
    assert (audio["d_model"], audio["encoder_attention_heads"], audio["encoder_ffn_dim"]) == (16, 2, 48)
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (32, 2, 1)
    assert (text["intermediate_size"], text["vocab_size"], audio["max_source_positions"]) == (80, 156032, 1500)
    with pytest.raises(ValueError, match="num_heads"):
        build_real_shape_qwen2_audio(tmp_path / "bad", hidden_size=30, num_heads=4)
