"""Data-dependent work never desynchronises ranks: 2 processes (gloo) where dynamic sampling drops every
group on rank 0 and none on rank 1. Without equal collectives per rank, DDP's gradient all-reduce and
FSDP2's all-gathers would wait forever; with them the run finishes and rank 1's gradient reaches rank 0."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import check_emorl, fit_args, step_metrics

SCRIPT = str(Path(__file__).with_name("emorl_with_test_rewards.py"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp.yaml", "fsdp2.yaml"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_one_rank_drops_every_group_and_the_run_finishes(strategy, lora, tmp_path):
    """mu = 2 optimizer steps per batch, dynamic sampling dropping all of rank 0's groups, validation."""
    args = fit_args(tmp_path, 4, [strategy] + ([] if lora else ["full.yaml"])) + [
        "--model.init_args.rewards", "{test_rank0_constant: 1.0}",
        "--model.init_args.dynamic_sampling", "true",
        "--model.init_args.num_iterations", "2",
        "--model.init_args.sft_steps", "0",
        "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2",
        "--trainer.check_val_every_n_epoch", "null",
    ]
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    check_emorl(proc)
    steps = step_metrics(tmp_path)
    # Lightning logs once per batch that stepped (2 batches), at the end of its 2 optimizer steps.
    assert sorted(steps) == [0, 1]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    dropped = [float(r["dynamic_sampling/dropped_groups"]) for r in rows if r.get("dynamic_sampling/dropped_groups")]
    assert dropped == [2.0, 2.0], "rank 0 (which logs) drops both of its groups at every step"
    # Rank 0 has no signal of its own: a non-zero gradient norm there is rank 1's gradient, averaged in.
    assert all(steps[s]["grad_norm"] > 0 for s in (0, 1))
    assert any(r.get("val/ua") not in (None, "") for r in rows), "validation ran"


@pytest.mark.slow
def test_ddp_reduces_gradients_once_per_optimizer_step(tmp_path):
    """4 rows per rank in micro-batches of 1: 4 backward passes per optimizer step, one all-reduce."""
    args = fit_args(tmp_path, 2, ["ddp.yaml"]) + [
        "--model.init_args.sft_steps", "0",
        "--model.init_args.micro_batch_size", "1",
        "--trainer.callbacks+", "ddp_probe.CountGradReductions",
        "--trainer.callbacks.out", str(tmp_path),
    ]
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    check_emorl(proc)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"ddp_probe_rank{rank}.json").read_text())
        assert record == {"syncs": 2, "optimizer_steps": 2}, record
