"""Fault injection, run as a user runs ``emorl``: interrupts then resume, resume that must find its run,
``last.ckpt`` that must be the latest step, unwritable and full checkpoint folders, a resume whose config
changed, bad config values. Each of these lost work or ran silently wrong before (issue 21).

Tiny model, 1 thread, a few optimizer steps per run."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed import (
    EMORL,
    assert_same,
    emorl_env,
    fit_args,
    logged,
    run_emorl,
)

from emorl_pl.resume import ResumeError, find_last, next_config_name, resolve_last, version_of
from emorl_pl.run_identity import (
    ResumeConfigError,
    check_resume,
    format_changes,
    identity_changes,
)


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EMORL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**emorl_env(), "OMP_NUM_THREADS": "1"})


def _override(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _csv_versions(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "csv").iterdir())


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=False)["state_dict"]


# A checkpoint callback that writes only last.ckpt and only at the end (every 100 steps): in these runs only
# an interrupt or the end of training can write it.
SPARSE_CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 100, save_top_k: 0, save_last: true}
"""


# ------------------------------------------------------------------ resume finds the run
def test_resume_last_continues_the_run_in_its_own_folder(tmp_path):
    """``--ckpt_path last`` resumes the newest run of the config's logger folder, logs into it (no
    ``version_1``), keeps its ``config.yaml`` and saves the resumed config beside it. Before: a new
    ``version_1`` found no last.ckpt, Lightning warned and trained from step 0 with exit 0."""
    out = tmp_path / "run"
    out.mkdir()
    run_emorl(fit_args(out, 3, []), out)
    first_config = (out / "csv" / "version_0" / "config.yaml").read_text()
    proc = run_emorl(fit_args(out, 5, [], "last"), out)
    assert _csv_versions(out) == ["version_0"], proc.stderr[-3000:]
    run = out / "csv" / "version_0"
    assert (run / "config.yaml").read_text() == first_config
    assert "max_steps: 5" in (run / "config.resume-1.yaml").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    # the resumed run logged steps 4 and 5 (indices 3, 4) into the same folder; Lightning's CSV logger starts a
    # new metrics.csv there, so the first part's is kept beside it
    assert sorted(logged(out)) == [3, 4]
    before = (run / "metrics.before-resume-1.csv").read_text().splitlines()
    assert sorted({int(row.split(",")[header.index("step")]) for header in [before[0].split(",")]
                   for row in before[1:]}) == [0, 1, 2]


def test_resume_last_with_no_checkpoint_stops_and_says_where_it_looked(tmp_path):
    """No checkpoint where ``--ckpt_path last`` looked: exit 2 with the folder; never a fresh run with exit 0."""
    out = tmp_path / "run"
    out.mkdir()
    proc = _run(fit_args(out, 2, [], "last"), out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"no run in {out / 'csv'}" in proc.stderr
    assert not (out / "csv").exists(), "nothing may be trained or logged"


def test_resolve_last_rules(tmp_path):
    root = tmp_path / "logs" / "exp"
    for v in (0, 1, 2):
        (root / f"version_{v}" / "checkpoints").mkdir(parents=True)
    (root / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (root / "version_1" / "checkpoints" / "last.ckpt").mkdir()  # a sharded folder counts
    default = tmp_path / "checkpoints"
    # the newest run (version_2) has none: refused, naming the runs that have one
    with pytest.raises(ResumeError, match=r"no last.ckpt in .*version_2/checkpoints.*version_0, version_1"):
        resolve_last(root, None, None, default)
    target = resolve_last(root, 1, None, default)
    assert target == type(target)(root / "version_1" / "checkpoints" / "last.ckpt", 1)
    (root / "version_2" / "checkpoints" / "last-v1.ckpt").write_bytes(b"y")
    assert resolve_last(root, None, None, default).version == 2
    # an explicit dirpath wins over the version folder
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.ckpt").write_bytes(b"z")
    assert resolve_last(root, None, tmp_path / "ck", default) == type(target)(tmp_path / "ck" / "last.ckpt", 2)
    with pytest.raises(ResumeError, match="no last.ckpt in"):
        resolve_last(None, None, None, default)
    assert version_of(root / "version_0" / "checkpoints" / "step3.ckpt", root) == 0
    assert version_of(tmp_path / "elsewhere.ckpt", root) is None
    assert next_config_name(root / "version_0") == "config.yaml"
    (root / "version_0" / "config.yaml").write_text("a")
    (root / "version_0" / "config.resume-1.yaml").write_text("b")
    assert next_config_name(root / "version_0") == "config.resume-2.yaml"


# ------------------------------------------------------------------ last.ckpt is the latest step
def test_last_ckpt_is_the_latest_step_when_the_monitor_does_not_improve(tmp_path):
    """A monitored metric that never improves after its first value (top-k 1): Lightning refreshed
    ``last.ckpt`` only with a new top-k checkpoint, so it held step 2 at the end of a 6-step run."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = _override(tmp_path / "monitor.yaml", """
        trainer:
          val_check_interval: 2
          check_val_every_n_epoch: null
          limit_val_batches: 1
          callbacks:
            - class_path: resume_helpers.LogConstant
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {monitor: const, mode: max, save_top_k: 1, save_last: true}
        data: {init_args: {eval_batch_size: 2}}
    """)
    run_emorl(fit_args(out, 6, []) + ["-c", str(cfg)], out)
    ckpts = out / "csv" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6
    best = [p for p in ckpts.iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and torch.load(best[0], weights_only=False)["global_step"] == 2


@pytest.fixture(scope="module")
def uninterrupted_sparse_run(tmp_path_factory) -> Path:
    """The 5-step run without interruption (and no checkpoint event) that both signals' runs are compared with."""
    full = tmp_path_factory.mktemp("uninterrupted")
    run_emorl(fit_args(full, 5, []) + ["-c", str(_override(full / "sparse.yaml", SPARSE_CHECKPOINTS))], full)
    return full


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_writes_last_and_resume_equals_the_uninterrupted_run(tmp_path, signal_name, uninterrupted_sparse_run):
    """Ctrl-C / SIGTERM after step 2 of 5, with no checkpoint event in the run: the run stops at once with a
    non-zero exit, ``last.ckpt`` holds step 2, and ``--ckpt_path last`` ends with bitwise the weights and
    optimizer state of an uninterrupted run. Before: Ctrl-C left no checkpoint, and SIGTERM on one process
    ran on to the end of the epoch."""
    full, cut = uninterrupted_sparse_run, tmp_path / "cut"
    cut.mkdir()
    sparse = _override(tmp_path / "sparse.yaml", SPARSE_CHECKPOINTS)
    stop = _override(tmp_path / "stop.yaml", f"""
        trainer:
          callbacks+:
            - {{class_path: resume_helpers.SignalAt, init_args: {{batch: 1, signal_name: {signal_name}}}}}
    """)
    proc = _run(fit_args(cut, 5, []) + ["-c", str(sparse), "-c", str(stop)], cut)
    assert proc.returncode != 0, proc.stderr[-3000:]
    last = cut / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2, proc.stderr[-3000:]
    run_emorl(fit_args(cut, 5, [], "last") + ["-c", str(sparse)], cut)
    expected = torch.load(full / "csv" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == expected["global_step"] == 5
    assert_same(expected["state_dict"], resumed["state_dict"], "weights")
    assert_same(expected["optimizer_states"], resumed["optimizer_states"], "optimizer")


# ------------------------------------------------------------------ unwritable / full destinations
@pytest.mark.parametrize("errno_name", ["EACCES", "ENOSPC"])
def test_checkpoint_write_failure_stops_the_run_with_the_path(tmp_path, errno_name):
    """A read-only or full checkpoint folder on the quickstart's kind of config (no checkpoint IO listed):
    the run stops non-zero with the path and the OS error. Before, Lightning's atomic save swallowed the
    PermissionError: exit 0 and no checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    fail = _override(tmp_path / "fail.yaml", f"""
        trainer:
          callbacks+:
            - {{class_path: resume_helpers.FailCheckpointWrites, init_args: {{errno_name: {errno_name}}}}}
    """)
    proc = _run(fit_args(out, 2, []) + ["-c", str(fail)], out)
    assert proc.returncode != 0
    ckpts = out / "csv" / "version_0" / "checkpoints"
    assert "could not write checkpoint " + str(ckpts) in proc.stderr, proc.stderr[-3000:]
    assert ("Permission denied" if errno_name == "EACCES" else "No space left on device") in proc.stderr
    assert not any(p.suffix == ".ckpt" for p in ckpts.iterdir()) if ckpts.exists() else True


SAVE_LOOP = """
import sys, torch
from emorl_pl.checkpointing import AtomicCheckpointIO
io, start = AtomicCheckpointIO(), int(sys.argv[2])
for i in range(start, start + 1000):
    io.save_checkpoint({"step": i, "w": torch.full((8_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_during_save_repeated_never_leaves_a_broken_checkpoint(tmp_path):
    """SIGKILL a process that rewrites last.ckpt (32 MB) in a loop, 6 times at different moments of a save:
    each time the file there loads whole and holds one step's values, and no temporary file is left that
    ``--ckpt_path last`` could take for a checkpoint."""
    import sys
    import time

    path = tmp_path / "last.ckpt"
    seen = []
    for run, delay in enumerate((0.0, 0.02, 0.05, 0.08, 0.11, 0.15)):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path), str(1000 * run)],
                                env={**emorl_env(), "OMP_NUM_THREADS": "1"})
        while not path.exists() or torch.load(path, weights_only=False)["step"] < 1000 * run:
            time.sleep(0.01)  # this run's first save is in place
            assert proc.poll() is None, "the save loop died"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=False)
        assert torch.equal(ckpt["w"], torch.full((8_000_000,), float(ckpt["step"])))
        assert ckpt["step"] >= 1000 * run
        seen.append(ckpt["step"])
        assert find_last(tmp_path) == path
    assert len(set(seen)) == 6


# ------------------------------------------------------------------ resume with a changed config
def test_identity_changes_table():
    saved = {"model.group_size": 2, "model.labels": ("a", "b"), "policy.lora": {"r": 4}}
    current = {"model.group_size": 4, "model.labels": ["a", "b"], "policy.lora": {"r": 4}, "data.seed": 1}
    changes = identity_changes(saved, current)
    assert changes == [("model.group_size", 2, 4)]  # data.seed: not recorded in that checkpoint, not compared
    table = format_changes(changes)
    assert "model.group_size" in table and "| 2 " in table and "| 4" in table
    with pytest.raises(ResumeConfigError, match="--resume_changes allow"):
        check_resume(saved, current, "x.ckpt")
    assert check_resume(saved, current, "x.ckpt", "allow") == changes
    with pytest.raises(ResumeConfigError, match="weights do not fit"):
        check_resume(saved, {**current, "policy.lora": {"r": 8}}, "x.ckpt", "allow")
    assert check_resume(None, current, "old.ckpt") == []  # nothing recorded, nothing to compare


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("identity")
    run_emorl(fit_args(out, 2, []), out)
    return out


CHANGES = {
    "group_size": (["--model.init_args.group_size", "3"], "model.group_size"),
    "label order": (["--data.init_args.label_set", "[sad, neutral, happy, angry]"], "model.labels"),
    "mode": (["--model.init_args.mode", "ir"], "model.mode"),
    "rewards": (["--model.init_args.rewards", "{eswr: 1.0}"], "model.rewards"),
    "loss_type": (["--model.init_args.loss_type", "dapo"], "model.loss_type"),
    "data seed": (["--data.init_args.seed", "7"], "data.seed"),
    "lora rank": (["--model.init_args.policy.init_args.lora.r", "8"], "policy.lora"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_with_a_changed_setting_is_refused_with_a_table(two_step_run, change):
    """Each changed setting stops the resume before any step, naming the setting with its saved and current
    values. Before: a changed group size, label set, mode or rewards resumed silently; a changed LoRA rank
    failed with raw tensor-size errors."""
    flags, setting = CHANGES[change]
    proc = _run(fit_args(two_step_run, 3, [], "last") + flags, two_step_run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot resume" in proc.stderr and setting in proc.stderr, proc.stderr[-3000:]
    last = two_step_run / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2, "a refused resume must not train"


def test_resume_changes_allow_resumes_but_not_a_structural_change(two_step_run, tmp_path):
    """``--resume_changes allow`` resumes with a changed group size (the new value is then recorded); a
    changed LoRA rank is refused even then (the saved adapters cannot load)."""
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(two_step_run, out)
    ckpt = out / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    lora = _run(fit_args(out, 3, [], str(ckpt)) + ["--model.init_args.policy.init_args.lora.r", "8",
                                                   "--resume_changes", "allow"], out)
    assert lora.returncode == 2 and "weights do not fit" in lora.stderr and "policy.lora" in lora.stderr
    run_emorl(fit_args(out, 3, [], str(ckpt)) + ["--model.init_args.group_size", "3", "--resume_changes", "allow"],
              out)
    # the run folder moved, so Lightning writes last-v1.ckpt beside the copied last.ckpt; find_last takes the newest
    resumed = torch.load(find_last(ckpt.parent), weights_only=False)
    assert resumed["global_step"] == 3 and resumed["emorl_run_identity"]["model.group_size"] == 3


# ------------------------------------------------------------------ bad config values
@pytest.mark.parametrize("flag,value", [("max_new_tokens", "0"), ("temperature", "0"), ("eval_max_new_tokens", "-1"),
                                        ("top_p", "1.5")])
def test_bad_model_values_are_refused_at_start_up(tmp_path, flag, value):
    """Before: ``max_new_tokens 0`` was accepted and failed at the first validation."""
    proc = _run(fit_args(tmp_path, 2, []) + [f"--model.init_args.{flag}", value], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert flag in proc.stderr and not (tmp_path / "csv").exists(), proc.stderr[-2000:]


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/trainer/single_gpu.yaml",
                                    "configs/trainer/ddp_4gpu.yaml", "configs/trainer/fsdp2_8gpu.yaml"])
def test_every_shipped_config_saves_atomically_with_last_at_every_event(tmp_path, config, toy_model_dir):
    """Each shipped trainer config, as ``emorl`` builds it: the checkpoint IO is ``AtomicCheckpointIO`` (whose
    write errors stop the run) and the checkpoint callback is the one that keeps ``last.ckpt`` current."""
    import lightning as L
    from test_distributed import REPO

    from emorl_pl.callbacks.checkpoint import ModelCheckpoint
    from emorl_pl.checkpointing import AtomicCheckpointIO
    from emorl_pl.cli import EmoRLCLI
    from emorl_pl.modules.grpo_module import GRPOModule

    args = (["-c", str(REPO / "tests/configs/tiny_grpo.yaml")] if "trainer/" in config else []) + ["-c", str(REPO / config)]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
             "--trainer.precision", "32-true", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    args += ["--model.init_args.policy.init_args.model_dir", toy_model_dir]
    trainer = EmoRLCLI(GRPOModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=args, run=False).trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoints = [c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    assert checkpoints and all(type(c) is ModelCheckpoint for c in checkpoints)
