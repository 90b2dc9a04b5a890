"""ShardDataModule: rank/worker splitting, epoch length, corrupt-sample skipping, resume."""

from __future__ import annotations

import io
import json
import math
import tarfile
import types
from collections import Counter

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from emorl_pl.datamodules.shards import AudioSample, SplitWriter
from emorl_pl.datamodules.webdataset import ShardDataModule

LABELS = ["neutral", "happy", "angry", "sad"]
N = 37


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    with SplitWriter(root, "train", max_count=5) as w:  # 8 shards
        for i in range(N):
            audio = np.full(800 + 10 * i, 0.01 * (i % 50), dtype=np.float32)
            w.write(AudioSample(f"k{i:03d}", audio, 16000, {"label": LABELS[i % 4], "corpus_label": LABELS[i % 4],
                                                            "corpus": "toy", "speaker": f"s{i % 3}", "text": f"t{i}"}))
    return root / "train"


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _real_keys(batches) -> list[str]:
    return [k for b in batches for k, pad in zip(b["keys"], b["is_pad"]) if not pad]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [4, 3])
def test_eval_sees_every_sample_once_across_ranks(split, workers, batch_size):
    dm = ShardDataModule(valid=str(split), batch_size=batch_size, num_workers=workers)
    per_rank, counts = [], []
    for rank in range(2):
        loader = dm.build_eval_loader(str(split), "valid", rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(len(batches))
        per_rank.append(_real_keys(batches))
    # Both ranks run the same number of steps (sharded models need it): with 37 samples and batch 3,
    # rank 0 has 19 samples (7 batches) and rank 1 has 18 (6 batches + 1 flagged padding batch).
    assert counts[0] == counts[1] == math.ceil(math.ceil(N / 2) / batch_size)
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == [f"k{i:03d}" for i in range(N)]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    # the batch carries decoded audio and metadata consistent with what was written
    b = next(iter(dm.build_eval_loader(str(split), "valid", rank=0, world_size=1)))
    assert set(b) == {"waveforms", "sample_rate", "labels", "keys", "texts", "corpus", "meta", "is_pad", "errors"}
    i = int(b["keys"][1][1:])
    assert b["waveforms"][1].dtype == torch.float32 and b["waveforms"][1].shape == (800 + 10 * i,)
    assert torch.allclose(b["waveforms"][1], torch.tensor(0.01 * (i % 50)), atol=1 / 32768)
    assert b["labels"][1] == LABELS[i % 4] and b["texts"][1] == f"t{i}" and b["meta"][1]["speaker"] == f"s{i % 3}"
    assert dm.skipped["valid"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_train_epoch_length_and_rank_disjointness(split, workers):
    dm = ShardDataModule(train=str(split), batch_size=3, num_workers=workers, shuffle_buffer=8)
    expected = math.ceil(N / (3 * 2))
    keys = []
    for rank in range(2):
        loader = dm.build_train_loader(rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == expected and len(batches) == expected
        assert all(len(b["keys"]) == 3 for b in batches)
        keys.append(_keys(batches))
    # 8 shards split 4/4 between ranks: within an epoch the ranks never share a sample
    assert not set(keys[0]) & set(keys[1])
    # shuffled: not the written order
    assert keys[0] != sorted(keys[0])


def _write_unequal_shards(root, sizes: list[int], name: str = "train"):
    """One shard per entry of ``sizes`` (written with tarfile, not the project's writer), index.json
    without per-shard counts (an older index: the loader must count the shards itself)."""
    folder = root / name
    folder.mkdir()
    buf = io.BytesIO()
    sf.write(buf, np.zeros(160, np.float32), 16000, format="FLAC", subtype="PCM_16")
    keys, shards = [], []
    for s, size in enumerate(sizes):
        shards.append(f"shard-{s:06d}.tar")
        with tarfile.open(folder / shards[-1], "w") as tar:
            for _ in range(size):
                key = f"s{s}_{len(keys):03d}"
                meta = {"label": LABELS[len(keys) % 4], "corpus_label": "x", "corpus": "toy", "speaker": "s"}
                for ext, data in (("flac", buf.getvalue()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
    index = {"split": name, "num_samples": len(keys), "label_counts": dict(Counter(LABELS[i % 4] for i in range(len(keys)))),
             "shards": shards, "sample_rate": 16000}
    (folder / "index.json").write_text(json.dumps(index))
    return folder, keys


def _epoch(loaders) -> tuple[list[list[str]], list[list[str]], list[int]]:
    """One epoch of each rank's loader: (real keys per rank, padding keys per rank, batches per rank)."""
    real, pads, counts = [], [], []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b["keys"]) == len(b["is_pad"]) == loader.stream.batch_size for b in batches)
        counts.append(len(batches))
        real.append([k for b in batches for k, p in zip(b["keys"], b["is_pad"]) if not p])
        pads.append([k for b in batches for k, p in zip(b["keys"], b["is_pad"]) if p])
    return real, pads, counts


# 3 shards (fewer than 2 x 2 slots) and 6 shards (more), of unequal sizes in both.
@pytest.mark.parametrize("sizes", [[9, 2, 6], [7, 3, 5, 1, 9, 4]])
@pytest.mark.parametrize(("world_size", "workers"), [(2, 2), (1, 3), (2, 1)])
@pytest.mark.parametrize("batch_size", [2, 3])
def test_train_pass_sees_every_sample_exactly_once(tmp_path, sizes, world_size, workers, batch_size):
    folder, keys = _write_unequal_shards(tmp_path, sizes)
    dm = ShardDataModule(train=str(folder), batch_size=batch_size, num_workers=workers, shuffle_buffer=4, seed=3)
    loaders = [dm.build_train_loader(rank=r, world_size=world_size) for r in range(world_size)]
    steps = math.ceil(math.ceil(len(keys) / world_size) / batch_size)
    orders = []
    for epoch in range(2):  # the same loaders go on to epoch 1 (a new pass)
        real, pads, counts = _epoch(loaders)
        # every rank runs the same number of steps, and the pass is a partition of the samples
        assert counts == [steps] * world_size
        assert Counter(k for r in real for k in r) == Counter(keys), f"epoch {epoch}"
        # the only repeats are the documented padding: a rank's own samples, at most one batch of them
        for r in range(world_size):
            assert len(pads[r]) == steps * batch_size - len(real[r]) <= batch_size
            assert set(pads[r]) <= set(real[r])
        orders.append(real)
    assert orders[0] != orders[1], "each pass has its own order"
    assert dm.skipped["train"] == 0


def test_train_epoch_length_walks_through_whole_passes(tmp_path):
    folder, keys = _write_unequal_shards(tmp_path, [5, 2, 6])  # 13 samples, batch 2: 7 batches per pass
    dm = ShardDataModule(train=str(folder), batch_size=2, shuffle_buffer=0, seed=1, epoch_length=3)
    loader = dm.build_train_loader(rank=0, world_size=1)
    stream = [b for _ in range(5) for b in loader]  # 15 batches: pass 0, pass 1, 1 batch of pass 2
    assert len(stream) == 15 and loader.state_dict()["epoch"] == 5
    for p in range(2):
        rows = [(k, pad) for b in stream[7 * p : 7 * (p + 1)] for k, pad in zip(b["keys"], b["is_pad"])]
        assert Counter(k for k, pad in rows if not pad) == Counter(keys)
        assert sum(pad for _, pad in rows) == 1
    whole = ShardDataModule(train=str(folder), batch_size=2, shuffle_buffer=0, seed=1)
    plain = whole.build_train_loader(rank=0, world_size=1)
    assert [b["keys"] for b in stream[:14]] == [b["keys"] for _ in range(2) for b in plain]


def _append_corrupt_shard(split_dir) -> None:
    """A 9th shard with a truncated FLAC, a non-JSON json, an unknown label, a label outside iemocap4."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, np.float32), 16000, format="FLAC", subtype="PCM_16")
    good_flac = buf.getvalue()
    meta = {"label": "sad", "corpus_label": "sad", "corpus": "toy", "speaker": "s0", "duration": 0.1}
    members = {
        "bad_flac": (good_flac[:40], json.dumps(meta).encode()),
        "bad_json": (good_flac, b"{not json"),
        "bad_label": (good_flac, json.dumps(meta | {"label": "grumpy"}).encode()),
        "fear": (good_flac, json.dumps(meta | {"label": "fear"}).encode()),
        "fine": (good_flac, json.dumps(meta).encode()),
    }
    with tarfile.open(split_dir / "shard-000099.tar", "w") as tar:
        for key, (flac, js) in members.items():
            for ext, data in (("flac", flac), ("json", js)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = json.loads((split_dir / "index.json").read_text())
    index["shards"].append("shard-000099.tar")
    index["num_samples"] += len(members)
    (split_dir / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, split, workers):
    import shutil

    shutil.copytree(split, tmp_path / "train")
    _append_corrupt_shard(tmp_path / "train")
    dm = ShardDataModule(train=str(tmp_path / "train"), valid=str(tmp_path / "train"),
                         test={"a": str(tmp_path / "train"), "b": str(split)}, batch_size=4, num_workers=workers)
    keys, placeholders, steps = [], [], []
    for rank in range(2):
        batches = list(dm.build_eval_loader(str(tmp_path / "train"), "valid", rank=rank, world_size=2))
        steps.append(len(batches))
        keys += _real_keys(batches)
        placeholders += [(k, w.numel(), e) for b in batches for k, w, p in zip(b["keys"], b["waveforms"], b["is_pad"])
                         if p and k == "bad_flac" for e in b["errors"]]
    assert sorted(keys) == sorted([f"k{i:03d}" for i in range(N)] + ["fine"])
    # 39 samples with a label (bad_flac's JSON is fine): 20 + 19, 5 batches of 4 on each rank; the
    # undecodable one keeps its row as a flagged placeholder of 0.1 s of silence with an error entry
    assert steps == [5, 5]
    assert len(placeholders) == 1 and placeholders[0][:2] == ("bad_flac", 1600)
    assert placeholders[0][2]["key"] == "bad_flac" and "cannot decode audio" in placeholders[0][2]["error"]
    assert dm.skipped["valid"] == 4  # each bad record counted once over both ranks
    # Training: the corrupt shard has no per-shard counts in index.json, so the loader counts its usable
    # records itself: "bad_flac" and "fine" (the others have bad JSON or labels). 39 samples, batch 4.
    batches = list(dm.build_train_loader(rank=0, world_size=1))
    assert len(batches) == math.ceil((N + 2) / 4) and all(len(b["keys"]) == 4 for b in batches)
    rows = [(k, p) for b in batches for k, p in zip(b["keys"], b["is_pad"])]
    assert sorted(k for k, p in rows if not p) == sorted([f"k{i:03d}" for i in range(N)] + ["fine"])
    # 40 rows: the undecodable "bad_flac" row replaced by a flagged repeat, and one row of end padding
    assert sum(p for _, p in rows) == 2
    assert dm.skipped["train"] == 4  # each bad record counted once per pass
    assert dm.test_set_names == ["a", "b"]
    loaders = dm.test_dataloader()
    assert [len(list(x)) for x in loaders] == [len(x) for x in loaders]
    assert dm.skipped["test/a"] == 4 and dm.skipped["test/b"] == 0


@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 2), (2, 0), (0, 3)])
def test_resume_gives_the_same_next_batches(split, workers, resume_workers):
    def make(w):
        return ShardDataModule(train=str(split), batch_size=3, num_workers=w, shuffle_buffer=8, seed=5)

    dm = make(workers)
    dm._train_loader = dm.build_train_loader(rank=1, world_size=2)
    first_epoch = [b["keys"] for b in dm._train_loader]
    it = iter(dm._train_loader)  # epoch 1: hand out 2 batches, then "checkpoint"
    epoch1 = [next(it)["keys"] for _ in range(2)]
    state = dm.state_dict()
    assert state == {"epoch": 1, "batches": 2, "world_size": 2, "batch_size": 3, "seed": 5, "samples": N,
                     "epoch_length": None}
    rest = [b["keys"] for b in it]
    assert epoch1 + rest != first_epoch  # a new epoch reshuffles

    # The batch sequence does not depend on the number of workers, so resuming with another is exact.
    resumed = make(resume_workers)
    resumed.load_state_dict(state)
    resumed.trainer = types.SimpleNamespace(global_rank=1, world_size=2)
    assert [b["keys"] for b in resumed.train_dataloader()] == rest
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches"]) == (2, 0)


def test_resume_with_another_layout_is_refused_inside_an_epoch(split, caplog):
    def loader(world_size=2, **kw):
        dm = ShardDataModule(**{"train": str(split), "batch_size": 3, "shuffle_buffer": 8, "seed": 5, **kw})
        return dm.build_train_loader(rank=0, world_size=world_size)

    saved = loader()
    it = iter(saved)
    next(it)
    state = saved.state_dict()  # epoch 0, 1 batch handed out, 2 ranks
    with pytest.raises(ValueError, match=r"epoch 0, batch 1.*world_size: saved 2, current 1"):
        loader(world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size: saved 3, current 4"):
        loader(batch_size=4).load_state_dict(state)
    # through the DataModule (as Lightning restores it): refused when the train loader is built
    dm = ShardDataModule(train=str(split), batch_size=3, shuffle_buffer=8, seed=5)  # 1 process: world_size 1
    dm.load_state_dict(state)
    with pytest.raises(ValueError, match="world_size: saved 2, current 1"):
        dm.train_dataloader()
    # at an epoch boundary the next epoch is a new pass, planned with the current values
    one = loader(world_size=1)
    one.load_state_dict(dict(state, epoch=1, batches=0))
    assert len(list(one)) == len(one) == math.ceil(N / 3)
    # an older checkpoint without the layout: accepted (same layout assumed), with a warning
    old = loader()
    with caplog.at_level("WARNING"):
        old.load_state_dict({"epoch": 0, "batches": 1})
    assert "has no layout" in caplog.text
    assert [b["keys"] for b in old] == [b["keys"] for b in it]


def test_label_set_filters_and_errors(split, tmp_path):
    dm = ShardDataModule(valid=str(split), label_set=["angry", "sad"], batch_size=5)
    loader = dm.val_dataloader()
    labels = Counter(lab for b in loader for lab in b["labels"])
    assert labels == {"angry": 9, "sad": 9}
    assert len(loader) == math.ceil(18 / 5)
    assert dm.skipped["valid"] == N - 18
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ShardDataModule(train=str(tmp_path / "nowhere")).build_train_loader()
    with pytest.raises(ValueError, match="no 'valid' data"):
        ShardDataModule(train=str(split)).val_dataloader()
    # a brace pattern over part of a split: the loader counts the two shards' samples itself (5 + 5)
    part = str(split / "shard-00000{0..1}.tar")
    assert len(ShardDataModule(train=part, batch_size=2).build_train_loader()) == 5
    assert len(ShardDataModule(train=part, epoch_length=3, batch_size=2).build_train_loader()) == 3
    with pytest.raises(ValueError, match=r"no sample with a label in \['disgust'\]"):
        ShardDataModule(train=part, label_set=["disgust"]).build_train_loader()


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["keys"]
        return sum(w.mean() for w in batch["waveforms"]) * self.w.sum() + self.w.sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_saves_the_stream_position(split, tmp_path):
    dm = ShardDataModule(train=str(split), batch_size=4, shuffle_buffer=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    model = _Tiny()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert ckpt["ShardDataModule"] == {"epoch": 0, "batches": 3, "world_size": 1, "batch_size": 4, "seed": 0,
                                       "samples": N, "epoch_length": None}
    assert len(model.seen) == 12


def _fit(split, tmp_path, max_steps: int, workers: int = 0, ckpt: str | None = None) -> list[str]:
    """Keys a Lightning fit trains on (10 batches of 4 per epoch), optionally resumed from ``ckpt``."""
    dm = ShardDataModule(train=str(split), batch_size=4, shuffle_buffer=8, num_workers=workers, seed=2)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    model = _Tiny()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    trainer.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
    return model.seen


@pytest.mark.parametrize("resume_workers", [0, 2])
def test_lightning_resume_continues_the_stream_exactly(split, tmp_path, resume_workers):
    full = _fit(split, tmp_path / "full", 13)  # 1 epoch of 10 batches, then 3 of epoch 1
    first = _fit(split, tmp_path / "first", 12)
    rest = _fit(split, tmp_path / "rest", 13, resume_workers, ckpt=str(tmp_path / "first" / "step12.ckpt"))
    assert first + rest == full and len(rest) == 4
    assert set(full[:40]) == {f"k{i:03d}" for i in range(N)}  # epoch 0: all 37 samples (+ 3 padding rows)


def test_train_epoch_advances_when_lightning_stops_after_len_batches(split):
    dm = ShardDataModule(train=str(split), batch_size=4, shuffle_buffer=8, seed=3)
    loader = dm.build_train_loader(rank=0, world_size=1)
    epochs = []
    for _ in range(2):
        # Like Lightning's fit loop: take len(loader) batches, never exhaust the iterator.
        it = iter(loader)
        epochs.append([k for _, b in zip(range(len(loader)), it) for k in b["keys"]])
        assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (len(epochs), 0)
    assert len(epochs[0]) == len(epochs[1]) == len(loader) * 4
    assert epochs[0] != epochs[1], "each epoch must have its own shuffle"
