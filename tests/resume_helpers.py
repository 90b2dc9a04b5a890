"""Callbacks and a reward that the resume tests load into ``emorl`` runs by class path.

``tests/`` is put on the runs' PYTHONPATH (``test_distributed.emorl_env``); Lightning's DDP / FSDP2
launcher starts the other ranks with the same environment, so they import this module too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch


def text_hash_reward(completions: list[str], labels: list[str], **columns: Any) -> list[float]:
    """A score in [0, 1] that varies with the text. The tiny random model never writes the response format,
    so ESWR and format rewards are 0 everywhere: without this, RL would have no advantage, no gradient,
    and a resume that got the sampling wrong would still end with the same weights."""
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def _local(value: Any) -> Any:
    """Tensors detached and copied (a DTensor as this rank's shard), through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


class SaveRankState(L.Callback):
    """At the end of fit, each rank writes ``<default_root_dir>/rank_state/rank<r>.pt``: its trainable
    parameters (its shards under FSDP2), its optimizer state and LRs, as they are in memory."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(trainer.default_root_dir) / "rank_state"
        out.mkdir(parents=True, exist_ok=True)
        opt = trainer.optimizers[0]
        state = {
            "global_step": trainer.global_step,
            "params": {n: _local(p) for n, p in pl_module.named_parameters() if p.requires_grad},
            "optimizer": _local(opt.state_dict()),
            "lr": [group["lr"] for group in opt.param_groups],
        }
        torch.save(state, out / f"rank{trainer.global_rank}.pt")


class KillAt(L.Callback):
    """SIGKILL this process as the step after ``step`` begins: step ``step``'s checkpoints are on disk, the
    next step has not started (deterministic, unlike a kill sent from outside at a polled moment)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveCheckpointAt(L.Callback):
    """``trainer.save_checkpoint(path)`` at the end of the ``batch``-th training batch (0-based, of the run)."""

    def __init__(self, batch: int, path: str) -> None:
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
