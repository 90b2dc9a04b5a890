"""``emorl-rollout-server``: one vLLM engine in its own process serving the trainer's rollouts: the policy's
greedy answers through it equal the fused decode's on the current LoRA weights, and two DDP ranks train
against it. The trainer processes run in the training environment (torch 2.11, no vLLM) when it is there,
as a user would split them. CPU vLLM environment only (see test_vllm_rollout.py)."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.tiny import build_real_shape_qwen2_audio
from emorl_pl.modules.vllm_engine import VLLMSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_real_shape_qwen2_audio(tmp_path_factory.mktemp("vllm_server") / "model", hidden_size=128,
                                             num_heads=2, num_kv_heads=1, audio_heads=1)
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    cmd = [str(Path(sys.executable).with_name("emorl-rollout-server")), "--model-dir", str(model_dir), "--port", "0",
           "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    deadline = time.time() + 600
    url = None
    while url is None:
        found = re.search(r"serving .* on (http://\S+)", log.read_text())
        url = found.group(1) if found else None
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, "the server did not start"
        time.sleep(1)
    yield model_dir, url
    engine_processes = _descendants(proc.pid)
    assert engine_processes, "the server runs vLLM's engine core in a child process"
    proc.terminate()  # SIGTERM, as a scheduler stops a job
    proc.wait(timeout=120)
    deadline = time.time() + 60  # and the engine goes with it, not left holding its memory
    while any(Path(f"/proc/{pid}").exists() for pid in engine_processes) and time.time() < deadline:
        time.sleep(1)
    assert not [pid for pid in engine_processes if Path(f"/proc/{pid}").exists()], "engine processes outlived the server"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_policy_through_the_server_decodes_the_current_lora_weights(server):
    model_dir, url = server
    lora = LoraSettings(r=4, alpha=8)
    remote = AudioLMPolicy(str(model_dir), lora=lora, rollout_engine="vllm",
                           vllm=VLLMSettings(mode="server", server_url=url), dropout=False).load()
    fused = AudioLMPolicy(str(model_dir), lora=lora, dropout=False).load()
    prompts = remote.build_prompts(_waves(), 16000, "Which emotion? One word.")
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in remote.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    fused.load_state_dict(remote.state_dict())
    assert remote.greedy(prompts, max_new_tokens=16) == fused.greedy(prompts, max_new_tokens=16)


def _lora_policy(model_dir, **kwargs) -> AudioLMPolicy:
    torch.manual_seed(0)  # the same LoRA A init in every process
    policy = AudioLMPolicy(str(model_dir), lora=LoraSettings(r=4, alpha=8), dropout=False, **kwargs)
    policy.load(reference=False)
    with torch.no_grad():  # trained-looking adapters, so that the answers depend on them
        g = torch.Generator().manual_seed(0)
        for name, p in policy.hf_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return policy


def _waves() -> list[torch.Tensor]:
    rng = np.random.default_rng(2)
    return [torch.tensor(0.2 * rng.standard_normal(int(16000 * s)), dtype=torch.float32) for s in (1.2, 2.0)]


def _fsdp2_worker(rank: int, model_dir: str, url: str, out: str, port: int) -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        policy = _lora_policy(model_dir, rollout_engine="vllm", vllm=VLLMSettings(mode="server", server_url=url))
        policy.shard(init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
        prompts = policy.build_prompts(_waves(), 16000, "Which emotion? One word.")
        Path(out, f"rank{rank}.json").write_text(json.dumps(policy.greedy(prompts, max_new_tokens=16)))
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_through_the_server_decode_the_current_weights(server, tmp_path):
    """2 FSDP2 ranks (gloo) sync their sharded LoRA policy to one server (every weight gathered on its own,
    rank 0 writes) and the server's greedy answers equal the unsharded fused decode's on the same weights."""
    import json

    import torch.multiprocessing as mp

    model_dir, url = server
    fused = _lora_policy(model_dir)
    expected = fused.greedy(fused.build_prompts(_waves(), 16000, "Which emotion? One word."), max_new_tokens=16)
    mp.start_processes(_fsdp2_worker, args=(str(model_dir), url, str(tmp_path), 29500 + os.getpid() % 1000),
                       nprocs=2, start_method="spawn")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank


@pytest.mark.parametrize("strategy", [["ddp.yaml"], ["fsdp2.yaml"], ["full.yaml", "fsdp2.yaml", "fsdp2_full_bf16.yaml"]],
                         ids=["ddp-lora", "fsdp2-lora", "fsdp2-full-bf16"])
def test_two_ranks_train_against_one_server(server, tmp_path, strategy):
    """2 gloo processes (DDP or FSDP2), one server: 2 GRPO steps, each rank's rollouts from the server,
    the weights sent once per change by rank 0; the run ends with finite losses and a checkpoint."""
    model_dir, url = server
    main_env = REPO / ".venv" / "bin" / "emorl"  # the training environment, if built (CI builds both)
    emorl = main_env if main_env.exists() else Path(sys.executable).with_name("emorl")
    configs = [arg for name in strategy for arg in ("-c", str(REPO / "tests/configs" / name))]
    args = [
        "fit", "-c", str(REPO / "tests/configs/tiny_grpo.yaml"), *configs,
        "--model.init_args.policy.init_args.model_dir", str(model_dir),
        "--model.init_args.policy.init_args.rollout_engine", "vllm",
        "--model.init_args.policy.init_args.vllm", f"{{mode: server, server_url: '{url}'}}",
        "--model.init_args.sft_steps", "0",
        "--model.init_args.rewards", "{text_hash: {class_path: resume_helpers.text_hash_reward, weight: 1.0}}",
        "--data.init_args.root", str(tmp_path / "synth"), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(emorl), *args], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    mismatch = [float(r[k]) for r in rows for k in r if k.startswith("sampling/sampling_logp_difference/mean") and r[k]]
    # The engine decodes the trainer's weights: its log-probs differ from the trainer's by float noise only
    # (bf16 compute in the trainer: a few hundredths), not by a stale model's distance.
    assert mismatch and max(mismatch) < (0.1 if "fsdp2_full_bf16.yaml" in strategy else 1e-3), mismatch
    assert (tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt").exists()
