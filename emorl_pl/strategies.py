"""``FSDP2Strategy``: FSDP2 (or HSDP over nodes) with trainable-only, atomically written sharded checkpoints.

Why not Lightning's ``FSDPStrategy``: FSDP1 refuses CPU and breaks ``manual_backward`` inside
``training_step`` (Lightning #19626, #19685). ``ModelParallelStrategy`` (no tensor parallelism) does
neither; ``GRPOModule.configure_model`` applies ``fully_shard`` over this strategy's device mesh.
On top of ``ModelParallelStrategy`` this adds:

- a 2-D device mesh ``("dp_replicate", "dp_shard")``, as torchtitan's HSDP: by default the model is sharded
  over the devices of a node and replicated across nodes (``shard_degree`` / ``replicate_degree``), so
  the per-layer all-gathers and gradient reduce-scatters stay inside a node and only one gradient
  all-reduce per unit crosses nodes; on one node it is plain FSDP2 over all devices;
- a launch check before the process group is joined: a launch whose world size is not
  ``num_nodes x devices`` stops with a message naming both (instead of waiting in rendezvous or
  failing later with a mesh-size error);
- a mixed-precision policy: ``param_dtype`` for compute (weights all-gathered in it), ``reduce_dtype`` for
  the gradient reduce-scatter, while the sharded master weights and the optimizer state stay in the
  dtype the model was loaded in (fp32 in the shipped recipes);
- gradients reduced once per optimizer step: ``block_backward_sync`` (used by ``GRPOModule`` for every
  backward but a step's last) turns FSDP2's reduce-scatter (and, under HSDP, the all-reduce across
  nodes) off, so gradients accumulate unsharded in between (``sync_gradients: per_backward`` reduces
  after every backward instead: less memory for full fine-tuning of a large model, more communication);
- atomic saves: the ``.distcp`` folder is written to ``<name>.<random>.tmp`` and renamed into place (DCP
  writes each replicated shard once, whatever the number of replicas);
- partial loads: the checkpoint holds only trainable weights (LoRA), so only those keys are read back
  (stock Lightning asks DCP for every parameter and fails on the frozen base weights). DCP reshards on
  load, so a checkpoint resumes on another node count or mesh shape (the data stream's own position
  check decides whether the rest of the epoch can be reproduced).

Config: ``trainer: {strategy: {class_path: emorl_pl.strategies.FSDP2Strategy}, devices: 8, num_nodes: 2}``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.strategies import ModelParallelStrategy

from emorl_pl.checkpointing import (
    METADATA_FILENAME,
    AtomicCheckpointIO,
    checkpoint_write_error,
    commit_directory,
    is_sharded_checkpoint,
)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over a ``(replicate_degree, shard_degree)`` device mesh, no tensor parallelism.

    Args:
        shard_degree: ranks that shard the model between them (global ranks ``[i*S, (i+1)*S)`` form a group);
            "auto": the devices of one node (``trainer.devices``), or ``world / replicate_degree`` when that
            is given.
        replicate_degree: groups that each hold a full sharded copy; gradients are all-reduced across them.
            "auto": ``world / shard_degree`` (the number of nodes by default). 1 is plain FSDP2.
        save_distributed_checkpoint: True: a folder of per-rank shards; False: one full file (rank 0).
        param_dtype: compute dtype of the gathered weights (``bfloat16``, ``float16``, ``float32``); None
            keeps the loaded dtype (no mixed precision).
        reduce_dtype: dtype of the gradient reduce-scatter; None: ``param_dtype``'s.
        sync_gradients: ``per_step`` (reduce once per optimizer step) or ``per_backward``.
    """

    def __init__(
        self,
        shard_degree: int | Literal["auto"] = "auto",
        replicate_degree: int | Literal["auto"] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = "float32",
        sync_gradients: Literal["per_step", "per_backward"] = "per_step",
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        for name, value in (("shard_degree", shard_degree), ("replicate_degree", replicate_degree)):
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"FSDP2Strategy: {name} must be a positive integer or 'auto', got {value!r}")
        self.shard_degree, self.replicate_degree = shard_degree, replicate_degree
        self.checkpoint_io = AtomicCheckpointIO()
        if sync_gradients not in ("per_step", "per_backward"):
            raise ValueError(f"sync_gradients must be per_step or per_backward, got {sync_gradients!r}")
        self.sync_gradients = sync_gradients
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """``(replicate, shard)`` for this run's world size (``num_nodes x devices``)."""
        return mesh_shape(self.num_nodes * self.num_processes, self.num_processes,
                          self.shard_degree, self.replicate_degree)

    def setup_environment(self) -> None:
        # Every check here depends only on the config and the launcher's environment, so every rank reaches the
        # same verdict before joining the process group: a bad launch stops on all ranks, none waits for peers.
        check_launch(self.cluster_environment, num_nodes=self.num_nodes, devices=self.num_processes)
        replicate, shard = self.mesh_shape
        self._setup_distributed()  # ModelParallelStrategy's: device, ranks, process group
        from torch.distributed.device_mesh import init_device_mesh

        self._data_parallel_size, self._tensor_parallel_size = self.world_size, 1
        self._device_mesh = init_device_mesh(self.root_device.type, (replicate, shard),
                                             mesh_dim_names=("dp_replicate", "dp_shard"))
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank is a data-parallel rank (replicas and shards alike take different batches).
        return {"num_replicas": self.world_size, "rank": self.global_rank}

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


class LaunchMismatchError(ValueError):
    """The processes the launcher started are not the ``num_nodes x devices`` the config asks for."""


def mesh_shape(world_size: int, devices: int, shard_degree: int | str = "auto",
               replicate_degree: int | str = "auto") -> tuple[int, int]:
    """``(replicate, shard)`` of ``world_size`` ranks: by default shard over a node's ``devices``."""
    if shard_degree == "auto" and replicate_degree == "auto":
        shard_degree = devices
    if shard_degree == "auto":
        shard_degree = world_size // replicate_degree if world_size % replicate_degree == 0 else 0
    if replicate_degree == "auto":
        replicate_degree = world_size // shard_degree if shard_degree and world_size % shard_degree == 0 else 0
    if not shard_degree or not replicate_degree or shard_degree * replicate_degree != world_size:
        raise ValueError(
            f"FSDP2Strategy: replicate_degree x shard_degree must equal the world size {world_size} "
            f"(trainer.num_nodes x trainer.devices), got replicate_degree={replicate_degree or '?'}, "
            f"shard_degree={shard_degree or '?'}"
        )
    return replicate_degree, shard_degree


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def launch_counts(env: Any) -> tuple[str, list[tuple[str, int | None, str]]]:
    """The launcher's name and its ``(variable, value, what it counts)`` for processes, processes per node
    and nodes (value None: not given). Lightning's own launcher starts ``num_nodes x devices`` by construction:
    nothing to compare then."""
    if env is None or not env.creates_processes_externally:
        return "Lightning", []
    if isinstance(env, TorchElasticEnvironment):
        return "torchrun", [("WORLD_SIZE", _env_int("WORLD_SIZE"), "processes"),
                            ("LOCAL_WORLD_SIZE", _env_int("LOCAL_WORLD_SIZE"), "per node"),
                            ("GROUP_WORLD_SIZE", _env_int("GROUP_WORLD_SIZE"), "nodes")]
    if isinstance(env, SLURMEnvironment):
        return "SLURM", [("SLURM_NTASKS", _env_int("SLURM_NTASKS"), "processes"),
                         ("SLURM_NTASKS_PER_NODE", _env_int("SLURM_NTASKS_PER_NODE"), "per node"),
                         ("SLURM_NNODES", _env_int("SLURM_NNODES"), "nodes")]
    if isinstance(env, LightningEnvironment):  # processes started by hand: LOCAL_RANK (and WORLD_SIZE) set
        return "the launcher", [("WORLD_SIZE", _env_int("WORLD_SIZE"), "processes")]
    return type(env).__name__, [(f"{type(env).__name__}.world_size()", env.world_size(), "processes")]


def check_launch(env: Any, num_nodes: int, devices: int) -> None:
    """Raise ``LaunchMismatchError`` naming the values when the launcher's process counts are not the
    config's ``num_nodes x devices`` (Lightning checks this only for processes it starts itself)."""
    launcher, counts = launch_counts(env)
    expected = {"processes": num_nodes * devices, "per node": devices, "nodes": num_nodes}
    wrong = [(name, value, what) for name, value, what in counts if value is not None and value != expected[what]]
    if not wrong:
        return
    found = ", ".join(f"{name}={value}" for name, value, _ in counts if value is not None)
    how = {"torchrun": f"torchrun --nnodes {num_nodes} --nproc-per-node {devices}, on each node",
           "SLURM": f"srun with --nodes {num_nodes} --ntasks-per-node {devices}"}.get(launcher, "the launcher")
    raise LaunchMismatchError(
        f"{launcher} started {found}, but the config asks for trainer.num_nodes={num_nodes} x "
        f"trainer.devices={devices} = {num_nodes * devices} processes ({devices} per node). Start {devices} "
        f"processes on each of {num_nodes} nodes ({how}), or set trainer.num_nodes and trainer.devices to "
        "the launch. Stopped on every rank before joining the process group."
    )


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
