"""HSDP over nodes, launched as on a cluster: ``torchrun --nnodes 2 --nproc-per-node 2 --node-rank N ...
--no-python emorl fit`` once per "node" (both on localhost), 4 gloo processes in all. ``FSDP2Strategy`` builds a
``(dp_replicate=2, dp_shard=2)`` mesh: each unit is sharded over a node's 2 ranks and replicated across nodes.

Oracles: the same run as plain FSDP2 over 4 processes of one node (the same 4 data-parallel ranks, the same
data and random draws per rank; only the order of the gradient sums differs, so the weights agree to float
tolerance); for the collectives, the process-group ranks and the backward pass each reduction ran in; for the
checkpoint, DCP's own metadata (every element stored once, no byte written that it does not reference); for
resume, the uninterrupted run (bitwise) and the consolidated checkpoint (bitwise, after DCP reshards it for
another node count).

Runs (``tiny_grpo.yaml`` + ``resume.yaml`` + ``hsdp_small_batches.yaml``, 4 steps, cold start for 2): 1
utterance per rank per batch, so 4 ranks see 2 batches per epoch and step 3 is inside an epoch.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import (
    CONFIGS,
    EMORL,
    assert_same,
    assert_same_training_state,
    check_emorl,
    emorl_env,
    fit_args,
    last_checkpoint,
    load_checkpoint,
    logged,
    rank_states,
)

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 4
RUN = ["resume.yaml", "hsdp_small_batches.yaml"]
OVERRIDES = ["--model.init_args.sft_steps", "2"]
FULL = ["-c", str(CONFIGS / "hsdp_full.yaml")]
# Adam moves an element by up to ~lr = 1e-3 per step, and by that much in either direction where its gradient is
# ~0 (m / sqrt(v) is then a ratio of round-off): 1e-5 is 1% of a step. Observed: 4.1e-7 (LoRA), 2.3e-6 (full).
ATOL = 1e-5


def env() -> dict[str, str]:
    return {**emorl_env(), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, args: list[str], nnodes: int = 2, nproc: int = 2, timeout: float = 300) -> list[tuple[int, str]]:
    """One ``torchrun`` per node, as on a cluster (static rendezvous at node 0); (exit code, output) per node."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = [TORCHRUN, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-conf", "timeout=120",
               "--no-python", EMORL, *args]
        with open(out / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT, env=env()))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, (out / f"node{n}.log").read_text()) for n, p in enumerate(procs)]


def check_torchrun(results: list[tuple[int, str]]) -> None:
    for node, (rc, output) in enumerate(results):
        assert rc == 0, f"node {node} failed (rc={rc}):\n{output[-4000:]}"


def run_lightning(out: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``emorl fit`` started once; Lightning's launcher starts the other ranks of the node."""
    return subprocess.run([EMORL, *args], cwd=out, capture_output=True, text=True, timeout=timeout, env=env())


def args_for(out: Path, strategy: str, extra: list[str] = (), steps: int = STEPS, ckpt: str | None = None) -> list[str]:
    return fit_args(out, steps, [strategy, *RUN], ckpt=ckpt) + OVERRIDES + list(extra)


def probe(out: Path) -> list[str]:
    return ["--trainer.callbacks+", "hsdp_probe.CountCollectives", "--trainer.callbacks.out", str(out)]


def ckpt_path(run: Path, name: str) -> Path:
    return run / "csv" / "version_0" / "checkpoints" / name


def hsdp_run(out: Path, extra: list[str] = (), steps: int = STEPS, ckpt: str | None = None) -> Path:
    out.mkdir(exist_ok=True)
    check_torchrun(torchrun(out, args_for(out, "hsdp.yaml", extra, steps, ckpt)))
    return out


def fsdp4_run(out: Path, extra: list[str] = ()) -> Path:
    out.mkdir(exist_ok=True)
    check_emorl(run_lightning(out, args_for(out, "hsdp_fsdp4.yaml", extra)))
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hsdp_lora")
    return {"hsdp": hsdp_run(tmp / "hsdp", probe(tmp / "hsdp")), "fsdp4": fsdp4_run(tmp / "fsdp4", probe(tmp / "fsdp4"))}


def assert_close_runs(a: Path, b: Path) -> None:
    """Same logged values (to float tolerance) at every step, same trainable weights at the end."""
    la, lb = logged(a), logged(b)
    assert sorted(la) == sorted(lb) == list(range(STEPS))
    for step in la:
        assert sorted(la[step]) == sorted(lb[step]), f"step {step + 1}: logged keys differ"
        for key, value in la[step].items():
            assert value == pytest.approx(lb[step][key], rel=1e-4, abs=1e-6), f"step {step + 1}: {key}"
    ca, cb = last_checkpoint(a), last_checkpoint(b)
    wa, wb = ca["state_dict"], cb["state_dict"]
    assert sorted(wa) == sorted(wb) and wa
    cold = load_checkpoint(ckpt_path(a, "step2.ckpt"))["state_dict"]  # after the cold start
    worst = 0.0
    for key in wa:
        diff, moved = (wa[key] - wb[key]).abs(), (wa[key] - cold[key]).abs()
        worst = max(worst, float(diff.max()))
        assert float(diff.max()) <= ATOL, f"{key}: max |diff| {float(diff.max()):.3g}"
        # The runs' RL updates agree to 1e-4 of their size; every tensor moved by far more than the tolerance.
        assert float(diff.norm()) <= 1e-4 * float(moved.norm()), key
        assert float(moved.max()) > 10 * ATOL, f"{key} did not move: nothing compared"
    for key, value in (ca.get("emorl_folded_adapters") or {}).items():  # LoRA: the cold start, folded
        torch.testing.assert_close(value, cb["emorl_folded_adapters"][key], rtol=0, atol=ATOL)
    print(f"\nmax |weight difference| {worst:.3g}")


@pytest.mark.slow
def test_hsdp_lora_trains_as_one_node_fsdp2(lora):
    assert_close_runs(lora["hsdp"], lora["fsdp4"])


@pytest.mark.slow
def test_hsdp_full_finetuning_trains_as_one_node_fsdp2(tmp_path):
    hsdp = hsdp_run(tmp_path / "hsdp", FULL)
    fsdp4 = fsdp4_run(tmp_path / "fsdp4", FULL)
    assert_close_runs(hsdp, fsdp4)
    weights = last_checkpoint(hsdp)["state_dict"]
    assert not any(".lora_" in k for k in weights) and len(weights) > 20


def collectives(run: Path, rank: int) -> dict[str, Any]:
    return json.loads((run / f"collectives_rank{rank}.json").read_text())


@pytest.mark.slow
def test_hsdp_reduces_gradients_once_per_step_inside_then_across_nodes(lora):
    """Per optimizer step, each unit's gradient is reduce-scattered over its node's ranks and all-reduced over
    the other node's rank with the same shard, once, in the step's last backward pass; weights are
    all-gathered within the node only. The 1-node FSDP2 run reduce-scatters over all 4 ranks."""
    for rank in range(4):
        node = [rank - rank % 2, rank - rank % 2 + 1]
        replicas = [rank % 2, rank % 2 + 2]
        for run, rs_group, ar_group, gather in ((lora["hsdp"], node, replicas, [node]),
                                                (lora["fsdp4"], [0, 1, 2, 3], None, [[0, 1, 2, 3]])):
            record = collectives(run, rank)
            windows, units = record["windows"], record["grad_units"]
            assert record["optimizer_steps"] == STEPS == len(windows) and units > 0
            assert any(w["backwards"] > 1 for w in windows), "no step with several backward passes: nothing tested"
            for i, w in enumerate(windows):
                last = w["backwards"]
                assert w["reduce_scatter"] == [[last, rs_group]] * units, f"rank {rank} step {i + 1}"
                assert w["all_reduce"] == ([[last, ar_group]] * units if ar_group else []), f"rank {rank} step {i + 1}"
            assert record["gather_groups"] == gather, rank


@pytest.mark.slow
def test_hsdp_checkpoint_stores_each_element_once(lora):
    """DCP writes a replicated shard once, not once per replica group: every stored chunk tiles its tensor
    exactly once, and the .distcp files hold nothing but the bytes the metadata points to."""
    import torch.distributed.checkpoint as dcp

    sizes = {}
    for name, run in lora.items():
        ckpt = ckpt_path(run, "step3.ckpt")
        meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
        for key, item in meta.state_dict_metadata.items():
            if hasattr(item, "chunks"):  # a tensor: its chunks cover it once
                assert sum(c.sizes.numel() for c in item.chunks) == item.size.numel(), key
        files = sorted(ckpt.glob("*.distcp"))
        referenced = {}
        for info in meta.storage_data.values():
            referenced[info.relative_path] = referenced.get(info.relative_path, 0) + info.length
        assert {f.name: f.stat().st_size for f in files} == referenced, name
        sizes[name] = (len(files), sum(referenced.values()))
    print(f"\nstep-3 checkpoint .distcp files / bytes: HSDP 2x2 {sizes['hsdp']}, FSDP2 1x4 {sizes['fsdp4']}")
    # Complete: consolidated, it holds what the 1-node run's checkpoint holds.
    hsdp, fsdp4 = (load_checkpoint(ckpt_path(lora[n], "step3.ckpt"))["state_dict"] for n in ("hsdp", "fsdp4"))
    assert sorted(hsdp) == sorted(fsdp4) and hsdp
    for key in hsdp:
        torch.testing.assert_close(hsdp[key], fsdp4[key], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_hsdp_resume_equals_uninterrupted_run_on_every_rank(lora, tmp_path):
    full = lora["hsdp"]
    resumed = hsdp_run(tmp_path / "resumed", ckpt=str(ckpt_path(full, "step3.ckpt")))
    a, b = logged(full), logged(resumed)
    assert sorted(b) == [3], "the resumed run must start at step 4 (index 3)"
    assert b[3] == a[3]
    assert a[3]["kl"] > 0 and a[3]["grad_norm"] > 0  # RL moves the weights after the resume point
    for rank, (x, y) in enumerate(zip(rank_states(full, 4), rank_states(resumed, 4))):
        assert x["global_step"] == y["global_step"] == STEPS and x["params"]
        for key in ("params", "optimizer", "lr"):
            assert_same(x[key], y[key], f"rank {rank} {key}")
    assert_same_training_state(last_checkpoint(full), last_checkpoint(resumed))


@pytest.mark.slow
def test_hsdp_checkpoint_resumes_on_one_node_of_two_at_an_epoch_boundary(lora, tmp_path):
    """2 nodes x 2 -> 1 node x 2: DCP reshards the weights and optimizer state exactly (bitwise equal to the
    checkpoint's, gathered), and at an epoch boundary the data stream starts the next epoch on 2 ranks."""
    ckpt = ckpt_path(lora["hsdp"], "step2.ckpt")
    out = tmp_path / "one_node"
    out.mkdir()
    extra = ["--trainer.num_nodes", "1", "--trainer.devices", "2",
             "--trainer.callbacks+", "hsdp_probe.SaveLoadedState", "--trainer.callbacks.out", str(out)]
    check_emorl(run_lightning(out, args_for(out, "hsdp.yaml", extra, steps=3, ckpt=str(ckpt))))
    loaded, saved = torch.load(out / "loaded.pt", weights_only=False), load_checkpoint(ckpt)
    assert loaded["global_step"] == saved["global_step"] == 2
    assert_same(loaded["state_dict"], saved["state_dict"], "weights")
    assert_same(loaded["optimizer"], saved["optimizer_0"], "optimizer")
    assert sorted(logged(out)) == [2], "one more step, the third"
    # 8 utterances on 2 ranks, 1 per batch: 4 batches per epoch; epoch 1 began on 2 ranks at the resume.
    data = torch.load(ckpt_path(out, "step3.ckpt") / "meta.pt", weights_only=False)["SynthDataModule"]
    assert (data["epoch"], data["batches"], data["world_size"]) == (1, 1, 2)


@pytest.mark.slow
def test_hsdp_checkpoint_inside_an_epoch_on_fewer_ranks_is_refused(lora, tmp_path):
    """The rest of an epoch laid out for 4 ranks cannot be replayed on 2: refused before any step, with the
    data stream's message (README, Resume: "refused with a message giving the saved and current values")."""
    ckpt = ckpt_path(lora["hsdp"], "step3.ckpt")
    extra = ["--trainer.num_nodes", "1", "--trainer.devices", "2"]
    proc = run_lightning(tmp_path, args_for(tmp_path, "hsdp.yaml", extra, ckpt=str(ckpt)))
    assert proc.returncode != 0
    assert "cannot resume the training data stream at epoch 1, batch 1" in proc.stderr, proc.stderr[-3000:]
    assert "world_size: saved 4, current 2" in proc.stderr
    assert not (tmp_path / "csv" / "version_0" / "checkpoints").exists() or not list(
        (tmp_path / "csv" / "version_0" / "checkpoints").iterdir()), "no step ran"


@pytest.mark.slow
def test_launch_of_one_node_of_two_stops_with_a_message(tmp_path):
    """The config says 2 nodes x 2 devices; torchrun was started on one node only (--nnodes 1). Every rank stops before joining
    the process group, naming both, instead of waiting for ranks that never come."""
    start = time.monotonic()
    results = torchrun(tmp_path, args_for(tmp_path, "hsdp.yaml"), nnodes=1, nproc=2, timeout=120)
    elapsed = time.monotonic() - start
    rc, output = results[0]
    assert rc != 0
    expected = ("torchrun started WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, GROUP_WORLD_SIZE=1, but the config asks for "
                "trainer.num_nodes=2 x trainer.devices=2 = 4 processes (2 per node)")
    assert output.count(expected) == 2, output[-3000:]  # each rank says it
    assert "Initializing distributed" not in output, "a rank joined the process group"
    print(f"\nstopped after {elapsed:.1f} s")


# ------------------------------------------------------------------ in-process checks of the strategy's arithmetic
def test_mesh_shape_defaults_to_sharding_within_a_node():
    from emorl_pl.strategies import mesh_shape

    assert mesh_shape(16, 8) == (2, 8)  # 2 nodes x 8: shard within a node, replicate across
    assert mesh_shape(8, 8) == (1, 8)  # one node: plain FSDP2
    assert mesh_shape(16, 8, shard_degree=16) == (1, 16)  # FSDP2 across both nodes
    assert mesh_shape(16, 8, replicate_degree=4) == (4, 4)
    assert mesh_shape(16, 8, shard_degree=4, replicate_degree=4) == (4, 4)
    with pytest.raises(ValueError, match=r"must equal the world size 16 .*replicate_degree=3, shard_degree=\?"):
        mesh_shape(16, 8, replicate_degree=3)
    with pytest.raises(ValueError, match="replicate_degree=2, shard_degree=4"):
        mesh_shape(16, 8, shard_degree=4, replicate_degree=2)


def test_strategy_refuses_a_degree_that_is_not_a_positive_integer():
    from emorl_pl.strategies import FSDP2Strategy

    with pytest.raises(ValueError, match="shard_degree must be a positive integer or 'auto', got 0"):
        FSDP2Strategy(shard_degree=0)


def test_slurm_launch_that_is_not_num_nodes_x_devices_is_named(monkeypatch):
    """SLURM started one task per node (as for torchrun) but emorl runs without torchrun: SLURM_NTASKS=2."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from emorl_pl.strategies import LaunchMismatchError, check_launch

    for name, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "emorl"}.items():
        monkeypatch.setenv(name, value)
    slurm = SLURMEnvironment()
    with pytest.raises(LaunchMismatchError, match=r"SLURM started SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1, "
                       r"SLURM_NNODES=2, but the config asks for trainer.num_nodes=2 x trainer.devices=8 = 16"):
        check_launch(slurm, num_nodes=2, devices=8)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    check_launch(slurm, num_nodes=2, devices=8)  # srun --nodes 2 --ntasks-per-node 8: as configured


def test_torchrun_launch_with_the_right_world_size_but_not_per_node_is_named(monkeypatch):
    """4 processes on one node for a config of 2 nodes x 2: WORLD_SIZE matches, the per-node count does not
    (local ranks 2 and 3 have no device of their own)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    from emorl_pl.strategies import LaunchMismatchError, check_launch

    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "GROUP_RANK": "0", "LOCAL_RANK": "3",
                        "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchMismatchError, match=r"torchrun started WORLD_SIZE=4, LOCAL_WORLD_SIZE=4, "
                       r"GROUP_WORLD_SIZE=1, but the config asks for trainer.num_nodes=2 x trainer.devices=2 = 4"):
        check_launch(TorchElasticEnvironment(), num_nodes=2, devices=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    check_launch(TorchElasticEnvironment(), num_nodes=2, devices=2)


def test_processes_lightning_starts_itself_are_not_compared(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    from emorl_pl.strategies import LaunchMismatchError, check_launch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    check_launch(LightningEnvironment(), num_nodes=2, devices=2)  # its launcher starts num_nodes x devices
    monkeypatch.setenv("LOCAL_RANK", "0")  # started by hand, e.g. a launcher of one's own
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LaunchMismatchError, match="the launcher started WORLD_SIZE=3, but the config asks for"):
        check_launch(LightningEnvironment(), num_nodes=2, devices=2)
