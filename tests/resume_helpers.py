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


class SignalAt(L.Callback):
    """Send ``signal`` (``SIGINT`` as Ctrl-C, ``SIGTERM`` as a scheduler's preemption) to this process once
    training batch ``batch`` (0-based, of the run) has ended."""

    def __init__(self, batch: int, signal_name: str) -> None:
        self.batch, self.signum = batch, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class LogConstant(L.Callback):
    """Logs ``const = 1.0`` at every validation: a monitored metric that never improves after its first value."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("const", 1.0)


class FailCheckpointWrites(L.Callback):
    """From the start of fit, opening a file for writing under the checkpoint folder fails with ``errno_name``
    (``EACCES``: a read-only folder, as root cannot be refused by permissions; ``ENOSPC``: a full disk,
    failing at the first write)."""

    def __init__(self, errno_name: str) -> None:
        self.errno_name = errno_name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import builtins
        import errno
        import io

        code = getattr(errno, self.errno_name)
        real_open = builtins.open
        folder = str(Path(trainer.default_root_dir).resolve())

        class _FullFile(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                raise OSError(code, os.strerror(code))

        def failing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            path = str(Path(os.fspath(file)).resolve()) if isinstance(file, (str, os.PathLike)) else ""
            if path.startswith(folder) and "checkpoints" in path and any(c in mode for c in "wax"):
                if code == errno.ENOSPC:
                    real_open(file, mode, *args, **kwargs).close()  # the file is created, its bytes don't fit
                    return io.BufferedWriter(_FullFile())
                raise PermissionError(code, os.strerror(code), os.fspath(file))
            return real_open(file, mode, *args, **kwargs)

        real_os_open = os.open

        def failing_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            full = str(Path(os.fspath(path)).resolve())
            if full.startswith(folder) and "checkpoints" in full and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_os_open(path, flags, *args, **kwargs)

        builtins.open = failing_open
        os.open = failing_os_open
