"""Predict over plain audio files: a folder, a glob, or a list of paths (no shards needed).

A missing, empty or unreadable file, or one with NaN/inf samples, does not stop the run: it becomes an
``errors`` row of its batch (``{"key": path, "error": "..."}``), which the prediction writer writes as its
own JSONL line (no emotion). Its row stays in the batch as a placeholder (0.1 s of silence, ``is_pad``
true, no prediction wanted), so that an unreadable file never changes how many batches a rank runs.

A file cropped to ``max_duration`` has ``meta["seconds_cropped"]`` (the seconds cut off; the prediction
writer adds them to the file's ``seconds_ignored``), and the loader counts such files in the data
module's ``cropped["predict"]`` and warns the first time.

With R ranks, rank r predicts files ``r, r+R, r+2R, ...`` and every rank runs ``ceil(ceil(n/R) / B)``
batches: a rank with one file fewer gets one padding row (``is_pad``, key ``"<padding>"``). Ranks of a
sharded model must run the same number of steps, or their collective calls hang. The DataModule splits
the files itself (Lightning's own predict sampler gives ranks unequal counts and is therefore not used).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emorl_pl.audio import load_audio, resample, to_mono
from emorl_pl.datamodules.shards import nonfinite_problem
from emorl_pl.datamodules.webdataset import rank_and_world_size
from emorl_pl.modules.prompting import CroppedAudio

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")


def expand_audio_paths(paths: str | list[str]) -> list[str]:
    """Folders (recursively, audio extensions only), globs and plain paths, in a stable order.

    A plain path that does not exist is kept, so that it is reported as an error row.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            out += sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        elif glob.has_magic(item):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)
    return out


PADDING_KEY = "<padding>"
PLACEHOLDER_SECONDS = 0.1


def rank_files(files: list[str], rank: int, world_size: int) -> list[str | None]:
    """Rank ``rank``'s files (every ``world_size``-th), then None (a padding row) up to the largest
    rank's count, so that every rank runs the same number of batches (a short last batch is fine)."""
    mine: list[str | None] = list(files[rank::world_size])
    return mine + [None] * (math.ceil(len(files) / world_size) - len(mine))


def load_file(path: str, sample_rate: int, max_duration: float | None) -> dict[str, Any]:
    """``{"key", "audio", "seconds_cropped"}`` or, for a missing/empty/unreadable file or one with NaN/inf
    samples, ``{"key", "error"}``."""
    try:
        audio, sr = load_audio(path)
        problem = nonfinite_problem(audio)
        if problem is not None:
            # NaN/inf would give a confident-looking answer computed from NaN features
            raise ValueError(f"{path}: {problem}; not predicted")
        audio = resample(to_mono(audio), sr, sample_rate).astype(np.float32)
        if audio.size == 0:
            raise ValueError(f"{path}: audio is empty")
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes an error row
        return {"key": path, "error": str(err)}
    cropped = 0.0
    if max_duration is not None and audio.size > int(max_duration * sample_rate):
        cropped = (audio.size - int(max_duration * sample_rate)) / sample_rate
        audio = audio[: int(max_duration * sample_rate)]
    return {"key": path, "audio": torch.from_numpy(audio), "seconds_cropped": cropped}


def collate_files(items: list[dict[str, Any]], sample_rate: int) -> dict[str, Any]:
    """Every item keeps its row; unreadable files and padding get silent audio and ``is_pad`` true."""
    silence = torch.zeros(int(sample_rate * PLACEHOLDER_SECONDS))
    return {
        "waveforms": [x["audio"] if "audio" in x else silence for x in items],
        "sample_rate": sample_rate,
        "keys": [x["key"] for x in items],
        "labels": [None] * len(items),
        "texts": [None] * len(items),
        "corpus": ["files"] * len(items),
        "meta": [{"seconds_cropped": x["seconds_cropped"]} if x.get("seconds_cropped") else {} for x in items],
        "is_pad": ["audio" not in x for x in items],
        "errors": [{"key": x["key"], "error": x["error"]} for x in items if "error" in x],
    }


class FileBatches(Dataset):
    """Item ``m`` = batch ``m`` of one rank's files (None entries are padding rows)."""

    def __init__(self, paths: list[str | None], batch_size: int, sample_rate: int,
                 max_duration: float | None) -> None:
        self.paths, self.batch_size = paths, batch_size
        self.sample_rate, self.max_duration = sample_rate, max_duration

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, m: int) -> dict[str, Any]:
        chunk = self.paths[m * self.batch_size : (m + 1) * self.batch_size]
        items = [{"key": PADDING_KEY} if p is None else load_file(p, self.sample_rate, self.max_duration)
                 for p in chunk]
        return collate_files(items, self.sample_rate)


class FileLoader:
    """A plain iterable over a DataLoader of whole batches: not a DataLoader, so that Lightning does not
    replace its sampler by a distributed one (the files are split between ranks already). Files cropped to
    ``max_duration`` are counted into ``cropped`` as their batches are handed out."""

    def __init__(self, loader: DataLoader, cropped: CroppedAudio | None = None,
                 max_duration: float | None = None) -> None:
        self.loader, self.max_duration = loader, max_duration
        self.cropped = CroppedAudio() if cropped is None else cropped

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if self.max_duration is not None:
                self.cropped.add([float(meta.get("seconds_cropped", 0.0))
                                  for meta, pad in zip(batch["meta"], batch["is_pad"]) if not pad], self.max_duration)
            yield batch


def _identity(x: Any) -> Any:
    return x


class AudioFilesDataModule(L.LightningDataModule):
    """``emorl predict`` input: ``paths`` is a folder, a glob (``data/**/*.wav``) or a list of files.

    ``max_duration`` (seconds, None: whole files) crops here (counted in ``cropped["predict"]``, and added
    to each file's ``seconds_ignored`` by the prediction writer); by default nothing is, and the policy
    crops to its encoder's window (30 s for Qwen2-Audio), recording each file's ``seconds_ignored``."""

    def __init__(
        self,
        paths: str | list[str],
        label_set: str | list[str] = "iemocap4",
        sample_rate: int = 16000,
        max_duration: float | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths, self.label_set, self.sample_rate = paths, label_set, sample_rate
        self.max_duration, self.batch_size, self.num_workers = max_duration, batch_size, num_workers
        self.cropped: dict[str, CroppedAudio] = {}  # "predict" -> files handed out cropped to max_duration

    def distributed_info(self) -> tuple[int, int]:
        """(rank, world_size): from the attached trainer, else torch.distributed, else (0, 1)."""
        return rank_and_world_size(getattr(self, "trainer", None))

    def build_predict_loader(self, rank: int | None = None, world_size: int | None = None) -> FileLoader:
        """The predict batches of one rank (explicit rank/world_size override the trainer's, for tests)."""
        r, ws = self.distributed_info()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        files = expand_audio_paths(self.paths)
        if not files:
            raise FileNotFoundError(f"data.init_args.paths={self.paths!r} matched no audio files")
        batches = FileBatches(rank_files(files, rank, world_size), self.batch_size,
                              self.sample_rate, self.max_duration)
        cropped = self.cropped.setdefault("predict", CroppedAudio(
            what="max_duration={limit:g} s of the predict data",
            where="counted in the data module's cropped['predict']; each file's seconds_ignored includes it"))
        return FileLoader(DataLoader(batches, batch_size=None, num_workers=self.num_workers, collate_fn=_identity),
                          cropped, self.max_duration)

    def predict_dataloader(self) -> FileLoader:
        return self.build_predict_loader()
