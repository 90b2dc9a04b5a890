"""Loading a model without a whole copy of it in every process: built on the meta device (names, shapes and
dtypes, no memory), wrapped (LoRA) and FSDP2-sharded there, then each rank reads from the safetensors files
only the rows of its own shards.

Why each rank reads its own rows rather than rank 0 reading and broadcasting (``set_model_state_dict(...,
broadcast_from_rank0=True)``, accelerate's ``cpu_ram_efficient_loading``): rank 0 would still hold the whole
model, and the other ranks each tensor in full on its way through. FSDP2 shards dim 0 (``Shard(0)``, in
``torch.chunk`` pieces; HSDP replicates those over its other mesh dimension), so a rank's piece of a tensor is
one contiguous byte range of its file: a plain file read brings exactly those bytes in (no mmap of the file,
whose touched pages would count in the process's memory too), and no collective is needed.

The result is what ``from_pretrained`` followed by ``fully_shard`` gives, value for value: the files' keys
are renamed with transformers' own load-time renamings (``get_model_conversion_mapping``, as
``convert_and_load_state_dict_in_model``); each tensor is cast to the dtype its parameter was built with (as
``from_pretrained``); non-persistent buffers (rotary ``inv_freq``) are filled by the model's own
``initialize_weights`` with every loaded tensor marked initialised, as ``from_pretrained`` does (and
transformers' FSDP path for its non-zero ranks). A folder this cannot load exactly (no safetensors, weights
that transformers converts rather than renames, weights missing from the files, fp32-kept modules) raises
``LeanLoadingUnsupported``; the callers then load in full as before.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
READ_CHUNK_BYTES = 2**20  # staging buffer for reads that cast or go to a GPU (the allocator keeps a few)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


class LeanLoadingUnsupported(Exception):
    """The folder cannot be read shard by shard with the same result as ``from_pretrained`` (the message says
    why); load it in full instead."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFolder:
    """The tensors of a model folder's safetensors files (one file, or the files of its index), read by ranges
    of rows with plain file reads: only the requested bytes come into memory."""

    def __init__(self, model_dir: str | Path) -> None:
        if sys.byteorder != "little":
            raise LeanLoadingUnsupported("safetensors are little-endian; this machine is not")
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {err}") from err
            files = [self.model_dir / name for name in sorted(set(weight_map.values()))]
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise LeanLoadingUnsupported(f"{self.model_dir}: no *.safetensors weights")
        self.entries: dict[str, _Entry] = {}
        for path in files:
            for key, entry in _read_header(path).items():
                if key in self.entries:
                    raise ValueError(f"{path}: tensor {key!r} is also in {self.entries[key].path.name}")
                self.entries[key] = entry

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read(self, key: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of dim 0 of tensor ``key`` (the whole tensor for a 0-d one), in the file's dtype."""
        entry = self.entries[key]
        stop = (entry.shape[0] if entry.shape else 1) if stop is None else stop
        out = torch.empty((stop - start, *entry.shape[1:]) if entry.shape else (), dtype=entry.dtype)
        self.read_into(key, out, start)
        return out

    def read_into(self, key: str, out: Tensor, start: int = 0) -> None:
        """Rows ``start:start + len(out)`` of dim 0 of tensor ``key`` into ``out`` (whole rows; any dtype and
        device, cast as ``copy_`` casts). Read straight into ``out`` when it is a contiguous CPU tensor of the
        file's dtype, else through a staging buffer of at most ``READ_CHUNK_BYTES``."""
        entry = self.entries[key]
        rows = out.shape[0] if out.dim() else 1
        if tuple(out.shape[1:]) != entry.shape[1:] or start + rows > (entry.shape[0] if entry.shape else 1):
            raise ValueError(f"{entry.path}: cannot read rows {start}:{start + rows} of {key!r} "
                             f"{list(entry.shape)} into a tensor of shape {list(out.shape)}")
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        out_rows = out if out.dim() else out.view(1)
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(entry.start + start * row_bytes)
            if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
                _read_exactly(f, out_rows.view(-1).view(torch.uint8), entry.path, key)
                return
            step = max(1, READ_CHUNK_BYTES // max(1, row_bytes))
            for first in range(0, rows, step):
                n = min(step, rows - first)
                buffer = torch.empty(n * row_bytes, dtype=torch.uint8)
                _read_exactly(f, buffer, entry.path, key)
                out_rows[first : first + n].copy_(buffer.view(entry.dtype).view(n, *entry.shape[1:]))


def _read_exactly(f, out: Tensor, path: Path, key: str) -> None:
    """Fill the uint8 CPU tensor ``out`` from ``f`` (a read returns at most ~2 GiB on Linux: loop)."""
    view = memoryview(out.numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{path}: tensor {key!r} is cut short (the file ends {len(view) - done} bytes early)")
        done += got


def _read_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(size) if 0 < size < 100_000_000 else b""
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: not a safetensors file (no JSON header after the 8-byte length)") from err
    data_start = 8 + size
    file_size = path.stat().st_size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise LeanLoadingUnsupported(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, not one of "
                                         f"{sorted(SAFETENSORS_DTYPES)}")
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > file_size:
            raise ValueError(f"{path}: tensor {key!r} ({info['dtype']} {list(shape)}) has data_offsets "
                             f"{info['data_offsets']} that do not fit its size or the file")
        entries[key] = _Entry(path, dtype, shape, begin, end)
    return entries


@dataclass
class WeightPlan:
    """Where each tensor of a meta model comes from: its key in the folder's files, by tensor identity (so that
    names that LoRA wrapping changes still find their weight; ``bind`` takes the names after wrapping)."""

    folder: SafetensorsFolder
    by_tensor: dict[int, str]
    tensors: list[Tensor] = field(repr=False)  # keeps the ids of ``by_tensor`` valid
    by_name: dict[str, str] = field(default_factory=dict)

    def bind(self, model: nn.Module) -> WeightPlan:
        """Key the plan by ``model``'s names as they are now (after LoRA wrapping, before sharding replaces the
        parameters)."""
        self.by_name = {name: self.by_tensor[id(t)] for name, t in _named_tensors(model, remove_duplicate=False)
                        if id(t) in self.by_tensor}
        return self


def meta_model(model_class: type, model_dir: str | Path, *, dtype: torch.dtype,
               attn_implementation: str | None = None, config=None) -> nn.Module:
    """``model_class`` built on the meta device as ``model_class.from_pretrained(model_dir, dtype=...,
    attn_implementation=..., config=...)`` would configure it (dtype, attention, the folder's generation config,
    eval mode), without any weight."""
    from transformers import GenerationConfig

    if config is None:
        config = model_class.config_class.from_pretrained(model_dir)
        saved_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
        if saved_type not in (None, config.model_type):
            raise LeanLoadingUnsupported(f"{model_dir}: config.json is a {saved_type!r} config, not "
                                         f"{model_class.__name__}'s {config.model_type!r} (pass the model's config)")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = model_class._from_config(copy.deepcopy(config), **kwargs)
    model.config.name_or_path = str(model_dir)
    if model.can_generate() and (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def plan_weights(model: nn.Module, model_dir: str | Path, dtype: torch.dtype) -> WeightPlan:
    """Which file key fills each parameter and persistent buffer of the (meta, unwrapped) ``model``, by
    transformers' own load-time renaming; records the renamings used as ``from_pretrained`` does (for
    ``save_pretrained``). Raises ``LeanLoadingUnsupported`` where the result would differ from it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    folder = SafetensorsFolder(model_dir)
    if getattr(model, "_get_dtype_plan", None) and model._get_dtype_plan(dtype):
        raise LeanLoadingUnsupported(f"{type(model).__name__} keeps some modules in float32 under {dtype}")
    mapping = get_model_conversion_mapping(model)
    renamings = [c for c in mapping if not isinstance(c, WeightConverter)]
    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    key_of: dict[str, str] = {}
    for key in sorted(folder.keys(), key=dot_natural_key):  # the order transformers renames in
        renamed, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, converter = rename_source_key(key, [], [], prefix, meta_state)
        if converter is not None:
            raise LeanLoadingUnsupported(f"{model_dir}: transformers converts {key!r} ({converter}), not only "
                                         "renames it")
        if renamed in meta_state:
            if renamed in key_of:
                raise ValueError(f"{model_dir}: keys {key_of[renamed]!r} and {key!r} both load into {renamed}")
            if tuple(folder.shape(key)) != tuple(meta_state[renamed].shape):
                raise ValueError(f"{model_dir}: tensor {key!r} has shape {list(folder.shape(key))}, the model's "
                                 f"{renamed} {list(meta_state[renamed].shape)}")
            key_of[renamed] = key
    model._weight_conversions = [c for c in mapping if c.was_used()]
    non_persistent = {name for name, _ in _non_persistent_buffers(model)}
    by_tensor, tensors, missing = {}, [], []
    for names, t in _tensor_aliases(model).values():
        if names[0] in non_persistent:
            continue
        key = next((key_of[n] for n in names if n in key_of), None)
        if key is None:
            missing.append(names[0])
        else:
            by_tensor[id(t)] = key
            tensors.append(t)
    if missing:
        raise LeanLoadingUnsupported(f"{model_dir}: the files have no weight for {len(missing)} tensors, e.g. "
                                     f"{missing[:3]}")
    return WeightPlan(folder, by_tensor, tensors)


def meta_model_and_plan(model_class: type, model_dir: str | Path,
                        **from_pretrained_kwargs: Any) -> tuple[nn.Module, WeightPlan]:
    """``meta_model`` and its ``plan_weights``; takes ``from_pretrained``'s ``dtype``, ``attn_implementation``
    and ``config`` (any other keyword: ``LeanLoadingUnsupported``)."""
    other = sorted(set(from_pretrained_kwargs) - {"dtype", "attn_implementation", "config"})
    if other:
        raise LeanLoadingUnsupported(f"from_pretrained keywords {other} are not supported here")
    model = meta_model(model_class, model_dir, **from_pretrained_kwargs)
    return model, plan_weights(model, model_dir, from_pretrained_kwargs["dtype"])


@contextlib.contextmanager
def adapters_off_meta(model: nn.Module) -> Iterator[None]:
    """peft makes each adapter on its base layer's device: on a meta model, adapters without values. Inside,
    every meta parameter of ``model`` stands in as a CPU tensor of its shape and dtype that takes no memory
    (a broadcast zero), so that peft makes its adapters on the CPU with exactly the draws it makes on a loaded
    model; on exit the meta parameters are back, with the ``requires_grad`` peft gave their stand-ins."""
    swapped = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                swapped.append((module, name, p))
    for module, name, p in swapped:
        stand_in = torch.zeros((), dtype=p.dtype).expand(p.shape)
        module._parameters[name] = nn.Parameter(stand_in, requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for module, name, p in swapped:
            p.requires_grad_(module._parameters[name].requires_grad)
            module._parameters[name] = p


def mesh_device(mesh) -> torch.device:
    """The device FSDP2 puts a mesh's shards on (as ``fully_shard`` picks it)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def materialize(model: nn.Module, plan: WeightPlan, device: torch.device,
                weights: MutableMapping[str, Tensor] | None = None) -> None:
    """Give every tensor of ``model`` still on the meta device its value, on ``device``: each rank only its own
    rows of a sharded (DTensor) parameter, read from the files; ``weights`` (full tensors by ``model``'s names)
    take the place of the files' for their names, each removed from ``weights`` once copied (so that it can be
    freed). Tensors already off meta (LoRA adapters) keep their values.
    Non-persistent buffers are filled by the model's ``initialize_weights``. An FSDP2 root sharded with
    ``shard_model(..., init_root=False)`` is initialised at the end."""
    weights = {} if weights is None else weights
    kept = {name: t for name, t in _named_tensors(model) if not t.is_meta}
    # Views of their storage: to_empty may swap a parameter's data in place (``param.data = ...``).
    kept = {name: (_local(t) if _is_dtensor(t) else t.detach(), _is_dtensor(t)) for name, t in kept.items()}
    non_persistent = {name for name, _ in _non_persistent_buffers(model)}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in _named_tensors(model):
            local, local_shape, offsets = _region(t)
            if name in weights:
                value = weights.pop(name)
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"weight {name} has shape {list(value.shape)}, the model's {list(t.shape)}")
                local.copy_(_slice(value, local_shape, offsets))
                del value
            elif name in kept:
                value, is_local = kept[name]
                local.copy_(value if is_local else _slice(value, local_shape, offsets))
            elif name in plan.by_name:
                if not local.numel():
                    continue
                key = plan.by_name[name]
                if tuple(local_shape[1:]) == tuple(t.shape[1:]):  # whole rows (FSDP2's Shard(0)): read in place
                    plan.folder.read_into(key, local, offsets[0] if offsets else 0)
                else:
                    rows = plan.folder.read(key, offsets[0], offsets[0] + local_shape[0])
                    local.copy_(_slice(rows, local_shape, [0, *offsets[1:]]))
            elif name not in non_persistent:
                raise RuntimeError(f"{type(model).__name__}: no value for {name} (not in the files, the given "
                                   "weights, nor a non-persistent buffer)")
        for name, t in _named_tensors(model):
            if name not in non_persistent:
                t._is_hf_initialized = True
        if hasattr(model, "initialize_weights"):
            model.initialize_weights()  # guarded inits: only the unflagged non-persistent buffers are written
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _region(t: Tensor) -> tuple[Tensor, tuple[int, ...], list[int]]:
    """The tensor this rank writes, the shape of its region and the region's offsets in the full tensor."""
    if _is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(shape), list(offsets)
    return t, tuple(t.shape), [0] * t.dim()


def _slice(full: Tensor, shape: tuple[int, ...], offsets: list[int]) -> Tensor:
    for dim, (n, start) in enumerate(zip(shape, offsets, strict=True)):
        if n != full.shape[dim] or start:
            full = full.narrow(dim, start, n)
    return full


def _named_tensors(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters(remove_duplicate=remove_duplicate)
    yield from model.named_buffers(remove_duplicate=remove_duplicate)


def _tensor_aliases(model: nn.Module) -> dict[int, tuple[list[str], Tensor]]:
    """Every parameter and buffer once, with all the names it has (tied weights have several)."""
    out: dict[int, tuple[list[str], Tensor]] = {}
    for name, t in _named_tensors(model, remove_duplicate=False):
        out.setdefault(id(t), ([], t))[0].append(name)
    return out


def _non_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer
