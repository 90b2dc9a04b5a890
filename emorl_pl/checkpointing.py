"""Checkpoint IO: atomic writes, reading a file or a sharded folder, consolidation into one file.

Atomic: a checkpoint is written under a temporary name in its own folder and renamed into place only when
complete (``os.replace``), so a process killed mid-save never leaves a half-written ``last.ckpt`` that
``--ckpt_path last`` would pick. Temporary files and folders end in ``.tmp``, which ``ModelCheckpoint``
does not treat as checkpoints.

A sharded checkpoint (``ModelParallelStrategy`` / ``FSDP2Strategy``) is a folder of ``*.distcp`` files,
a ``.metadata`` index and ``meta.pt`` (loop, scheduler, callback and datamodule state). Consolidate it:

    emorl-export --consolidate runs/x/checkpoints/last.ckpt --out last-full.ckpt

Exact resume (``--ckpt_path``, after a crash or SIGKILL): the resumed run ends with bitwise the same
weights, optimizer state and LR on every rank as the uninterrupted one (tests/test_checkpoint.py,
tests/test_distributed.py). What makes it so:

- a checkpoint holds the trainable weights, the optimizer and scheduler states, Lightning's loop
  counters, the data stream's position (``ShardDataModule.state_dict``: epoch and batches handed out;
  the order is a pure function of the seed, so the resumed loader replays the epoch and drops them),
  the accumulation counter and the cold-start state (``GRPOModule.on_save_checkpoint``);
- randomness is not carried over but made a function of where training is: each training step runs in
  ``seeded_rng`` with a seed from (sampling seed, step, accumulation index, rank), so no draw depends on
  the global RNG's history (dropout masks, sampling), which no checkpoint holds;
- a checkpoint is never taken in the middle of an accumulation window: ``GRPOModule`` refuses one with a
  message (the window's generations and partial gradients are not saved). Step-based checkpoints come
  after optimizer steps, and a window closes at the end of each epoch, so epoch-end ones do too.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

METADATA_FILENAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_INDEX = ".metadata"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: str | Path) -> Path:
    """``<dir>/<name>.<random>.tmp``: same folder (so the rename is atomic), never matched as a checkpoint."""
    path = Path(path)
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the original error matters, not the clean-up's
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def commit_directory(tmp: str | Path, path: str | Path) -> None:
    """Move a completely written folder ``tmp`` onto ``path`` (replacing a file or folder there).

    A folder cannot be atomically replaced by another non-empty one, so an existing ``path`` is first
    renamed aside to ``<path>.<random>.tmp`` and deleted after; a crash between the two renames leaves
    no ``path`` (``--ckpt_path last`` then finds an older checkpoint or none), never a mixed one.
    """
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.is_dir():
        old = tmp_path_for(path)
        os.replace(path, old)
    elif path.exists():
        path.unlink()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (permissions, a full disk, ...): the run stops saying where and why,
    rather than going on with no checkpoint (Lightning's own atomic save swallows ``PermissionError``)."""


def checkpoint_write_error(path: str | Path, error: BaseException | str) -> CheckpointWriteError:
    errno = getattr(error, "errno", None)
    return CheckpointWriteError(errno, f"could not write checkpoint {path}: {error}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose single-file saves are atomic and whose write errors stop the run.

    ``emorl`` adds it to every run whose config names no checkpoint IO of its own (``emorl_pl.cli``); by
    hand: ``trainer: {plugins: [emorl_pl.checkpointing.AtomicCheckpointIO]}``. (``FSDP2Strategy`` writes
    its sharded folders atomically itself and uses this for single-file saves.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as e:
            raise checkpoint_write_error(path, e) from e


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_INDEX).is_file()


def consolidate_sharded_checkpoint(ckpt_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """One ``torch.load``-able file from a sharded checkpoint folder; returns the consolidated dict.

    ``dcp_to_torch_save`` gathers the tensors (``{"state_dict": ..., "optimizer_0": ...}``, keys as the
    LightningModule names them); ``meta.pt`` adds global step, loops, schedulers and datamodule state.
    Runs in one process, no process group needed.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt_dir = Path(ckpt_dir)
    if not is_sharded_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a sharded checkpoint folder (no {DCP_INDEX} inside)")
    out = Path(out)
    tmp = tmp_path_for(out)
    try:
        dcp_to_torch_save(ckpt_dir, tmp)
        tensors = torch.load(tmp, map_location="cpu", weights_only=False)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta_path = ckpt_dir / METADATA_FILENAME
    meta = torch.load(meta_path, map_location="cpu", weights_only=False) if meta_path.is_file() else {}
    full = {**meta, **tensors}
    atomic_torch_save(full, out)
    return full


def load_checkpoint_file_or_folder(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict, from a ``.ckpt`` file or a sharded folder (consolidated in memory)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        scratch = tmp_path_for(path.with_name(path.name + ".consolidated"))
        try:
            return consolidate_sharded_checkpoint(path, scratch)
        finally:
            if scratch.exists():
                scratch.unlink()
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder but not a sharded checkpoint (no {DCP_INDEX} inside)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def policy_state_dict(checkpoint: dict[str, Any], prefix: str = "policy.") -> dict[str, torch.Tensor]:
    """The policy's tensors from a GRPOModule checkpoint, keys relative to the policy (prefix removed)."""
    if "state_dict" not in checkpoint:
        raise KeyError(f"checkpoint has no 'state_dict' (keys: {sorted(checkpoint)[:10]})")
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"checkpoint 'state_dict' has no key starting with {prefix!r}")
    return state


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's (CPU, and ``device``'s when it is a GPU), numpy's and python's global RNGs
    seeded by ``seed``; their states are restored on exit.

    For exact resume: the draws inside (dropout masks, sampling) then depend on ``seed`` only, not on what
    ran before in the process, which no checkpoint records (a resumed process has consumed different
    draws: its own start-up, a replayed data epoch, ...).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    gpus = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.random.default_generator.manual_seed(seed)
        for gpu in gpus:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
