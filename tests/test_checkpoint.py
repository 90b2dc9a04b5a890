"""Atomic checkpoint writes, sharded-folder consolidation, and a SIGKILLed run that resumes and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
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
)

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import EMORL, check_emorl, fit_args, step_metrics  # noqa: E402


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


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_from_last_and_finishes(tmp_path):
    """Single device: SIGKILL a 6-step run once its 3rd checkpoint exists; ``--ckpt_path last`` finishes it."""
    ckpt_dir = tmp_path / "ckpts"
    override = tmp_path / "ckpt.yaml"
    override.write_text(textwrap.dedent(f"""
        trainer:
          plugins: [{{class_path: emorl_pl.checkpointing.AtomicCheckpointIO}}]
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1, save_top_k: -1, save_last: true,
                           filename: "step{{step}}", auto_insert_metric_name: false}}
    """))
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    for d in (killed, resumed):
        d.mkdir()

    def args(out, ckpt=None, dirpath=ckpt_dir):
        a = fit_args(out, 6, [], ckpt) + ["-c", str(override)]
        return a if dirpath == ckpt_dir else a + ["--trainer.callbacks.init_args.dirpath", str(dirpath)]

    proc = subprocess.Popen([EMORL, *args(killed)], cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (ckpt_dir / "step3.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (ckpt_dir / "last.ckpt").is_file()

    run = subprocess.run([EMORL, *args(resumed, "last")], cwd=resumed, capture_output=True, text=True, timeout=240)
    check_emorl(run)
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    start = torch.load(ckpt_dir / "step3.ckpt", weights_only=False)["global_step"]

    # Metric equality after resume is checked for FSDP2 and DDP in test_distributed.py; single-device
    # equality after a mid-epoch kill is NOT asserted here (see the report: it differed at step 4).
    assert max(step_metrics(resumed)) == 5 and start == 3

