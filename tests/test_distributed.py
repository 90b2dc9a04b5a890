"""Multi-process training driven like a user would: ``emorl fit -c tests/configs/tiny_grpo.yaml ...``.

2 CPU processes (gloo). FSDP2 (``emorl_pl.strategies.FSDP2Strategy``): fit 3 steps -> sharded ``.distcp``
checkpoint folder -> a new run resumes to 6 steps; its per-step metrics (from the CSV logger) for steps
4-6 must equal those of an uninterrupted 6-step run. Same for DDP with single-file checkpoints.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
EMORL = str(Path(sys.executable).with_name("emorl"))
CACHE = Path(os.environ.get("EMORL_TEST_CACHE", Path(tempfile.gettempdir()) / "emorl_pl_test_cache"))
# Metrics that depend on the sampled completions, the weights and the optimizer/scheduler state.
COMPARED = ("loss", "kl", "grad_norm", "reward", "lr", "completions/mean_length", "ratio/mean")


def tiny_model_dir() -> Path:
    from emorl_pl.modules.tiny import ensure_tiny_model

    return ensure_tiny_model(CACHE / "tiny")


def run_emorl(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([EMORL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    check_emorl(proc)
    return proc


def check_emorl(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"emorl failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"


def fit_args(out: Path, max_steps: int, extra_configs: list[str], ckpt: str | None = None) -> list[str]:
    args = ["fit", "-c", str(CONFIGS / "tiny_grpo.yaml")]
    for name in extra_configs:
        args += ["-c", str(CONFIGS / name)]
    args += [
        "--model.init_args.policy.init_args.model_dir", str(tiny_model_dir()),
        "--data.init_args.root", str(CACHE / "synth_3spk"),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.max_steps", str(max_steps),
    ]
    return args + (["--ckpt_path", ckpt] if ckpt else [])


def step_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Lightning step index (0-based) -> the GRPO metrics logged at that step."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.get("loss"):
            out[int(row["step"])] = {k: float(row[k]) for k in COMPARED if row.get(k)}
    return out


def run_resume_experiment(tmp: Path, extra_configs: list[str]) -> dict:
    full, first, resumed = tmp / "full", tmp / "first", tmp / "resumed"
    for d in (full, first, resumed):
        d.mkdir()
    run_emorl(fit_args(full, 6, extra_configs), full)
    run_emorl(fit_args(first, 3, extra_configs), first)
    ckpt = first / "csv" / "version_0" / "checkpoints" / "step3.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt.parent.iterdir())
    run_emorl(fit_args(resumed, 6, extra_configs, ckpt=str(ckpt)), resumed)
    return {"full": step_metrics(full), "first": step_metrics(first), "resumed": step_metrics(resumed),
            "ckpt": ckpt, "resumed_dir": resumed}


def assert_same_steps(result: dict) -> None:
    full, resumed = result["full"], result["resumed"]
    # Steps 1-2 are supervised (cold start); GRPO metrics exist from step 3 (index 2) on.
    assert sorted(full) == [2, 3, 4, 5]
    assert sorted(resumed) == [3, 4, 5], "the resumed run must start at step 4 (index 3)"
    assert result["first"][2] == pytest.approx(full[2], abs=1e-6)
    for step in (3, 4, 5):
        assert set(resumed[step]) == set(full[step])
        for key, value in full[step].items():
            assert resumed[step][key] == pytest.approx(value, abs=1e-6), f"step {step + 1} {key}"
    # A non-trivial comparison: training moves the weights (KL to the reference > 0, changing losses).
    assert any(full[s]["kl"] > 0 for s in (3, 4, 5))
    assert len({round(full[s]["loss"], 9) for s in (3, 4, 5)}) > 1


@pytest.fixture(scope="module")
def fsdp2_result(tmp_path_factory) -> dict:
    return run_resume_experiment(tmp_path_factory.mktemp("fsdp2"), ["fsdp2.yaml"])


@pytest.mark.slow
def test_fsdp2_resume_equals_uninterrupted_run(fsdp2_result):
    assert_same_steps(fsdp2_result)


@pytest.mark.slow
def test_fsdp2_checkpoint_is_sharded_trainable_only_and_has_training_state(fsdp2_result):
    from emorl_pl.checkpointing import consolidate_sharded_checkpoint, is_sharded_checkpoint

    ckpt: Path = fsdp2_result["ckpt"]
    assert is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.parent.glob("*.tmp")), "no temporary checkpoint left behind"
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    base = (tiny_model_dir() / "model.safetensors").stat().st_size
    print(f"\nsharded checkpoint (trainable-only): {size / 1024:.0f} KiB in {ckpt}; base model {base / 1024:.0f} KiB")

    full = consolidate_sharded_checkpoint(ckpt, ckpt.parent / "step3-full.ckpt")
    keys = list(full["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:3]
    assert full["global_step"] == 3
    # AdamW state for every LoRA tensor. It is reset when RL begins (after the 2 cold-start steps), so
    # after step 3 it has been stepped once.
    state = full["optimizer_0"]["state"]
    assert set(state) == {k[len("policy."):] if k not in state else k for k in keys} or len(state) == len(keys)
    assert all(float(s["step"]) == 1 for s in state.values())
    sched = full["lr_schedulers"][0]
    assert sched["last_epoch"] == 3 and sched["_last_lr"][0] == pytest.approx(1e-3 * 4 / 5)  # warm-up 5 steps


@pytest.mark.slow
def test_fsdp2_checkpoint_has_data_stream_position(fsdp2_result):
    meta = torch.load(fsdp2_result["ckpt"] / "meta.pt", weights_only=False)
    # 8 training utterances (1 speaker x 4 labels x 2), batch 2 per rank, 2 ranks: 2 batches per epoch;
    # after 3 steps: epoch 1, 1 batch handed out in it.
    assert meta["epoch"] == 1
    assert meta["SynthDataModule"]["batches"] == 1
    assert meta["SynthDataModule"]["epoch"] == meta["epoch"], "the shard stream's epoch must follow the trainer's"


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted_run(tmp_path):
    result = run_resume_experiment(tmp_path, ["ddp.yaml"])
    assert_same_steps(result)
    ckpt = torch.load(result["ckpt"], weights_only=False)
    assert all(".lora_" in k for k in ckpt["state_dict"]) and ckpt["global_step"] == 3
