"""Evaluation and prediction never desynchronise ranks: a sample or a file that cannot be decoded keeps
its row as a flagged placeholder (``is_pad``, an ``errors`` entry), so every rank runs the same number of
steps, and ranks of a sharded model never wait for a collective call that does not come."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from emorl_pl.datamodules.files import AudioFilesDataModule
from emorl_pl.datamodules.shards import AudioSample, SplitWriter
from emorl_pl.datamodules.webdataset import ShardDataModule

LABELS = ["neutral", "happy", "angry", "sad"]


def _flac(seconds: float = 0.1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(int(16000 * seconds), 0.1, np.float32), 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def append_records(split_dir: Path, records: list[tuple[str, bytes, str]]) -> None:
    """A shard of ``(key, flac bytes, label)`` records added to a split and to its index.json."""
    name = "shard-000099.tar"
    with tarfile.open(split_dir / name, "w") as tar:
        for key, flac, label in records:
            meta = {"label": label, "corpus_label": label, "corpus": "toy", "speaker": "x"}
            for ext, data in (("flac", flac), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = json.loads((split_dir / "index.json").read_text())
    index["shards"].append(name)
    index["num_samples"] += len(records)
    for _, _, label in records:
        index["label_counts"][label] = index["label_counts"].get(label, 0) + 1
    (split_dir / "index.json").write_text(json.dumps(index))


@pytest.fixture
def valid_with_corrupt_sample(tmp_path) -> Path:
    """7 good samples then one whose FLAC is truncated: usable index 7, so rank 1 of 2 owns it, and with
    batch size 1 it is a batch of its own."""
    with SplitWriter(tmp_path, "valid") as w:
        for i in range(6):
            w.write(AudioSample(f"v{i}", np.full(1600, 0.1, np.float32), 16000,
                                {"label": LABELS[i % 4], "corpus_label": "x", "corpus": "toy", "speaker": "s"}))
    append_records(tmp_path / "valid", [("v6", _flac(), "sad"), ("corrupt", _flac()[:40], "angry")])
    return tmp_path / "valid"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_undecodable_eval_sample_keeps_its_rank_in_step(valid_with_corrupt_sample, workers, batch_size):
    dm = ShardDataModule(valid=str(valid_with_corrupt_sample), eval_batch_size=batch_size, num_workers=workers)
    per_rank = []
    for rank in range(2):
        loader = dm.build_eval_loader(str(valid_with_corrupt_sample), "valid", rank=rank, world_size=2)
        per_rank.append(list(loader))
        assert len(per_rank[-1]) == len(loader)
    # 8 samples with a label, 4 per rank: both ranks run ceil(4 / batch_size) steps
    assert [len(batches) for batches in per_rank] == [-(-4 // batch_size)] * 2
    real, placeholders = [], []
    for rank, batches in enumerate(per_rank):
        for b in batches:
            assert len(b["keys"]) == len(b["waveforms"]) == len(b["is_pad"]) == len(b["labels"])
            for key, wav, pad, label in zip(b["keys"], b["waveforms"], b["is_pad"], b["labels"]):
                (placeholders if key == "corrupt" else real).append((rank, key, pad, wav.numel(), label))
            if "corrupt" in b["keys"]:
                assert [e["key"] for e in b["errors"]] == ["corrupt"] and "corrupt" in b["errors"][0]["error"]
            else:
                assert b["errors"] == []
    assert placeholders == [(1, "corrupt", True, 1600, "angry")]  # 0.1 s of silence, flagged
    assert sorted(k for _, k, pad, _, _ in real if not pad) == [f"v{i}" for i in range(7)]
    assert dm.skipped["valid"] == 1


def _write_files(folder: Path) -> list[str]:
    folder.mkdir()
    paths = []
    for i in range(5):
        path = folder / f"f{i}.wav"
        if i == 3:
            path.write_bytes(b"not audio" * 10)  # files[3] -> rank 1 of 2
        else:
            sf.write(path, np.full(800 + 100 * i, 0.1, np.float32), 8000)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_unreadable_predict_file_keeps_its_row_and_ranks_in_step(tmp_path, workers, batch_size):
    paths = _write_files(tmp_path / "audio")
    dm = AudioFilesDataModule(paths=str(tmp_path / "audio"), batch_size=batch_size, num_workers=workers)
    steps, rows, errors = [], [], []
    for rank in range(2):
        loader = dm.build_predict_loader(rank=rank, world_size=2)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            assert len(b["keys"]) == len(b["waveforms"]) == len(b["is_pad"])
            rows += [(rank, k, p, w.numel()) for k, p, w in zip(b["keys"], b["is_pad"], b["waveforms"])]
            errors += b["errors"]
    # 5 files: 3 + 2, the short rank gets a padding row, so both run ceil(3 / batch_size) steps
    assert steps == [-(-3 // batch_size)] * 2
    readable = [(r, p, False, 2 * (800 + 100 * i)) for i, (r, p) in enumerate(zip([0, 1, 0, 1, 0], paths)) if i != 3]
    assert sorted(x for x in rows if not x[2]) == sorted(readable)  # resampled 8 kHz -> 16 kHz
    assert sorted(x for x in rows if x[2]) == sorted([(1, "<padding>", True, 1600), (1, paths[3], True, 1600)])
    assert [e["key"] for e in errors] == [paths[3]] and "f3.wav" in errors[0]["error"]


class _KeysModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch, batch_idx):
        return [(k, p) for k, p in zip(batch["keys"], batch["is_pad"])]


def test_lightning_predict_uses_the_files_loader_as_is(tmp_path):
    paths = _write_files(tmp_path / "audio")
    dm = AudioFilesDataModule(paths=paths, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    out = trainer.predict(_KeysModule(), datamodule=dm)
    assert [row for batch in out for row in batch] == [(p, i == 3) for i, p in enumerate(paths)]


@pytest.mark.slow
def test_fsdp2_validation_with_a_corrupt_sample_on_one_rank_finishes(tmp_path):
    """``emorl validate`` on 2 processes (FSDP2, gloo): the valid set's last batch on rank 1 holds only an
    undecodable sample. Dropping it would leave rank 1 one step short while rank 0 generates with
    synced_gpus (collective calls): a hang. The placeholder row keeps both ranks in step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import CONFIGS, EMORL, check_emorl, tiny_model_dir

    from emorl_pl.datamodules.synth import write_synth_corpus

    root = tmp_path / "synth"
    write_synth_corpus(root, num_speakers=3, utterances_per_speaker_per_label=2, duration=(0.3, 0.4))
    valid = json.loads((root / "valid" / "index.json").read_text())
    assert valid["num_samples"] == 8
    # usable indices 8 (rank 0) and 9 (rank 1): with batch 2, rank 1's third batch is the corrupt one alone
    append_records(root / "valid", [("good_extra", _flac(0.3), "sad"), ("corrupt", _flac(0.3)[:40], "angry")])
    cmd = [EMORL, "validate", "-c", str(CONFIGS / "tiny_grpo.yaml"), "-c", str(CONFIGS / "fsdp2.yaml"),
           "--model.init_args.policy.init_args.model_dir", str(tiny_model_dir()),
           "--data.init_args.root", str(root), "--trainer.limit_val_batches", "1.0",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    check_emorl(proc)
    assert "valid: 1 sample(s) skipped on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert "corrupt" in proc.stderr and "cannot decode audio" in proc.stderr
    assert "validation results" in proc.stdout, proc.stdout[-2000:]
