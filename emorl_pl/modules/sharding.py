"""FSDP2 (``fully_shard``) for the policy, applied in ``configure_model`` under ModelParallelStrategy.

Why FSDP2 and not Lightning's FSDPStrategy: FSDP1 breaks ``manual_backward`` inside ``training_step``
(Lightning issues #19626, #19685) and refuses CPU. ``FSDP2Strategy`` gives a ``("dp_replicate", "dp_shard")``
mesh: with one replica it is plain FSDP2 over ``dp_shard``; with several (nodes) it is HSDP, as in
torchtitan: ``fully_shard`` on the 2-D mesh shards each unit over ``dp_shard`` (a node) and replicates it
over ``dp_replicate``; gathers and reduce-scatters stay in the shard group, gradients are then all-reduced
across replicas. Each transformer block (audio encoder and language model) becomes its own FSDP unit,
then the root, so only one block's full weights live on a device at a time. Modules that the policy calls
directly, bypassing the root's forward (embeddings, the decoder stack, lm_head, the audio tower), are
units of their own so that their parameters are gathered when called; the root is lazily initialised
right away so that it stays the root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (decoder and encoder layers) that become FSDP units."""
    return [m for m in model.modules() if type(m).__name__.endswith(_BLOCK_SUFFIXES)]


def is_sharded(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def _depth_sorted(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """Innermost first: fully_shard must see a unit's children sharded before the unit itself."""
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    unique = {id(m): m for m in modules if id(m) in depth}
    return sorted(unique.values(), key=lambda m: -depth[id(m)])


def fsdp_mesh(mesh):
    """The mesh ``fully_shard`` gets: ``FSDP2Strategy``'s 2-D ``("dp_replicate", "dp_shard")`` mesh when it has
    several replicas (HSDP), its ``dp_shard`` dimension when it has one (FSDP2); a mesh with a ``data_parallel``
    dimension (Lightning's ModelParallelStrategy) gives that dimension; any other mesh is used as it is."""
    names = mesh.mesh_dim_names or ()
    if "dp_replicate" in names and "dp_shard" in names:
        return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(
    model: nn.Module, mesh, *, extra_units: list[nn.Module] = (), reshard_after_forward: bool = True,
    mp_policy=None, init_root: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` per transformer block, then to ``extra_units``, then to the root. Idempotent.

    ``extra_units``: modules called directly rather than through the root forward (embeddings, the
    decoder stack, lm_head, the audio tower): each must be a unit of its own or its parameters are
    never gathered. ``mesh`` is the strategy's device mesh (see ``fsdp_mesh``); ``mp_policy`` an FSDP2
    ``MixedPrecisionPolicy`` for every unit (None: compute in the loaded dtype). ``init_root`` False: the
    weights are still on the meta device (read in after sharding, ``loading.materialize``), so the root's
    initialisation below, which refuses meta weights, is left to the caller.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    dp_mesh = fsdp_mesh(mesh)
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for unit in _depth_sorted(model, transformer_blocks(model) + list(extra_units)):
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    # FSDP2 picks as root the first unit that runs forward; the policy calls embed_tokens / the audio
    # tower directly, which would make them roots and the later ``model.generate`` fail ("requires
    # running forward through the root module first"). Initialising now fixes the root to ``model``.
    if init_root:
        model._get_fsdp_state()._lazy_init()
    return model


def full_state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a sharded model's full state dict on CPU (rank 0 gets it all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside, every FSDP2 unit of ``model`` holds its full (unsharded) weights: gathered once, by the first
    forward through a unit or by ``unshard()`` here, and kept until the exit reshards them all.

    The rollout's hybrid engine: a decode of T tokens then costs one all-gather round, not T rounds of a
    unit that reshards after every forward (``reshard_after_forward``), and the decode step may read the
    weights directly. The units' ``reshard_after_forward`` is True again afterwards (``shard_model``'s).
    A model without FSDP2 units is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
