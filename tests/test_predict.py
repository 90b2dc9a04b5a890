"""``emorl predict`` over audio files end to end on the real-shape model: one JSONL line per input, bad
files as error lines, audio past the 30 s encoder window recorded as ``seconds_ignored``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import CONFIGS, EMORL, check_emorl  # noqa: E402


def test_predict_writes_jsonl_and_reports_bad_files(tmp_path, real_model_dir):
    from emorl_pl.export import policy_from_config

    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    good = [audio / f"good{i}.wav" for i in range(3)]
    seconds = [0.5, 0.5625, 31.25]  # the last is 1.25 s longer than the encoder's 30 s window
    for path, duration in zip(good, seconds):
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * duration))).astype(np.float32), 16000)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "broken.flac").write_bytes(b"not audio" * 20)
    missing = tmp_path / "missing.wav"

    # A trainable-only checkpoint as training writes it (LoRA weights under "policy.").
    policy = policy_from_config(CONFIGS / "tiny_grpo.yaml", real_model_dir).load()
    state = {f"policy.{k}": v for k, v in policy.state_dict().items() if ".lora_" in k}
    ckpt = tmp_path / "last.ckpt"
    # Like every Lightning checkpoint it carries the module's hyper_parameters (which omit the policy);
    # the CLI must take the model from the config, not rebuild it from these.
    hparams = {"_class_path": "emorl_pl.modules.grpo_module.GRPOModule", "labels": "iemocap4", "mode": "esr",
               "group_size": 2, "sft_steps": 2, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": state, "global_step": 1, "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": hparams}, ckpt)

    out = tmp_path / "pred.jsonl"
    paths = f"[{audio}/*.wav,{audio / 'broken.flac'},{missing}]"
    cmd = [EMORL, "predict", "-c", str(CONFIGS / "tiny_grpo.yaml"),
           "--model.init_args.policy.init_args.model_dir", real_model_dir,
           "--data", "emorl_pl.datamodules.files.AudioFilesDataModule", "--data.paths", paths,
           # tiny_grpo.yaml's synth data has max_duration 1.0, which jsonargparse carries over to the new
           # class: unset it, so that the policy crops to its window and counts what it drops
           "--data.batch_size", "2", "--data.max_duration", "null", "--trainer.logger", "false",
           "--trainer.callbacks", "emorl_pl.callbacks.prediction_writer.JSONLPredictionWriter",
           "--trainer.callbacks.output", str(out), "--ckpt_path", str(ckpt)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    check_emorl(proc)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_key = {row["key"]: row for row in rows}
    expected = [str(p) for p in good] + [str(audio / "empty.wav"), str(audio / "broken.flac"), str(missing)]
    assert sorted(by_key) == sorted(expected) and len(rows) == len(expected)
    for path, duration in zip(good, seconds):
        row = by_key[str(path)]
        assert "error" not in row and isinstance(row["text"], str) and row["text"]
        assert {"emotion", "format_ok"} <= set(row)
        assert row["seconds_ignored"] == max(duration - 30, 0.0)
    for bad in expected[3:]:
        assert by_key[bad].get("error") and "text" not in by_key[bad], by_key[bad]
