"""ShardDataModule: rank/worker splitting, epoch length, corrupt-sample skipping, resume."""

from __future__ import annotations

import io
import json
import math
import tarfile
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
    assert set(b) == {"waveforms", "sample_rate", "labels", "keys", "texts", "corpus", "meta", "is_pad"}
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


def test_train_with_fewer_shards_than_ranks_splits_by_sample(tmp_path):
    with SplitWriter(tmp_path, "one") as w:  # a single shard
        for i in range(10):
            w.write(AudioSample(f"u{i}", np.zeros(160, np.float32), 16000,
                                {"label": "sad", "corpus_label": "sad", "corpus": "toy", "speaker": "s"}))
    dm = ShardDataModule(train=str(tmp_path / "one"), batch_size=2, shuffle_buffer=0)
    keys = [_keys(dm.build_train_loader(rank=r, world_size=2)) for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 2 * math.ceil(10 / 4)  # neither rank is empty
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) == {f"u{i}" for i in (0, 2, 4, 6, 8)} & set(keys[0])


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
    keys = []
    for rank in range(2):
        keys += _keys(dm.build_eval_loader(str(tmp_path / "train"), "valid", rank=rank, world_size=2))
    assert sorted(keys) == sorted([f"k{i:03d}" for i in range(N)] + ["fine"])
    assert dm.skipped["valid"] == 4  # each bad record counted once over both ranks
    # training keeps going past the bad shard (it is visited in every pass of the infinite stream)
    # epoch length counts the labels in index.json (the corrupt shard was not added to label_counts)
    assert len(list(dm.build_train_loader(rank=0, world_size=1))) == math.ceil(N / 4)
    assert dm.skipped["train"] >= 4
    assert dm.test_set_names == ["a", "b"]
    loaders = dm.test_dataloader()
    assert [len(list(x)) for x in loaders] == [len(x) for x in loaders]
    assert dm.skipped["test/a"] == 4 and dm.skipped["test/b"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_next_batches(split, workers):
    def make():
        return ShardDataModule(train=str(split), batch_size=3, num_workers=workers, shuffle_buffer=8, seed=5)

    dm = make()
    dm._train_loader = dm.build_train_loader(rank=1, world_size=2)
    first_epoch = [b["keys"] for b in dm._train_loader]
    it = iter(dm._train_loader)  # epoch 1: hand out 2 batches, then "checkpoint"
    epoch1 = [next(it)["keys"] for _ in range(2)]
    state = dm.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    rest = [b["keys"] for b in it]
    assert epoch1 + rest != first_epoch  # a new epoch reshuffles

    resumed = make()
    resumed.load_state_dict(state)
    resumed._train_loader = resumed.build_train_loader(rank=1, world_size=2)
    resumed._train_loader.load_state_dict(resumed._pending_state)
    assert [b["keys"] for b in resumed._train_loader] == rest
    assert resumed.state_dict() == {"epoch": 2, "batches": 0}


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
    # a brace pattern over part of a split has no sample count: the train stream needs epoch_length
    part = str(split / "shard-00000{0..1}.tar")
    with pytest.raises(ValueError, match="epoch_length"):
        ShardDataModule(train=part).build_train_loader()
    assert len(ShardDataModule(train=part, epoch_length=3, batch_size=2).build_train_loader()) == 3


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
    assert ckpt["ShardDataModule"] == {"epoch": 0, "batches": 3}
    assert len(model.seen) == 12


def test_train_epoch_advances_when_lightning_stops_after_len_batches(split):
    dm = ShardDataModule(train=str(split), batch_size=4, shuffle_buffer=8, seed=3)
    loader = dm.build_train_loader(rank=0, world_size=1)
    epochs = []
    for _ in range(2):
        # Like Lightning's fit loop: take len(loader) batches, never exhaust the iterator.
        it = iter(loader)
        epochs.append([k for _, b in zip(range(len(loader)), it) for k in b["keys"]])
        assert loader.state_dict() == {"epoch": len(epochs), "batches": 0}
    assert len(epochs[0]) == len(epochs[1]) == len(loader) * 4
    assert epochs[0] != epochs[1], "each epoch must have its own shuffle"
