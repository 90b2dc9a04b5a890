"""The policy's weights for a rollout engine: streamed one weight at a time, LoRA merged out of place, and
written in the hub key layout as safetensors shards that vLLM reloads in place.

Nothing holds a second full copy of the model: under FSDP2 each weight is all-gathered on its own (in the
compute dtype, so a bf16 run moves and writes bf16), the writing rank keeps at most one shard file's worth
(``max_shard_bytes``) before it goes to disk, and the other ranks drop each gathered weight at once. The
all-gathers are collectives, so every rank iterates the same weights in the same order (``state_dict``'s).

Published names are the hub's (``hub_layout.HubConverter``): a renaming for most families, and for Qwen3-Omni's
mixture-of-experts layers a split, as each fused ``experts.gate_up_proj`` / ``down_proj`` arrives, into the
per-expert ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` weights vLLM loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

INDEX_NAME = "model.safetensors.index.json"


def _full(value: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The whole tensor: a DTensor shard is cast locally, then all-gathered (a collective)."""
    from torch.distributed.tensor import DTensor

    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value.full_tensor() if isinstance(value, DTensor) else value


def iter_merged_weights(model: nn.Module, dtype: torch.dtype | None = None,
                        to_cpu: bool = True) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` under the plain model's names, each on the CPU (``to_cpu``; False leaves it where it was
    gathered: a rank that only takes part in the gathers need not copy them), each LoRA layer's update
    ``scaling * B @ A`` added to its base weight out of place (the model is not touched, so training goes on
    bit-for-bit). ``dtype``: the dtype to gather and yield floating weights in (None: as stored)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    layers = {f"{name}.base_layer.weight": module for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and module.active_adapters and not module.disable_adapters}
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "lora_" in name:
                continue
            layer = layers.get(name)
            if layer is None:
                full = _full(value, dtype)
            else:  # base + sum of B A x scaling, summed in float32 in the delta's own buffer (never in place
                # on the base: unsharded, it is the parameter itself), then cast
                base = _full(value, None)
                merged = None
                for adapter in layer.active_adapters:
                    if adapter not in layer.lora_A:
                        continue
                    a = _full(layer.lora_A[adapter].weight, None).float()
                    b = _full(layer.lora_B[adapter].weight, None).float()
                    delta = transpose(b @ a, layer.fan_in_fan_out).mul_(layer.scaling[adapter])
                    merged = delta if merged is None else merged.add_(delta)
                full = (base if merged is None else merged.add_(base)).to(dtype or base.dtype)
            yield name.replace(".base_layer.", "."), full.to("cpu") if to_cpu else full


class _Renaming:
    """A plain in-memory -> published name map as a converter (``HubConverter``'s interface)."""

    def __init__(self, key_map: Mapping[str, str]) -> None:
        self.key_map = dict(key_map)
        self.sources = frozenset(self.key_map)
        self.published = frozenset(self.key_map.values())

    def __call__(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        published = self.key_map.get(name)
        return {} if published is None else {published: tensor}


def write_hub_shards(weights: Iterable[tuple[str, Tensor]],
                     layout: Mapping[str, str] | Callable[[str, Tensor], dict[str, Tensor]],
                     folder: str | Path | None, max_shard_bytes: int = 1 << 30) -> list[str]:
    """Write ``weights`` in the published layout to ``folder`` as ``model-NNNNN.safetensors`` files of at most
    ``max_shard_bytes`` each (a single larger tensor gets a file of its own) plus
    ``model.safetensors.index.json``, replacing the previous set; returns the published names written.

    ``layout``: a ``hub_layout.HubConverter`` (each weight to its published tensors, as it arrives: a fused
    expert weight split per expert; with ``sources`` / ``published``, the names that must come and be written),
    or a plain in-memory -> published name map. ``folder`` None: consume ``weights`` without converting or
    writing (a rank that takes part in the gathers but does not write). Weights the layout does not publish are
    skipped; a weight it needs that never came, or a published name not written or written twice, is an error."""
    from safetensors.torch import save_file

    written: list[str] = []
    if folder is None:
        for _ in weights:
            pass
        return written
    convert = _Renaming(layout) if isinstance(layout, Mapping) else layout
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.safetensors"), folder / INDEX_NAME]:
        old.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size = {}, 0

    seen = set()
    for name, tensor in weights:
        seen.add(name)
        parts = convert(name, tensor)
        del tensor  # our reference to a fused weight: from here its parts, each held until its shard is written
        for published in list(parts):
            part = parts.pop(published)
            if published in weight_map or published in shard:
                raise RuntimeError(f"{name}: published name {published} written twice")
            nbytes = part.numel() * part.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[published] = part.contiguous()
            size += nbytes
            written.append(published)
    flush()
    missing = sorted(getattr(convert, "sources", seen) - seen)
    if missing:
        raise RuntimeError(f"the engine needs weights the policy does not have: {missing[:5]}")
    unwritten = sorted(getattr(convert, "published", set(written)) - set(written))
    if unwritten:
        raise RuntimeError(f"{len(unwritten)} published weights were not written, e.g. {unwritten[:5]}")
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=1))
    return written
