"""The KL reference policy's weights: a frozen copy of the model (full fine-tuning), loaded from a folder (under
FSDP2 straight into each rank's shards, ``loading.py``) or copied shard by shard, and, for LoRA (whose
reference is the base model, adapters off), folding the adapters into the base so that the reference moves to
the current policy."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from emorl_pl.modules import loading
from emorl_pl.modules.families import AudioLMFamily
from emorl_pl.modules.sharding import shard_model

log = logging.getLogger(__name__)


def frozen_copy(hf_model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no parameter requiring grad."""
    return copy.deepcopy(hf_model).eval().requires_grad_(False)


def load_frozen(model_class: type, model_dir: str | Path, **from_pretrained_kwargs) -> nn.Module:
    """The model in ``model_dir``, frozen as ``frozen_copy`` leaves one."""
    return model_class.from_pretrained(model_dir, **from_pretrained_kwargs).eval().requires_grad_(False)


def load_frozen_sharded(model_class: type, model_dir: str | Path, family: AudioLMFamily, mesh,
                        **from_pretrained_kwargs) -> nn.Module:
    """The model in ``model_dir``, frozen and sharded like the policy (``shard_like_policy``): built on the meta
    device, sharded there, then each rank reads only its own shards from the files (``loading.py``), so that no
    rank holds the whole model. A folder that cannot be read that way is loaded in full, then sharded."""
    try:
        ref, plan = loading.meta_model_and_plan(model_class, model_dir, **from_pretrained_kwargs)
    except loading.LeanLoadingUnsupported as why:
        log.warning("reference: loading %s in full on every rank before sharding (%s)", model_dir, why)
        ref = load_frozen(model_class, model_dir, **from_pretrained_kwargs)
        shard_like_policy(ref, family, mesh)
        return ref
    ref.eval().requires_grad_(False)
    plan.bind(ref)
    shard_like_policy(ref, family, mesh, init_root=False)
    loading.materialize(ref, plan, loading.mesh_device(mesh))
    return ref


def shard_like_policy(ref: nn.Module, family: AudioLMFamily, mesh, init_root: bool = True) -> None:
    """FSDP2-shard a reference the way the policy is: blocks, every directly called module, then the root."""
    shard_model(ref, mesh, extra_units=list(family.direct_call_modules(ref).values()), init_root=init_root)


def copy_local_shards(policy_model: nn.Module, ref: nn.Module) -> None:
    """Sharded reset: each rank copies its own shards of the policy into the reference (no gather)."""
    with torch.no_grad():
        for (name, p), (ref_name, r) in zip(policy_model.named_parameters(), ref.named_parameters(), strict=True):
            if name != ref_name:
                raise RuntimeError(f"policy and reference parameters differ: {name} vs {ref_name}")
            r.to_local().copy_(p.to_local())


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def fold_adapters_into_base(model: nn.Module) -> dict[str, Tensor]:
    """Per LoRA layer of ``model``, ``W += scaling * B @ A`` (peft's merge, on full tensors in float32), then
    ``B = 0``: the function is unchanged and the adapters restart from there. Returns the folded
    ``{lora_A, lora_B, scaling}`` per layer as full CPU tensors (see ``AudioLMPolicy.fold_adapters_into_base``)."""
    folded: dict[str, Tensor] = {}
    for name, layer in lora_layers(model):
        for adapter in layer.active_adapters:
            # clone: .float().cpu() of a CPU float32 parameter is the parameter itself
            for kind, module in (("A", layer.lora_A[adapter]), ("B", layer.lora_B[adapter])):
                folded[f"{name}|{adapter}|{kind}"] = _full_tensor(module.weight).detach().float().cpu().clone()
            folded[f"{name}|{adapter}|scaling"] = torch.tensor(float(layer.scaling[adapter]))
    fold_into_base(model, folded)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.active_adapters:
                layer.lora_B[adapter].weight.zero_()
    return folded


def fold_into_base(model: nn.Module, folded: dict[str, Tensor]) -> None:
    """Add ``scaling * B @ A`` of each folded adapter to its base weight in ``model``; adapters untouched."""
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key in [k for k in folded if k.endswith("|A")]:
            name, adapter, _ = key.split("|")
            if name not in layers:
                raise KeyError(f"folded adapter for {name!r}, which is not a LoRA layer of this model")
            weight = layers[name].get_base_layer().weight
            delta = (folded[f"{name}|{adapter}|B"] @ folded[key]) * folded[f"{name}|{adapter}|scaling"]
            weight.add_(_like(delta, weight))


def _full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) DTensor parameter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: Tensor, target: Tensor) -> Tensor:
    """``full`` (the same on every rank) in ``target``'s dtype, device and, for a DTensor, its sharding."""
    full = full.to(device=target.device, dtype=target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, target.device_mesh, target.placements)
    return full
