"""Loading without a whole copy of the model per process (``emorl_pl.modules.loading``).

Two gloo processes shard the real-shape Qwen2-Audio (its 156,032-row embedding and lm_head are nearly all of
its bytes) as ``configure_model`` does, ``load(reference=False)`` then ``shard(mesh)``, for LoRA, full
fine-tuning (policy and reference in float32) and full fine-tuning with bfloat16 compute (reference in
bfloat16). Each process's peak RSS over that load is measured (``VmHWM`` after resetting it through
``/proc/self/clear_refs``): it must stay at its own shards (the old path, ``from_pretrained`` on every rank then
``fully_shard``, peaked at one more model or two). The oracle for the values is that old path in the same
process: ``from_pretrained`` in full, then the same ``shard_model``; every local shard, buffer, dtype and
``requires_grad`` must be identical, LoRA's initial adapters included (same seed).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings

CASES = ("lora", "full", "full_bf16")  # full_bf16: fp32 policy, bf16 compute -> bf16 reference


def _status(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _settings(case: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    lora = LoraSettings(r=4, alpha=8) if case == "lora" else None
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case == "full_bf16" else None
    return lora, mp_policy


def _local_bytes(model) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def _differences(new, old) -> list[str]:
    """Names whose local shard, placement, dtype, requires_grad (parameters) or value (buffers) differ."""
    out = []
    new_params, old_params = dict(new.named_parameters()), dict(old.named_parameters())
    if new_params.keys() != old_params.keys():
        return [f"parameter names differ: {sorted(new_params.keys() ^ old_params.keys())[:5]}"]
    for name, p in new_params.items():
        q = old_params[name]
        same = (type(p) is type(q) and p.placements == q.placements and p.dtype == q.dtype
                and p.requires_grad == q.requires_grad and torch.equal(p.to_local(), q.to_local()))
        if not same:
            out.append(name)
    new_buffers, old_buffers = dict(new.named_buffers()), dict(old.named_buffers())
    if new_buffers.keys() != old_buffers.keys():
        return out + [f"buffer names differ: {sorted(new_buffers.keys() ^ old_buffers.keys())[:5]}"]
    out += [name for name, b in new_buffers.items() if not torch.equal(b, old_buffers[name])]
    return out


def _worker(rank: int, model_dir: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    record: dict = {}
    try:
        from peft import LoraConfig, get_peft_model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (imported before the measurement)
        from transformers import AutoConfig, AutoProcessor, Qwen2AudioForConditionalGeneration

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        # Not measured: the processor (its 151k-token tokenizer is ~100 MB, loaded once here and handed to
        # every policy) and the first imports of peft and the model's module.
        processor = AutoProcessor.from_pretrained(model_dir)
        AutoProcessor.from_pretrained = lambda *args, **kwargs: processor
        with torch.device("meta"):
            warm = Qwen2AudioForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
        get_peft_model(warm, LoraConfig(r=4, target_modules=["q_proj"]))
        del warm

        policies = {}
        for case in CASES:
            lora, mp_policy = _settings(case)
            torch.manual_seed(0)
            policy = AudioLMPolicy(model_dir, lora=lora)
            before = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            policy.load(reference=False)
            policy.shard(mesh, mp_policy=mp_policy)
            peak = _status("VmHWM") - before
            with policy.reference() as ref:
                local = _local_bytes(policy.hf_model) + (_local_bytes(ref) if lora is None else 0)
            record[case] = {"peak": peak, "local": local}
            policies[case] = policy
        Path(out, f"rss{rank}.json").write_text(json.dumps(record))

        from emorl_pl.modules import reference as ref_weights
        from emorl_pl.modules.sharding import shard_model

        for case, policy in policies.items():
            lora, mp_policy = _settings(case)
            torch.manual_seed(0)
            old = AudioLMPolicy(model_dir, lora=lora).load()  # from_pretrained in full, LoRA on it
            shard_model(old.hf_model, mesh, extra_units=list(old.family.direct_call_modules(old.hf_model).values()),
                        mp_policy=mp_policy)
            diffs = {"policy": _differences(policy.hf_model, old.hf_model)}
            if lora is None:
                dtype = mp_policy.param_dtype if mp_policy is not None else torch.float32
                oracle = ref_weights.load_frozen(Qwen2AudioForConditionalGeneration, model_dir, dtype=dtype,
                                                 attn_implementation="sdpa")
                ref_weights.shard_like_policy(oracle, policy.family, mesh)
                with policy.reference() as ref:
                    diffs["reference"] = _differences(ref, oracle)
            record[f"{case}_differences"] = diffs
        # HSDP (FSDP2Strategy's 2-D mesh, 2 replicas of 1 shard): placements (Replicate(), Shard(0)).
        hsdp = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
        policy = AudioLMPolicy(model_dir, lora=None).load(reference=False)
        policy.shard(hsdp)
        old = AudioLMPolicy(model_dir, lora=None).load()
        shard_model(old.hf_model, hsdp, extra_units=list(old.family.direct_call_modules(old.hf_model).values()))
        oracle = ref_weights.load_frozen(Qwen2AudioForConditionalGeneration, model_dir, dtype=torch.float32,
                                         attn_implementation="sdpa")
        ref_weights.shard_like_policy(oracle, policy.family, hsdp)
        with policy.reference() as ref:
            record["hsdp_differences"] = {"policy": _differences(policy.hf_model, old.hf_model),
                                          "reference": _differences(ref, oracle),
                                          "placements": sorted({str(p.placements) for p in ref.parameters()})}
    except Exception:
        record["error"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_loads(real_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lean")
    mp.start_processes(_worker, args=(real_model_dir, str(out), 29500 + (os.getpid() + 41) % 1000), nprocs=2,
                       start_method="spawn")
    from transformers import AutoConfig, Qwen2AudioForConditionalGeneration

    with torch.device("meta"):  # one model in the policy dtype (float32)
        model = Qwen2AudioForConditionalGeneration(AutoConfig.from_pretrained(real_model_dir))
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], model_bytes


def test_sharded_load_peaks_at_the_process_own_shards(sharded_loads):
    records, model_bytes = sharded_loads
    for rank, record in enumerate(records):
        for case in CASES:
            assert case in record, record.get("error")
            peak, local = record[case]["peak"], record[case]["local"]
            # Beyond its own shards, a process holds at most the staging of one read and the allocator's slack;
            # the old path held one more model (LoRA, full) or more (full, bfloat16 reference).
            assert peak - local < 0.15 * model_bytes, (rank, case, peak / model_bytes, local / model_bytes)
        # Full fine-tuning in float32: policy half + reference half = one model, not two.
        assert records[rank]["full"]["peak"] < 1.15 * model_bytes
        assert records[rank]["lora"]["peak"] < 0.65 * model_bytes


def test_sharded_load_equals_full_load_then_shard(sharded_loads):
    records, _ = sharded_loads
    for rank, record in enumerate(records):
        assert "error" not in record, record["error"]
        for case in CASES:
            diffs = record[f"{case}_differences"]
            assert diffs == {"policy": []} if case == "lora" else {"policy": [], "reference": []}, (rank, case, diffs)
        hsdp = record["hsdp_differences"]
        assert hsdp["policy"] == [] and hsdp["reference"] == [], (rank, hsdp)
        assert hsdp["placements"] == ["(Replicate(), Shard(dim=0))"], hsdp


def _tensors(module) -> dict[str, tuple]:
    return {name: (t.dtype, t.requires_grad, t.detach().clone())
            for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
    differ = [name for name in want if got[name][:2] != want[name][:2] or not torch.equal(got[name][2], want[name][2])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("lora", [LoraSettings(r=4, alpha=8), None], ids=["lora", "full"])
def test_meta_load_used_before_shard_reads_in_full_like_from_pretrained(real_model_dir, lora):
    torch.manual_seed(0)
    policy = AudioLMPolicy(real_model_dir, lora=lora).load(reference=False)
    base = [p for name, p in policy.named_parameters() if "lora_" not in name]
    assert base and all(p.is_meta for p in base), "load(reference=False) must not read the weights"
    policy.load()  # any use but shard: read in full, as before
    torch.manual_seed(0)
    old = AudioLMPolicy(real_model_dir, lora=lora).load()  # from_pretrained
    _assert_same_tensors(_tensors(policy), _tensors(old))  # LoRA's initial adapters too
    assert policy.training == old.training and policy.hf_model.training == old.hf_model.training
    assert policy.hf_model.config.to_dict() == old.hf_model.config.to_dict()
    assert policy.hf_model.generation_config.to_dict() == old.hf_model.generation_config.to_dict()
    if lora is None:
        with policy.reference() as ref, old.reference() as old_ref:
            _assert_same_tensors(_tensors(ref), _tensors(old_ref))


def _trained_full_finetuning(model_dir: str, ckpt_dir: Path) -> tuple[Path, dict, dict]:
    """A full fine-tuning policy with every trainable weight moved, saved as a trainable-only checkpoint file
    (with an optimizer state, as Lightning writes) and as a sharded folder; returns the config and the weights
    (all, and the trained ones) the export must load."""
    import torch.distributed.checkpoint as dcp
    import yaml

    policy = AudioLMPolicy(model_dir, lora=None).load(reference=False)
    policy.load()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    trained = {f"policy.{name}": p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    everything = {name: t.detach().clone() for name, t in policy.state_dict().items()}
    optimizer = {"state": {i: {"exp_avg": torch.ones_like(t)} for i, t in enumerate(trained.values())}}
    torch.save({"state_dict": trained, "optimizer_states": [optimizer], "global_step": 3}, ckpt_dir / "last.ckpt")
    dcp.save({"state_dict": trained, "optimizer_0": {f"{i}.exp_avg": torch.ones_like(t) for i, t in
                                                     enumerate(trained.values())}},
             checkpoint_id=ckpt_dir / "sharded.ckpt", no_dist=True)
    config = ckpt_dir / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"policy": {"init_args": {
        "model_dir": model_dir, "lora": None}}}}}))
    return config, everything, trained


def test_export_loads_checkpoint_over_an_empty_model(toy_model_dir, tmp_path):
    from emorl_pl.export import load_trained_policy

    config, everything, trained = _trained_full_finetuning(toy_model_dir, tmp_path)
    frozen = [name for name in everything if f"policy.{name}" not in trained]
    assert frozen and trained, "both the checkpoint and the base folder must supply weights"
    for ckpt in ("last.ckpt", "sharded.ckpt"):
        policy = load_trained_policy(config, tmp_path / ckpt)
        got = {name: t for name, t in policy.state_dict().items()}
        assert got.keys() == everything.keys()
        assert [n for n in everything if not torch.equal(got[n], everything[n])] == [], ckpt
        assert policy.loaded_models.reference is None, "an export makes no frozen reference copy"


def test_safetensors_rows_equal_the_safetensors_library(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from emorl_pl.modules import loading

    g = torch.Generator().manual_seed(0)
    files = {"model-1.safetensors": {"a": torch.randn(7, 5, generator=g),
                                     "b": torch.randn(9, generator=g).to(torch.bfloat16)},
             "model-2.safetensors": {"c": torch.tensor(2.5), "d": torch.arange(6).reshape(2, 3)}}
    for name, tensors in files.items():
        save_file(tensors, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {key: name for name, tensors in files.items() for key in tensors}}))
    folder = loading.SafetensorsFolder(tmp_path)
    monkeypatch.setattr(loading, "READ_CHUNK_BYTES", 8)  # casting reads in several pieces
    for name, tensors in files.items():
        with safe_open(str(tmp_path / name), framework="pt") as f:
            for key in tensors:
                whole = f.get_tensor(key)
                assert torch.equal(folder.read(key), whole) and folder.read(key).dtype == whole.dtype, key
                if whole.dim():
                    assert torch.equal(folder.read(key, 1, 2), f.get_slice(key)[1:2]), key
                    cast = torch.empty((whole.shape[0] - 1, *whole.shape[1:]), dtype=torch.float64)
                    folder.read_into(key, cast, 1)  # rows 1: of the tensor, cast to float64
                    assert torch.equal(cast, whole[1:].double()), key

    cut = tmp_path / "cut"
    cut.mkdir()
    data = (tmp_path / "model-1.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '(a|b)'.*do not fit"):
        loading.SafetensorsFolder(cut)


def test_folder_with_a_missing_weight_loads_in_full_as_before(toy_model_dir, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(toy_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("multi_modal_projector.linear.bias"))
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="emorl_pl.modules.loading"):
        policy = AudioLMPolicy(str(folder), lora=None).load(reference=False)
    assert "multi_modal_projector.linear.bias" in caplog.text and "in full" in caplog.text
    assert not any(p.is_meta for p in policy.parameters()), "the fallback is from_pretrained, as before"
