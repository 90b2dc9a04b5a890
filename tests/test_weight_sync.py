"""The weights a rollout engine gets (``emorl_pl.modules.weight_sync``): LoRA merged as peft merges it, written
as hub-layout safetensors shards that transformers reads back, and under FSDP2 (2 gloo processes, gathered one
weight at a time) the very same files as one unsharded process writes. For Qwen3-Omni (fused mixture-of-experts
weights in memory, one tensor per expert published) the policy's sync writes what transformers' own save of
the peft-merged model writes, tensor by tensor, each fused weight split per expert as it streams."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from emorl_pl.modules.hub_layout import (
    HubConverter,
    hub_key_map,
    meta_model,
    published_names,
    save_in_hub_layout,
)
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.weight_sync import INDEX_NAME, iter_merged_weights, write_hub_shards

# moved in a trained-looking state without LoRA: the attention queries and (MoE) the fused expert weights
MOVED = ("q_proj.weight", "experts.gate_up_proj", "experts.down_proj")


def _policy(model_dir: str, lora: bool) -> AudioLMPolicy:
    torch.manual_seed(0)
    policy = AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8) if lora else None, dropout=False)
    policy.load(reference=False)
    with torch.no_grad():  # a trained-looking state: non-zero adapters, moved base weights
        g = torch.Generator().manual_seed(1)
        for name, p in policy.hf_model.named_parameters():
            if "lora_B" in name or (not lora and name.endswith(MOVED)):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_lora_merge_equals_peft_merge_and_the_shards_load_in_transformers(toy_model_dir, tmp_path):
    from peft.tuners.lora import LoraLayer
    from transformers import Qwen2AudioForConditionalGeneration

    policy = _policy(toy_model_dir, lora=True)
    oracle = copy.deepcopy(policy.hf_model)
    for module in oracle.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # peft's own merge, in place on the copy
    expected = {k.replace(".base_layer.", "."): v for k, v in oracle.state_dict().items() if "lora_" not in k}
    before = {k: v.clone() for k, v in policy.hf_model.state_dict().items()}

    got = dict(iter_merged_weights(policy.hf_model))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
    for name, value in policy.hf_model.state_dict().items():  # out of place: training goes on untouched
        assert torch.equal(value, before[name]), name

    key_map = hub_key_map(meta_model(toy_model_dir))
    folder = tmp_path / "engine"
    (folder / "stale.safetensors").parent.mkdir(parents=True)
    (folder / "stale.safetensors").write_bytes(b"old")
    written = write_hub_shards(iter_merged_weights(policy.hf_model), key_map, folder, max_shard_bytes=1 << 20)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1 and not (folder / "stale.safetensors").exists()
    assert sorted(written) == sorted(_read(folder)) == sorted(key_map.values())
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]  # what transformers / vLLM read first
    assert {k: (folder / f).exists() and k in load_file(str(folder / f)) for k, f in index.items()} == dict.fromkeys(
        key_map.values(), True)
    for file in files:  # each file within the budget unless it is a single tensor larger than it
        tensors = load_file(str(file))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 1 << 20
    (folder / "config.json").write_text((Path(toy_model_dir) / "config.json").read_text())
    loaded = Qwen2AudioForConditionalGeneration.from_pretrained(folder).state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name


def test_a_weight_the_engine_needs_but_never_came_is_an_error(tmp_path):
    weights = [("a", torch.zeros(2))]
    with pytest.raises(RuntimeError, match="does not have: \\['b'\\]"):
        write_hub_shards(iter(weights), {"a": "x.a", "b": "x.b"}, tmp_path)


class _FolderEngine:
    """Stands in for the vLLM engine in ``AudioLMPolicy.sync_engine_weights``: keeps a copy of each folder it is
    told to reload from."""

    def __init__(self, keep: Path) -> None:
        self.keep, self.loads = keep, 0

    def load_weights(self, folder: Path) -> None:
        import shutil

        self.loads += 1
        shutil.copytree(folder, self.keep / f"sync{self.loads}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_qwen3_omni_sync_writes_the_published_checkpoint_one_tensor_per_expert(qwen3_omni_model_dir, tmp_path, lora):
    """The policy's engine sync (``rollout_engine: vllm``) of the real-shape Qwen3-Omni (128 experts, fused
    ``gate_up_proj`` / ``down_proj`` in memory) writes every tensor of the published checkpoint vLLM loads,
    each equal to what ``save_in_hub_layout`` (transformers' own ``save_pretrained``) writes for the same
    weights, LoRA merged by peft's ``merge_and_unload``; by hand, expert e's gate / up / down are the rows of
    the fused weights. Before: the sync refused the model (its published tensors are not renamed ones)."""
    policy = _policy(qwen3_omni_model_dir, lora)
    policy._engine = engine = _FolderEngine(tmp_path)  # the sync's target; no vLLM in this environment
    assert policy.sync_engine_weights() is True and engine.loads == 1
    got = _read(tmp_path / "sync1")

    merged = copy.deepcopy(policy.model)
    merged = merged.merge_and_unload() if lora else merged
    save_in_hub_layout(merged, tmp_path / "oracle")
    expected = _read(tmp_path / "oracle")
    assert sorted(got) == sorted(expected) == published_names(meta_model(qwen3_omni_model_dir))
    n_layers = len(policy.hf_model.model.layers)
    assert {n for n in got if ".experts." in n} == {
        f"thinker.model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(n_layers) for e in range(128)
        for p in ("gate_proj", "up_proj", "down_proj")}
    for name, value in expected.items():  # LoRA: our fp32 merge vs peft's, summed in other orders
        if lora:
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], value), name
    experts = policy.hf_model.model.layers[1].mlp.experts
    inter = experts.down_proj.shape[-1]
    for e in (0, 77, 127):
        prefix = f"thinker.model.layers.1.mlp.experts.{e}."
        assert torch.equal(got[prefix + "gate_proj.weight"], experts.gate_up_proj[e, :inter])
        assert torch.equal(got[prefix + "up_proj.weight"], experts.gate_up_proj[e, inter:])
        assert torch.equal(got[prefix + "down_proj.weight"], experts.down_proj[e])
    index = json.loads((tmp_path / "sync1" / INDEX_NAME).read_text())["weight_map"]
    assert sorted(index) == sorted(got)
    assert policy.sync_engine_weights() is False and engine.loads == 1  # unchanged: nothing sent


def test_a_published_tensor_the_layout_has_but_never_written_is_an_error(qwen3_omni_model_dir, tmp_path):
    """A fused expert weight that never arrives leaves 256 published tensors unwritten: refused, not a folder
    vLLM would half-load."""
    converter = HubConverter(meta_model(qwen3_omni_model_dir))
    policy = _policy(qwen3_omni_model_dir, lora=False)
    dropped = "model.layers.0.mlp.experts.gate_up_proj"
    weights = ((n, t) for n, t in iter_merged_weights(policy.hf_model) if n != dropped)
    with pytest.raises(RuntimeError, match=f"does not have: \\['{dropped}'\\]"):
        write_hub_shards(weights, converter, tmp_path)


def _sharded_worker(rank: int, model_dir: str, out: str, port: int, lora: bool, bf16: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = _policy(model_dir, lora)
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else None
        policy.shard(init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)), mp_policy=mp_policy)
        from torch.distributed.tensor import DTensor

        calls = []
        real = DTensor.full_tensor

        def counting(self, *args, **kwargs):
            calls.append(tuple(self.shape))
            return real(self, *args, **kwargs)

        DTensor.full_tensor = counting
        try:
            write_hub_shards(iter_merged_weights(policy.hf_model, policy.loaded_models.compute_dtype),
                             HubConverter(meta_model(model_dir)), Path(out) / "sharded" if rank == 0 else None,
                             max_shard_bytes=1 << 20)
        finally:
            DTensor.full_tensor = real
        Path(out, f"gathers{rank}").write_text(str(len(calls)))  # the shapes: one whole weight at a time
        # Leave together: rank 1 tearing gloo down while rank 0 still writes the last shard aborted the
        # process once in CI ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("model,lora,bf16", [("toy_model_dir", True, False), ("toy_model_dir", False, True),
                                             ("qwen3_omni_model_dir", False, True)],
                         ids=["lora", "full-bf16", "qwen3-omni-full-bf16"])
def test_fsdp2_ranks_write_the_files_one_process_writes(request, tmp_path, model, lora, bf16):
    """Qwen3-Omni: each rank holds 64 of a layer's 128 experts; the gathered fused weight is split per expert."""
    model_dir = request.getfixturevalue(model)
    single = _policy(model_dir, lora)
    write_hub_shards(iter_merged_weights(single.hf_model, torch.bfloat16 if bf16 else None),
                     HubConverter(meta_model(model_dir)), tmp_path / "single", max_shard_bytes=1 << 20)
    port = 29500 + (os.getpid() + 11 * (lora + 2 * bf16 + 4 * (model != "toy_model_dir"))) % 1000
    mp.start_processes(_sharded_worker, args=(model_dir, str(tmp_path), port, lora, bf16), nprocs=2,
                       start_method="spawn")
    expected, got = _read(tmp_path / "single"), _read(tmp_path / "sharded")
    assert got.keys() == expected.keys() and sorted(got) == published_names(meta_model(model_dir))
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert not (tmp_path / "sharded" / "gathers").exists()
    gathers = [int((tmp_path / f"gathers{r}").read_text()) for r in (0, 1)]
    # One gather per weight (+ 2 per adapted weight for its A and B), the same on both ranks, the non-writer too
    n_weights = len(dict(iter_merged_weights(single.hf_model)))
    n_adapted = sum(1 for name, _ in single.hf_model.named_parameters() if "lora_A" in name)
    assert gathers[0] == gathers[1] == n_weights + 2 * n_adapted
