"""Predict over plain audio files: a folder, a glob, or a list of paths (no shards needed).

A missing, empty or unreadable file does not stop the run: it becomes an ``errors`` row of its batch
(``{"key": path, "error": "..."}``), which the prediction writer writes as its own JSONL line.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emorl_pl.audio import load_audio, resample, to_mono

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


class AudioFiles(Dataset):
    def __init__(self, paths: list[str], sample_rate: int, max_duration: float | None) -> None:
        self.paths, self.sample_rate, self.max_duration = paths, sample_rate, max_duration

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            audio, sr = load_audio(path)
            audio = resample(to_mono(audio), sr, self.sample_rate).astype(np.float32)
            if audio.size == 0:
                raise ValueError(f"{path}: audio is empty")
        except Exception as err:  # noqa: BLE001 - any unreadable file becomes an error row
            return {"key": path, "error": str(err)}
        if self.max_duration is not None:
            audio = audio[: int(self.max_duration * self.sample_rate)]
        return {"key": path, "audio": torch.from_numpy(audio)}


def collate_files(items: list[dict[str, Any]], sample_rate: int) -> dict[str, Any]:
    ok = [x for x in items if "audio" in x]
    return {
        "waveforms": [x["audio"] for x in ok],
        "sample_rate": sample_rate,
        "keys": [x["key"] for x in ok],
        "labels": [None] * len(ok),
        "texts": [None] * len(ok),
        "corpus": ["files"] * len(ok),
        "meta": [{} for _ in ok],
        "errors": [{"key": x["key"], "error": x["error"]} for x in items if "error" in x],
    }


class AudioFilesDataModule(L.LightningDataModule):
    """``emorl predict`` input: ``paths`` is a folder, a glob (``data/**/*.wav``) or a list of files."""

    def __init__(
        self,
        paths: str | list[str],
        label_set: str | list[str] = "iemocap4",
        sample_rate: int = 16000,
        max_duration: float | None = 30.0,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.paths, self.label_set, self.sample_rate = paths, label_set, sample_rate
        self.max_duration, self.batch_size, self.num_workers = max_duration, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        files = expand_audio_paths(self.paths)
        if not files:
            raise FileNotFoundError(f"data.init_args.paths={self.paths!r} matched no audio files")
        return DataLoader(
            AudioFiles(files, self.sample_rate, self.max_duration),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_files, sample_rate=self.sample_rate),
        )
