"""FSDP2 (``fully_shard``) for the policy, applied in ``configure_model`` under ModelParallelStrategy.

Why FSDP2 and not Lightning's FSDPStrategy: FSDP1 breaks ``manual_backward`` inside ``training_step``
(Lightning issues #19626, #19685) and refuses CPU. ``ModelParallelStrategy(data_parallel_size=N,
tensor_parallel_size=1)`` gives a 1-D data-parallel mesh; each transformer block (audio encoder and
language model) becomes its own FSDP unit, then the root, so only one block's full weights live on a
device at a time. Calls that bypass the root's forward (embedding lookups, the audio tower's feature
function used to encode the audio once per group) are registered as FSDP forward methods so that
their parameters are gathered too.
"""

from __future__ import annotations

import torch
from torch import nn

_BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")
_FORWARD_METHODS = ("generate", "get_audio_features")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (decoder and encoder layers) that become FSDP units, outermost first."""
    return [m for m in model.modules() if type(m).__name__.endswith(_BLOCK_SUFFIXES)]


def is_sharded(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def shard_model(model: nn.Module, mesh, *, reshard_after_forward: bool = True) -> nn.Module:
    """Apply ``fully_shard`` per transformer block, then to the root. Idempotent.

    ``mesh`` is the strategy's device mesh (its ``data_parallel`` dimension is used when present).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(model):
        return model
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for block in transformer_blocks(model):
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # Embeddings are looked up outside the root forward (prompt encoding), so they are their own unit.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module):
        fully_shard(embeddings, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for name in _FORWARD_METHODS:
        target = model
        # peft wraps the model: the method lives on the wrapped base model.
        while not hasattr(type(target), name) and hasattr(target, "base_model") and target.base_model is not target:
            target = target.base_model
        if hasattr(type(target), name) and target is model:
            register_fsdp_forward_method(model, name)
    return model


def full_state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a sharded model's full state dict on CPU (rank 0 gets it all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
