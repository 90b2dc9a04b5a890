"""``FSDP2Strategy``: data-parallel FSDP2 with trainable-only, atomically written sharded checkpoints.

Why not Lightning's ``FSDPStrategy``: FSDP1 refuses CPU and breaks ``manual_backward`` inside
``training_step`` (Lightning #19626, #19685). ``ModelParallelStrategy`` with a 1-D data-parallel mesh
(``tensor_parallel_size=1``) does neither; ``GRPOModule.configure_model`` applies ``fully_shard``.
On top of ``ModelParallelStrategy`` this adds:

- defaults that actually shard on one node (its defaults put all devices on the tensor-parallel axis);
- a mixed-precision policy: ``param_dtype`` for compute (weights all-gathered in it), ``reduce_dtype`` for
  the gradient reduce-scatter, while the sharded master weights and the optimizer state stay in the
  dtype the model was loaded in (fp32 in the shipped recipes);
- gradients reduced once per optimizer step: ``block_backward_sync`` (used by ``GRPOModule`` for every
  backward but a step's last) turns FSDP2's reduce-scatter off, so gradients accumulate unsharded in
  between (``sync_gradients: per_backward`` reduces after every backward instead: less memory for full
  fine-tuning of a large model, more communication);
- atomic saves: the ``.distcp`` folder is written to ``<name>.<random>.tmp`` and renamed into place;
- partial loads: the checkpoint holds only trainable weights (LoRA), so only those keys are read back
  (stock Lightning asks DCP for every parameter and fails on the frozen base weights).

Config: ``trainer: {strategy: {class_path: emorl_pl.strategies.FSDP2Strategy}, devices: 2}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from emorl_pl.checkpointing import (
    METADATA_FILENAME,
    AtomicCheckpointIO,
    checkpoint_write_error,
    commit_directory,
    is_sharded_checkpoint,
)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all devices (``data_parallel_size="auto"`` = world size, no tensor parallelism).

    Args:
        data_parallel_size: ranks that shard the model; "auto" = all of them.
        save_distributed_checkpoint: True: a folder of per-rank shards; False: one full file (rank 0).
        param_dtype: compute dtype of the gathered weights (``bfloat16``, ``float16``, ``float32``); None
            keeps the loaded dtype (no mixed precision).
        reduce_dtype: dtype of the gradient reduce-scatter; None: ``param_dtype``'s.
        sync_gradients: ``per_step`` (reduce once per optimizer step) or ``per_backward``.
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = "float32",
        sync_gradients: Literal["per_step", "per_backward"] = "per_step",
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.checkpoint_io = AtomicCheckpointIO()
        if sync_gradients not in ("per_step", "per_backward"):
            raise ValueError(f"sync_gradients must be per_step or per_backward, got {sync_gradients!r}")
        self.sync_gradients = sync_gradients
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype

    @property
    def mp_policy(self):
        """FSDP2's ``MixedPrecisionPolicy`` for ``fully_shard`` (None: no mixed precision)."""
        if self.param_dtype is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        reduce = getattr(torch, self.reduce_dtype) if self.reduce_dtype else None
        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.param_dtype), reduce_dtype=reduce)

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate unsharded gradients without reduce-scatter; the next backward
        outside reduces everything accumulated (FSDP2 ``set_requires_gradient_sync``)."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.lightning_module.modules() if isinstance(m, FSDPModule)]
        if self.sync_gradients == "per_backward" or not units:
            yield
            return
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # AtomicCheckpointIO
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.with_name(f"{path.name}.{_random_hex()}.tmp"))))
        self._on_every_rank(path, lambda: tmp.mkdir(parents=True, exist_ok=True))
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        try:
            _distributed_checkpoint_save(tensors, tmp)  # DCP gathers every rank's errors and raises on all
        except Exception as e:
            raise checkpoint_write_error(path, e) from e
        # Each step ends in an all-reduce of its outcome (every rank's shard is on disk before the rename), so
        # a rank that failed to write stops every rank with the error instead of leaving them in a barrier.
        self._on_every_rank(path, lambda: torch.save(checkpoint, tmp / METADATA_FILENAME), rank_zero_only=True)
        self._on_every_rank(path, lambda: commit_directory(tmp, path), rank_zero_only=True)

    def _on_every_rank(self, path: Path, write: Any, rank_zero_only: bool = False) -> None:
        """Run ``write`` (on rank 0 only if asked); if it failed on any rank, raise ``CheckpointWriteError`` on
        every rank."""
        error: OSError | None = None
        if not rank_zero_only or self.global_rank == 0:
            try:
                write()
            except OSError as e:
                error = e
        if self.reduce_boolean_decision(error is not None, all=False):
            raise checkpoint_write_error(path, error or "the write failed on another rank")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_partial_sharded_checkpoint(path, self.model, self.optimizers)


def _random_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def load_partial_sharded_checkpoint(path: Path, module: torch.nn.Module, optimizers: list) -> dict[str, Any]:
    """Load the module tensors present in the folder (trainable-only checkpoints), optimizers, metadata.

    Returns the metadata (``meta.pt``) for Lightning to restore loops, schedulers, callbacks and data.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    full = get_model_state_dict(module)
    partial = {k: v for k, v in full.items() if f"state_dict.{k}" in saved}
    if not partial:
        raise KeyError(f"{path}: no parameter of the model is in this checkpoint (a different model?)")
    state = {"state_dict": partial}
    dcp.load(state, checkpoint_id=path)
    module.load_state_dict(state["state_dict"], strict=False)
    for i, optim in enumerate(optimizers):
        key = f"optimizer_{i}"
        if not any(k.startswith(f"{key}.") for k in saved):
            raise KeyError(f"{path}: no state for {key} in this checkpoint (saved with weights_only?)")
        optim_state = {key: get_optimizer_state_dict(module, optim)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optim, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / METADATA_FILENAME, weights_only=False)
