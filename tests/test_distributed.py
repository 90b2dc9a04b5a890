"""Multi-process training driven like a user would: ``emorl fit -c tests/configs/tiny_grpo.yaml ...``.

2 CPU processes (gloo), FSDP2 (``emorl_pl.strategies.FSDP2Strategy``, sharded ``.distcp`` checkpoint
folders) and DDP (single-file checkpoints). Exact resume: an uninterrupted 6-step run, a 3-step run, and a
run resumed from the 3-step run's checkpoint to 6 steps, all with ``configs/resume.yaml`` (dropout, a cold
start that ends after the resume point, RL that moves the weights). The resumed run must log the same
values at steps 4-6 and end with bitwise the same trainable weights, optimizer state and LR on every
rank (each rank's own copy, or shard under FSDP2, written by ``resume_helpers.SaveRankState``), and the
same last checkpoint (FSDP2: consolidated from its shards).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
EMORL = str(Path(sys.executable).with_name("emorl"))
CACHE = Path(os.environ.get("EMORL_TEST_CACHE", Path(tempfile.gettempdir()) / "emorl_pl_test_cache"))
# Metrics that depend on the sampled completions, the weights and the optimizer/scheduler state.
COMPARED = ("loss", "kl", "grad_norm", "reward", "lr", "completions/mean_length", "ratio/mean")
RESUME_CONFIG = "resume.yaml"


def tiny_model_dir() -> Path:
    from emorl_pl.modules.tiny import ensure_tiny_model

    return ensure_tiny_model(CACHE / "tiny")


def emorl_env() -> dict[str, str]:
    """The environment of an ``emorl`` run: tests/ on PYTHONPATH, for ``resume_helpers`` (the strategies'
    launchers start the other ranks with the same environment)."""
    paths = [str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_emorl(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([EMORL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=emorl_env())
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


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """Lightning step index (0-based) -> every value logged at that step (supervised and RL)."""
    out: dict[int, dict[str, float]] = {}
    for row in csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")):
        values = {k: float(v) for k, v in row.items() if v and k not in ("step", "epoch")}
        out.setdefault(int(row["step"]), {}).update(values)
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality through dicts, lists and tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(full: dict[str, Any], resumed: dict[str, Any]) -> None:
    """Two checkpoints hold the same trainable weights, optimizer, schedulers, cold start and progress."""
    assert resumed["global_step"] == full["global_step"]
    for key in ("state_dict", "lr_schedulers", "emorl_folded_adapters", "emorl_accumulated_batches"):
        assert_same(full.get(key), resumed.get(key), key)
    optim = "optimizer_states" if "optimizer_states" in full else "optimizer_0"
    assert_same(full[optim], resumed[optim], optim)


def rank_states(run_dir: Path, world_size: int) -> list[dict[str, Any]]:
    files = [run_dir / "rank_state" / f"rank{r}.pt" for r in range(world_size)]
    assert all(f.is_file() for f in files), sorted(p.name for p in (run_dir / "rank_state").glob("*"))
    return [torch.load(f, weights_only=False) for f in files]


def assert_same_final_state_on_every_rank(full_dir: Path, resumed_dir: Path, world_size: int) -> None:
    full, resumed = rank_states(full_dir, world_size), rank_states(resumed_dir, world_size)
    for rank, (a, b) in enumerate(zip(full, resumed)):
        assert a["global_step"] == b["global_step"] == 6
        assert a["params"], "no trainable parameter was saved"
        assert_same(a["params"], b["params"], f"rank {rank} weights")
        assert_same(a["optimizer"], b["optimizer"], f"rank {rank} optimizer")
        assert_same(a["lr"], b["lr"], f"rank {rank} lr")


def run_resume_experiment(tmp: Path, extra_configs: list[str], overrides: list[str] = ()) -> dict:
    """``overrides``: configs applied after ``resume.yaml`` (e.g. full fine-tuning instead of its LoRA)."""
    configs = [*extra_configs, RESUME_CONFIG, *overrides]
    full, first, resumed = tmp / "full", tmp / "first", tmp / "resumed"
    for d in (full, first, resumed):
        d.mkdir()
    run_emorl(fit_args(full, 6, configs), full)
    run_emorl(fit_args(first, 3, configs), first)
    ckpt = first / "csv" / "version_0" / "checkpoints" / "step3.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt.parent.iterdir())
    run_emorl(fit_args(resumed, 6, configs, ckpt=str(ckpt)), resumed)
    return {"full": logged(full), "first": logged(first), "resumed": logged(resumed), "ckpt": ckpt,
            "full_dir": full, "resumed_dir": resumed}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A ``.ckpt`` file, or a sharded folder consolidated in memory (every rank's shards)."""
    from emorl_pl.checkpointing import load_checkpoint_file_or_folder

    return load_checkpoint_file_or_folder(path)


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    return load_checkpoint(run_dir / "csv" / "version_0" / "checkpoints" / "last.ckpt")


def assert_same_steps(result: dict) -> None:
    full, resumed = result["full"], result["resumed"]
    # Steps 1-4 are supervised (cold start), 5-6 GRPO.
    assert sorted(full) == [0, 1, 2, 3, 4, 5]
    assert sorted(resumed) == [3, 4, 5], "the resumed run must start at step 4 (index 3)"
    assert result["first"][2] == full[2]
    for step in (3, 4, 5):
        assert resumed[step] == full[step], f"step {step + 1}"
    # A non-trivial comparison: RL moves the weights (KL to the reference > 0, a gradient).
    assert full[5]["kl"] > 0 and full[4]["grad_norm"] > 0 and full[5]["grad_norm"] > 0


def assert_exact_resume(result: dict, world_size: int) -> None:
    assert_same_steps(result)
    assert_same_final_state_on_every_rank(result["full_dir"], result["resumed_dir"], world_size)
    full, resumed = last_checkpoint(result["full_dir"]), last_checkpoint(result["resumed_dir"])
    assert_same_training_state(full, resumed)
    # The steps after the resume point changed every trainable tensor (so all of them were compared).
    start = load_checkpoint(result["ckpt"])
    assert all(not torch.equal(v, start["state_dict"][k]) for k, v in full["state_dict"].items())


@pytest.fixture(scope="module")
def fsdp2_result(tmp_path_factory) -> dict:
    return run_resume_experiment(tmp_path_factory.mktemp("fsdp2"), ["fsdp2.yaml"])


@pytest.mark.slow
def test_fsdp2_resume_equals_uninterrupted_run_on_every_rank(fsdp2_result):
    assert_exact_resume(fsdp2_result, world_size=2)


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
    # AdamW state for every LoRA tensor; step 3 is the third supervised step (sft_steps 4 in resume.yaml).
    state = full["optimizer_0"]["state"]
    assert len(state) == len(keys)
    assert all(float(s["step"]) == 3 for s in state.values())
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
def test_ddp_resume_equals_uninterrupted_run_on_every_rank(tmp_path):
    result = run_resume_experiment(tmp_path, ["ddp.yaml"])
    assert_exact_resume(result, world_size=2)
    ckpt = torch.load(result["ckpt"], weights_only=False)
    assert all(".lora_" in k for k in ckpt["state_dict"]) and ckpt["global_step"] == 3
    # DDP keeps one copy of the weights per rank: they agree.
    rank0, rank1 = rank_states(result["full_dir"], 2)
    assert_same(rank0["params"], rank1["params"], "rank 0 vs rank 1")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["fsdp2.yaml"], ["ddp.yaml"]], ids=["fsdp2-bf16", "ddp"])
def test_full_finetuning_trains_validates_and_resumes(strategy, tmp_path):
    """Full fine-tuning (FSDP2: bf16 compute with fp32 master weights and reductions, a sharded bf16
    reference), a reference that becomes the cold-start model when RL begins and is reloaded on resume,
    and validation along the way."""
    overrides = ["full.yaml", "fsdp2_full_bf16.yaml"] if strategy == ["fsdp2.yaml"] else ["full.yaml"]
    result = run_resume_experiment(tmp_path, strategy, overrides=overrides)
    assert_exact_resume(result, world_size=2)
    full = last_checkpoint(result["full_dir"])
    assert not any(".lora_" in k for k in full["state_dict"]) and len(full["state_dict"]) > 20
    assert all(v.dtype == torch.float32 for v in full["state_dict"].values()), "master weights stay fp32"
    assert (result["full_dir"] / "csv" / "version_0" / "cold_start_model" / "config.json").is_file()
    rows = list(csv.DictReader(open(result["full_dir"] / "csv" / "version_0" / "metrics.csv")))
    assert any(r.get("val/ua") not in (None, "") for r in rows), "validation ran"
