"""``rollout_engine: vllm`` through the policy and through ``emorl fit``: the engine decodes the trainer's
current weights (LoRA merged out of place, re-synced after every update), and a GRPO run trains on its
rollouts with the importance-sampling correction. CPU vLLM environment only (see test_vllm_rollout.py)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_setup import ENGINE

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.tiny import build_real_shape_qwen2_audio

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_real_shape_qwen2_audio(tmp_path_factory.mktemp("vllm_policy") / "model", hidden_size=128,
                                        num_heads=2, num_kv_heads=1, audio_heads=1)


def _waves() -> list[torch.Tensor]:
    rng = np.random.default_rng(1)
    return [torch.tensor(0.2 * rng.standard_normal(int(16000 * s)), dtype=torch.float32) for s in (1.0, 1.7, 2.3)]


def test_policy_on_vllm_decodes_the_current_lora_weights(model_dir):
    """Greedy answers through the engine equal the fused decode's on the same LoRA weights, after each of two
    adapter updates (each re-synced once: the sync is skipped while the weights are unchanged)."""
    lora = LoraSettings(r=4, alpha=8)
    on_vllm = AudioLMPolicy(str(model_dir), lora=lora, rollout_engine="vllm", vllm=ENGINE, dropout=False).load()
    fused = AudioLMPolicy(str(model_dir), lora=lora, dropout=False).load()
    prompts = on_vllm.build_prompts(_waves(), 16000, "Which emotion? One word.")
    for step in range(2):
        with torch.no_grad():
            torch.manual_seed(step)
            for name, p in on_vllm.named_parameters():
                if "lora_B" in name:
                    p.add_(0.5 * torch.randn_like(p))
        fused.load_state_dict(on_vllm.state_dict())
        expected = fused.greedy(prompts, max_new_tokens=16)
        assert on_vllm.greedy(prompts, max_new_tokens=16) == expected, f"update {step}"
        assert on_vllm.sync_engine_weights() is False, "no change since the last sync: nothing to send"
    assert on_vllm.greedy(prompts, max_new_tokens=16) != AudioLMPolicy(str(model_dir), lora=None).greedy(
        prompts, max_new_tokens=16), "the adapters must change the answers (else the test shows nothing)"


def _fit(model_dir: Path, run: Path, synth: Path, max_steps: int, ckpt_path: str | None = None) -> list[dict]:
    args = [
        "fit", "-c", str(REPO / "tests/configs/tiny_grpo.yaml"),
        "--model.init_args.policy.init_args.model_dir", str(model_dir),
        "--model.init_args.policy.init_args.rollout_engine", "vllm",
        "--model.init_args.policy.init_args.vllm", "{dtype: float32, max_model_len: 1024, enforce_eager: true}",
        "--model.init_args.sft_steps", "0", "--model.init_args.rewards", "{text_hash: {class_path: resume_helpers.text_hash_reward, weight: 1.0}}",
        "--data.init_args.root", str(synth), "--trainer.max_steps", str(max_steps),
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        *(["--ckpt_path", ckpt_path] if ckpt_path else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(Path(sys.executable).with_name("emorl")), *args], cwd=run, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))


def test_emorl_fit_trains_on_vllm_rollouts_and_resumes_exactly(model_dir, tmp_path):
    """``emorl fit`` with ``rollout_engine: vllm``: 2 GRPO steps on the engine's rollouts, the sampling
    log-probs' mismatch logged each step, finite losses, a checkpoint written. Then a run stopped after step 1
    and resumed with ``--ckpt_path last`` (a new engine, from the base weights, synced to the checkpoint's)
    ends with the uninterrupted run's weights, bitwise: the per-request seeds come from the restored RNG and
    seeded CPU vLLM sampling repeats."""
    synth = tmp_path / "synth"
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    rows = _fit(model_dir, full, synth, 2)
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    mismatch = [k for k in rows[0] if "logp_difference" in k or "importance_sampling_ratio" in k]
    assert mismatch, sorted(rows[0])
    values = [float(r[k]) for r in rows for k in mismatch if r.get(k)]
    assert values and all(math.isfinite(v) for v in values)
    last = full / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists()

    _fit(model_dir, split, synth, 1)
    resumed_rows = _fit(model_dir, split, synth, 2, ckpt_path="last")
    expected = torch.load(last, weights_only=False)
    got = torch.load(split / "csv" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == expected["global_step"] == 2
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name
    step2 = [float(r["loss"]) for r in resumed_rows if r.get("loss")][-1]
    assert step2 == losses[1]
