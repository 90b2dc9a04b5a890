"""Write ``emorl predict`` results as JSONL: one line per input (key/path, emotion, reasoning, raw text, and
``seconds_ignored``: the audio past the model's encoder window that it never heard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JSONLPredictionWriter(BasePredictionWriter):
    """Appends each batch's predictions to ``output`` (per rank ``output.rankN`` when distributed).

    Refuses to overwrite an existing file unless ``overwrite`` is true (nothing the user wrote is lost).
    Inputs that could not be read arrive as rows with an ``error`` field and are written as such.
    """

    def __init__(self, output: str = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.overwrite = overwrite
        self._path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = self.output if trainer.world_size == 1 else self.output.with_name(f"{self.output.name}.rank{trainer.global_rank}")
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{path} exists; pass --trainer.callbacks.init_args.overwrite true or choose another output")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self._path = path

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        rows = list(prediction or []) + list((batch or {}).get("errors", []))
        with open(self._path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
