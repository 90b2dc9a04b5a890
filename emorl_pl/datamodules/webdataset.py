"""ShardDataModule: WebDataset shards (see shards.py) -> model-agnostic batches of variable-length audio.

A batch is ``{"waveforms": list[Tensor (T,) float32], "sample_rate": int, "labels": list[str],
"keys": list[str], "texts": list[str | None], "corpus": list[str], "meta": list[dict]}`` (no padding:
the policy's processor pads/featurises).

Training stream (per epoch ``e``, per rank ``r`` of ``R``, per DataLoader worker ``w`` of ``W``):

* the shard list is shuffled with seed ``(seed, e)`` (same on every rank) and split, as
  ``wds.split_by_node`` / ``wds.split_by_worker`` do, ``shards[r::R][w::W]``; when there are fewer shards
  than ``R * W`` every (rank, worker) reads all shards and keeps sample ``i`` iff
  ``i % (R * W) == r * W + w``, so no rank is left without data (an empty rank would hang DDP);
* each worker loops over its shards forever (reshuffled each pass), through a shuffle buffer seeded with
  ``(seed, e, r, w)``, and stops after its share of the epoch: the loader yields
  ``N = epoch_length or ceil(num_samples / (batch_size * R))`` batches per rank, batch ``k`` coming
  from worker ``k % W`` (DataLoader's in-order round robin), so worker ``w`` makes ``ceil((N - w) / W)``;
* resuming: ``state_dict() = {"epoch": e, "batches": k}`` (batches handed out in the current epoch).
  The order is a pure function of (seed, e, r, R, W), so after ``load_state_dict`` the loader replays
  epoch ``e`` and discards its first ``k`` batches (decoded again, then dropped). The same state is
  exposed by the train loader itself, which Lightning saves/restores in checkpoints (``_Stateful``).
  Workers are not persistent (each epoch re-creates them with the new epoch number).

Evaluation streams (valid / each test set): every sample exactly once across ranks, no padding.
Records are enumerated in shard order; those whose JSON parses and whose label is in the label set get
an index ``j``, and rank ``r`` keeps ``j % R == r``. Ranks' sample counts thus differ by at most one, so
their batch counts differ by at most one: fine for Lightning eval loops that do not synchronise per
step (``sync_dist`` at epoch end is fine), NOT for code that needs the same number of collective calls
on every rank per step (e.g. FSDP generate in validation_step). With ``W`` workers each worker reads all
shards of the set (cheap: tar reading, not decoding) and decodes batch ``m`` of its rank iff
``m % W == w``.

Corrupt samples (undecodable audio, bad JSON, missing field, label outside the label set, unreadable
tar) are logged (one warning each, with shard URL and key) and counted in ``self.skipped[split]``;
the counts travel from workers to the main process alongside the batches, so they are exact after an
iteration with any number of workers.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emorl_pl.datamodules.shards import (
    LabelOutsideSetError,
    SampleDecodeError,
    decode_record,
    read_index,
    split_shards,
)
from emorl_pl.emotions import get_label_set, try_normalize_label

log = logging.getLogger(__name__)

Batch = dict[str, Any]


def collate_samples(samples: list[dict], sample_rate: int) -> Batch:
    """Lists, no padding: decoded samples -> the model-agnostic batch dict (waveforms still numpy here;
    ShardLoader makes them tensors in the main process, because sending many small tensors from workers
    through shared memory was measured slower than pickling arrays)."""
    return {
        "waveforms": [np.ascontiguousarray(s["waveform"], dtype=np.float32) for s in samples],
        "sample_rate": sample_rate,
        "labels": [s["label"] for s in samples],
        "keys": [s["key"] for s in samples],
        "texts": [s["text"] for s in samples],
        "corpus": [s["corpus"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "is_pad": [bool(s.get("is_pad", False)) for s in samples],
    }


def resolve_shards(spec: str) -> tuple[list[str], int | None, dict[str, int] | None]:
    """A split folder (with index.json), a brace pattern (``a/shard-{000000..000003}.tar``) or a glob
    (``a/*.tar``) -> (sorted shard paths, num_samples or None, label_counts or None).

    The counts come from index.json: of the folder, or of the folders a pattern matched when it matched
    all of their shards. Raises FileNotFoundError naming the spec when nothing matches.
    """
    path = Path(spec)
    if path.is_dir():
        index = read_index(path)
        shards = split_shards(path)
        return shards, int(index["num_samples"]), dict(index["label_counts"])
    if "{" in spec:
        urls = list(wds.shardlists.expand_urls(spec))
    elif any(c in spec for c in "*?["):
        urls = glob.glob(spec)
    else:
        urls = [spec]
    urls = sorted(set(urls))
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise FileNotFoundError(
            f"data source {spec!r}: expected a split folder with index.json, a tar file, a glob or a brace "
            f"pattern of tars; no such file(s): {missing or spec}"
        )
    total, counts = 0, Counter()
    for folder in sorted({str(Path(u).parent) for u in urls}):
        try:
            index = read_index(folder)
        except (FileNotFoundError, ValueError):
            return urls, None, None
        listed = {str(Path(folder) / s) for s in index["shards"]}
        if listed != {u for u in urls if str(Path(u).parent) == folder}:
            return urls, None, None  # a subset of a split: the index cannot tell how many samples
        total += int(index["num_samples"])
        counts.update(index["label_counts"])
    return urls, total, dict(counts)


def count_in_label_set(label_counts: dict[str, int] | None, num_samples: int | None,
                       label_set: tuple[str, ...]) -> int | None:
    """Samples whose (alias-normalised) label is in the label set, from index.json's label_counts."""
    if label_counts is None:
        return num_samples
    return sum(n for lab, n in label_counts.items() if try_normalize_label(lab, label_set) is not None)


def _buffer_shuffle(items: Iterator, bufsize: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a buffer of ``bufsize`` items (bufsize <= 1: unchanged order)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class _ShardStream(IterableDataset):
    """Yields ``(batch or None, [skip messages])`` for one rank; split across DataLoader workers."""

    def __init__(self, urls: list[str], *, train: bool, batch_size: int, rank: int, world_size: int,
                 sample_rate: int, max_duration: float | None, label_set: tuple[str, ...], seed: int = 0,
                 epoch: int = 0, num_batches: int = 0, shuffle_buffer: int = 0) -> None:
        self.urls, self.train, self.batch_size = list(urls), train, batch_size
        self.rank, self.world_size = rank, world_size
        self.decode_kw = dict(sample_rate=sample_rate, max_duration=max_duration, label_set=label_set)
        self.sample_rate, self.label_set = sample_rate, label_set
        self.seed, self.epoch, self.num_batches, self.shuffle_buffer = seed, epoch, num_batches, shuffle_buffer
        self._skips: list[str] = []

    def _skip(self, msg: str, level: int = logging.WARNING) -> None:
        log.log(level, "skipping sample: %s", msg)
        self._skips.append(msg)

    def _tar_handler(self, exn: Exception) -> bool:
        self._skip(f"unreadable shard data: {exn!r}")
        return True  # continue with the next record/shard

    def _records(self, urls: list[str]) -> Iterator[dict]:
        return wds.tarfile_samples(({"url": u} for u in urls), handler=self._tar_handler)

    def _decode(self, record: dict) -> dict | None:
        try:
            return decode_record(record, **self.decode_kw)
        except LabelOutsideSetError as exc:
            # expected when a corpus has more classes than the label set: counted, logged quietly
            self._skip(str(exc), logging.DEBUG)
            return None
        except SampleDecodeError as exc:
            self._skip(str(exc))
            return None

    def _emit(self, batch_samples: list[dict]) -> tuple[Batch | None, list[str]]:
        skips, self._skips = self._skips, []
        return (collate_samples(batch_samples, self.sample_rate) if batch_samples else None), skips

    def __iter__(self) -> Iterator[tuple[Batch | None, list[str]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skips = []
        gen = self._train_batches(worker, num_workers) if self.train else self._eval_batches(worker, num_workers)
        for batch in gen:
            yield self._emit(batch)
        if self._skips:
            yield self._emit([])

    # -- training: infinite, shuffled, split by rank and worker, bounded to this worker's share --
    def _train_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        shards = [self.urls[i] for i in order]
        by_shard = len(shards) >= slots
        mine = shards[self.rank::self.world_size][worker::num_workers] if by_shard else shards
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        for _ in range(1 << 62):
            produced, seen = 0, 0
            for i, record in enumerate(self._records([mine[j] for j in rng.permutation(len(mine))])):
                if not by_shard and i % slots != slot:
                    continue
                seen += 1
                sample = self._decode(record)
                if sample is not None:
                    produced += 1
                    yield sample
            if produced == 0:
                raise RuntimeError(
                    f"training shards give no usable sample on rank {self.rank} worker {worker} "
                    f"({seen} records seen, all skipped; label set {list(self.label_set)}): {mine}")

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        share = max(0, math.ceil((self.num_batches - worker) / num_workers))
        if share == 0:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        batch: list[dict] = []
        made = 0
        for sample in _buffer_shuffle(self._train_samples(worker, num_workers), self.shuffle_buffer, rng):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch, made = [], made + 1
                if made == share:
                    return

    # -- evaluation: each sample once across ranks, in order; short ranks padded with flagged copies --
    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        j = 0  # index among records with a usable label
        batch: list[dict] = []
        filler: dict | None = None
        for i, record in enumerate(self._records(self.urls)):
            try:
                label = try_normalize_label(json.loads(record.get("json", b"null")).get("label"), self.label_set)
            except (ValueError, AttributeError, UnicodeDecodeError):
                label = None
            if label is None:
                # the owner of raw record i reports it (worker 0), so each bad record is counted once
                if i % self.world_size == self.rank and worker == 0:
                    self._decode(record)  # raises inside -> logged and counted with the precise reason
                continue
            owner, j = j % self.world_size, j + 1
            if owner != self.rank:
                continue
            m = (j - 1) // self.world_size  # position among this rank's samples
            if (m // self.batch_size) % num_workers != worker:
                continue
            sample = self._decode(record)
            if sample is not None:
                batch.append(sample)
                filler = sample
            if (m + 1) % self.batch_size == 0:
                yield batch
                batch = []
        if batch:
            yield batch
        mine = j // self.world_size + (1 if self.rank < j % self.world_size else 0)
        own_batches = math.ceil(mine / self.batch_size)
        # Every rank must run the same number of eval steps: sharded models gather weights collectively
        # in each forward, so a rank that stopped early would hang the others. Padding rows are flagged
        # ``is_pad`` and never counted in metrics.
        most = math.ceil(math.ceil(j / self.world_size) / self.batch_size) if self.world_size > 1 else own_batches
        for k in range(own_batches, most):
            if k % num_workers == worker:
                filler = filler or self._first_sample()
                if filler is not None:
                    yield [dict(filler, is_pad=True)]

    def _first_sample(self) -> dict | None:
        for record in self._records(self.urls):
            try:
                return decode_record(record, **self.decode_kw)
            except SampleDecodeError:
                continue
        return None


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """An iterable of batches for one rank: wraps a DataLoader over a _ShardStream, counts skipped samples
    into ``counter[name]`` and, for training, tracks (epoch, batches handed out) for resuming."""

    def __init__(self, stream: _ShardStream, *, num_workers: int, counter: Counter, name: str,
                 length: int | None) -> None:
        self.stream, self.num_workers, self.counter, self.name = stream, num_workers, counter, name
        self.length = length
        self.epoch, self.batches = 0, 0
        self._resume_skip = 0

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"number of batches of {self.name!r} is unknown (no index.json for its shards)")
        return self.length

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._resume_skip = self.batches

    def __iter__(self) -> Iterator[Batch]:
        self.stream.epoch = self.epoch
        skip, self._resume_skip = self._resume_skip, 0
        self.batches = 0
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            persistent_workers=False)
        delivered = 0
        for batch, skips in loader:
            if skips:
                self.counter[self.name] += len(skips)
            if batch is None:
                continue
            delivered += 1
            if delivered <= skip:
                continue
            self.batches = delivered
            batch["waveforms"] = [torch.from_numpy(w) for w in batch["waveforms"]]
            if self.stream.train and self.length is not None and delivered >= self.length:
                # Lightning stops after len() batches without exhausting this generator, so the
                # epoch must advance here, or every epoch would replay the same shuffle.
                self.epoch, self.batches = self.epoch + 1, 0
                yield batch
                return
            yield batch
        if self.stream.train:
            self.epoch, self.batches = self.epoch + 1, 0


class ShardDataModule(L.LightningDataModule):
    """Train / valid / named test sets from WebDataset shard folders (see the module docstring).

    Args:
        train, valid: a split folder (``data/iemocap/train``), a glob or a brace pattern of tars.
        test: one source, or ``{name: source}`` for several test sets (cross-corpus evaluation);
            ``test_set_names[dataloader_idx]`` gives each name.
        label_set: a label set name or list; samples whose label (alias-normalised) is outside it are
            skipped and counted.
        max_duration: longer audio is cropped to its first ``max_duration`` seconds (None: keep all).
        eval_batch_size: batch size of valid/test (default: batch_size).
        shuffle_buffer: samples in the training shuffle buffer.
        epoch_length: training batches per rank per epoch (default ceil(num_samples / (batch_size * R))).
    """

    def __init__(
        self,
        train: str | None = None,
        valid: str | None = None,
        test: str | dict[str, str] | None = None,
        label_set: str | list[str] = "iemocap4",
        sample_rate: int = 16000,
        max_duration: float | None = 10.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size/eval_batch_size must be >= 1, got {batch_size}/{eval_batch_size}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.train_source, self.valid_source = train, valid
        self.test_sources: dict[str, str] = (
            {} if test is None else {"test": test} if isinstance(test, str) else dict(test))
        self.label_set = get_label_set(label_set)
        self.sample_rate, self.max_duration = sample_rate, max_duration
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.epoch_length = epoch_length
        self.skipped: Counter[str] = Counter()
        self._train_loader: ShardLoader | None = None
        self._pending_state: dict | None = None

    @property
    def test_set_names(self) -> list[str]:
        """dataloader_idx -> test set name (the order of ``test``)."""
        return list(self.test_sources)

    def distributed_info(self) -> tuple[int, int]:
        """(rank, world_size): from the attached trainer, else torch.distributed, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _source(self, kind: str, spec: str | None) -> str:
        if spec is None:
            raise ValueError(f"ShardDataModule: no {kind!r} data configured (set {kind}: <split folder or pattern>)")
        return spec

    def build_train_loader(self, rank: int | None = None, world_size: int | None = None) -> ShardLoader:
        """The training loader for one rank (explicit rank/world_size override the trainer's, for tests)."""
        r, ws = self.distributed_info()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        urls, num_samples, counts = resolve_shards(self._source("train", self.train_source))
        usable = count_in_label_set(counts, num_samples, self.label_set)
        if self.epoch_length is not None:
            num_batches = self.epoch_length
        elif usable is None:
            raise ValueError(f"train source {self.train_source!r} has no index.json covering its shards: "
                             "set epoch_length")
        elif usable == 0:
            raise ValueError(f"train source {self.train_source!r} has no sample with a label in "
                             f"{list(self.label_set)} (label_counts: {counts})")
        else:
            num_batches = math.ceil(usable / (self.batch_size * world_size))
        stream = _ShardStream(urls, train=True, batch_size=self.batch_size, rank=rank, world_size=world_size,
                              sample_rate=self.sample_rate, max_duration=self.max_duration,
                              label_set=self.label_set, seed=self.seed, num_batches=num_batches,
                              shuffle_buffer=self.shuffle_buffer)
        return ShardLoader(stream, num_workers=self.num_workers, counter=self.skipped, name="train",
                           length=num_batches)

    def build_eval_loader(self, source: str, name: str, rank: int | None = None,
                          world_size: int | None = None) -> ShardLoader:
        """An evaluation loader (each sample once across ranks) over ``source``; skips counted under ``name``."""
        r, ws = self.distributed_info()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        urls, num_samples, counts = resolve_shards(source)
        usable = count_in_label_set(counts, num_samples, self.label_set)
        # Every rank runs as many batches as the largest share (short ranks are padded, see _eval_batches).
        length = None if usable is None else math.ceil(math.ceil(usable / world_size) / self.eval_batch_size)
        stream = _ShardStream(urls, train=False, batch_size=self.eval_batch_size, rank=rank,
                              world_size=world_size, sample_rate=self.sample_rate,
                              max_duration=self.max_duration, label_set=self.label_set)
        return ShardLoader(stream, num_workers=self.num_workers, counter=self.skipped, name=name, length=length)

    def train_dataloader(self) -> ShardLoader:
        # one loader object for the whole run, so its (epoch, batches) state carries over
        if self._train_loader is None:
            self._train_loader = self.build_train_loader()
            if self._pending_state is not None:
                self._train_loader.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._train_loader

    def val_dataloader(self) -> ShardLoader:
        return self.build_eval_loader(self._source("valid", self.valid_source), "valid")

    def test_dataloader(self) -> list[ShardLoader]:
        if not self.test_sources:
            raise ValueError("ShardDataModule: no 'test' data configured")
        return [self.build_eval_loader(src, f"test/{name}" if len(self.test_sources) > 1 else "test")
                for name, src in self.test_sources.items()]

    def predict_dataloader(self) -> list[ShardLoader]:
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches"}`` of the training stream (batches handed out in the current epoch)."""
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state or {"epoch": 0, "batches": 0})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
