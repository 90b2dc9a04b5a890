"""Atomic checkpoint writes, sharded-folder consolidation, and a SIGKILLed run that resumes exactly."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from emorl_pl.checkpointing import (
    atomic_torch_save,
    commit_directory,
    consolidate_sharded_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint_file_or_folder,
    policy_state_dict,
    seeded_rng,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import (  # noqa: E402
    EMORL,
    RESUME_CONFIG,
    assert_same,
    assert_same_final_state_on_every_rank,
    assert_same_training_state,
    emorl_env,
    fit_args,
    logged,
    run_emorl,
)


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(4.0)}, path)
    # A child process starts overwriting it and kills itself halfway through pickling.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from emorl_pl.checkpointing import atomic_torch_save
        class Bomb:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_torch_save({{"step": 2, "w": torch.zeros(100_000), "bomb": Bomb()}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=False)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.endswith(".tmp") for name in leftovers), leftovers  # never a name 'last' would match


def test_commit_directory_replaces_folder_and_file(tmp_path):
    final = tmp_path / "last.ckpt"
    final.mkdir()
    (final / "old.distcp").write_text("old")
    new = tmp_path / "new.tmp"
    new.mkdir()
    (new / "__0_0.distcp").write_text("new")
    commit_directory(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["__0_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    other = tmp_path / "file.ckpt"
    other.write_text("a file")
    new2 = tmp_path / "n2.tmp"
    new2.mkdir()
    commit_directory(new2, other)
    assert other.is_dir()


def test_consolidate_sharded_folder_equals_saved_tensors(tmp_path):
    import torch.distributed.checkpoint as dcp

    sd = {"policy.model.a.lora_A.default.weight": torch.randn(3, 4), "policy.model.a.lora_B.default.weight": torch.randn(4, 3)}
    opt = {"state": {"model.a.lora_A.default.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
           "param_groups": [{"lr": 0.1, "params": ["model.a.lora_A.default.weight"]}]}
    folder = tmp_path / "step3.ckpt"
    dcp.save({"state_dict": sd, "optimizer_0": opt}, checkpoint_id=folder)  # single process: no group needed
    torch.save({"global_step": 3, "epoch": 1}, folder / "meta.pt")
    assert is_sharded_checkpoint(folder)

    full = consolidate_sharded_checkpoint(folder, tmp_path / "full.ckpt")
    reloaded = torch.load(tmp_path / "full.ckpt", weights_only=False)
    for ckpt in (full, reloaded, load_checkpoint_file_or_folder(folder)):
        assert ckpt["global_step"] == 3 and ckpt["epoch"] == 1
        for k, v in sd.items():
            assert torch.equal(ckpt["state_dict"][k], v)
        st = ckpt["optimizer_0"]["state"]["model.a.lora_A.default.weight"]
        assert torch.equal(st["exp_avg"], opt["state"]["model.a.lora_A.default.weight"]["exp_avg"])
    assert sorted(policy_state_dict(full)) == ["model.a.lora_A.default.weight", "model.a.lora_B.default.weight"]
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        consolidate_sharded_checkpoint(tmp_path, tmp_path / "x.ckpt")


def test_emorl_export_consolidate_command(tmp_path):
    import torch.distributed.checkpoint as dcp

    from emorl_pl.export import main

    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"policy.w": torch.ones(2)}}, checkpoint_id=folder)
    assert main(["--consolidate", str(folder), "--out", str(tmp_path / "full.ckpt")]) == 0
    assert torch.equal(torch.load(tmp_path / "full.ckpt")["state_dict"]["policy.w"], torch.ones(2))
    assert main(["--consolidate", str(folder), "--out", str(tmp_path / "full.ckpt")]) == 2  # no overwrite


def test_seeded_rng_draws_depend_on_the_seed_only_and_restores_the_global_states():
    import random

    import numpy as np

    def draws() -> list:
        dropout = torch.nn.functional.dropout(torch.ones(16), 0.5)
        return [torch.rand(3), dropout, torch.from_numpy(np.random.rand(2)), random.random()]

    def seed_all(s: int) -> None:
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)

    seed_all(1)
    with seeded_rng(7):
        first = draws()
    after = draws()
    seed_all(1)
    assert_same(after, draws(), "global states after the block")  # as if the block had not run
    seed_all(2)  # another history: the same draws inside
    with seeded_rng(7):
        assert_same(first, draws(), "draws under the same seed")
    with seeded_rng(8):
        assert not torch.equal(first[0], torch.rand(3))


def _checkpoint_override(path: Path, ckpt_dir: Path, *extra_callbacks: str) -> Path:
    """A config with checkpoints in ``ckpt_dir`` (shared by a killed run and its resumption, as
    ``--ckpt_path last`` needs), atomic writes, the resume tests' callbacks and ``extra_callbacks``."""
    callbacks = "".join(f"\n    - {c}" for c in extra_callbacks)
    path.write_text(textwrap.dedent(f"""
        trainer:
          plugins: [{{class_path: emorl_pl.checkpointing.AtomicCheckpointIO}}]
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1, save_top_k: -1, save_last: true,
                           filename: "step{{step}}", auto_insert_metric_name: false}}
            - class_path: resume_helpers.SaveRankState""") + callbacks + "\n")
    return path


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_from_last_exactly(tmp_path):
    """Single device: a run SIGKILLed once step 3's checkpoint is written (mid-epoch, inside the cold
    start, LoRA dropout on: see configs/resume.yaml; 2 loader workers, which had read ahead) and resumed
    with ``--ckpt_path last`` ends bitwise as the uninterrupted run: trainable weights, AdamW state, LR
    schedule, folded cold start, logged values."""
    configs = [RESUME_CONFIG]
    workers = ["--data.init_args.num_workers", "2"]
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    for d in (full, killed, resumed):
        d.mkdir()
    ckpt_dir = tmp_path / "ckpts"
    run_emorl(fit_args(full, 6, configs) + workers, full)

    kill = _checkpoint_override(tmp_path / "kill.yaml", ckpt_dir, "{class_path: resume_helpers.KillAt, init_args: {step: 3}}")
    proc = subprocess.run([EMORL, *fit_args(killed, 6, configs), *workers, "-c", str(kill)], cwd=killed,
                          capture_output=True, text=True, timeout=240, env=emorl_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    at_kill = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert at_kill["global_step"] == 3 and at_kill["SynthDataModule"]["batches"] == 3  # mid-epoch (4 batches)

    keep = _checkpoint_override(tmp_path / "keep.yaml", ckpt_dir)
    run_emorl(fit_args(resumed, 6, configs, "last") + [*workers, "-c", str(keep)], resumed)
    assert sorted(logged(resumed)) == [3, 4, 5], "the resumed run must start at step 4 (index 3)"
    for step, values in logged(resumed).items():
        assert values == logged(full)[step], f"step {step + 1}"
    expected = torch.load(full / "csv" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert_same_training_state(expected, torch.load(ckpt_dir / "last.ckpt", weights_only=False))
    assert_same_final_state_on_every_rank(full, resumed, world_size=1)


@pytest.mark.slow
def test_checkpoint_inside_an_accumulation_window_is_refused(tmp_path):
    """A checkpoint must be taken between optimizer steps: one requested after the first of 2 accumulated
    batches is refused (the window's generations and gradients are in no checkpoint), not written."""
    path = tmp_path / "mid-window.ckpt"
    override = tmp_path / "mid.yaml"
    override.write_text(textwrap.dedent(f"""
        model: {{init_args: {{accumulate_grad_batches: 2}}}}
        trainer:
          callbacks+:
            - {{class_path: resume_helpers.SaveCheckpointAt, init_args: {{batch: 0, path: {path}}}}}
    """))
    proc = subprocess.run([EMORL, *fit_args(tmp_path, 2, []), "-c", str(override)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=emorl_env())
    assert proc.returncode != 0 and "accumulation window" in proc.stderr, proc.stderr[-4000:]
    assert not path.exists()
