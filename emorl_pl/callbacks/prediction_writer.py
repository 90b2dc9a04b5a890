"""Write ``emorl predict`` results as JSONL: one line per input (key/path, emotion, reasoning, raw text, and
``seconds_ignored``: the audio the model never heard, past its encoder window or cut off by the data
module's ``max_duration``), or, for an input that could not be used, a line with ``key`` and ``error``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JSONLPredictionWriter(BasePredictionWriter):
    """Appends each batch's predictions to ``output`` (per rank ``output.rankN`` when distributed).

    Refuses to overwrite an existing file unless ``overwrite`` is true (nothing the user wrote is lost).
    Inputs that could not be used (unreadable, empty, NaN/inf audio) arrive in the batch's ``errors``
    and are written as ``{"key", "error"}`` lines, with no emotion. A prediction's ``seconds_ignored``
    (the encoder window's crop) gets the seconds the data module cropped before (its row's
    ``meta["seconds_cropped"]``) added, so that it is all the audio the model never heard.
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
        batch = batch or {}
        cropped = {key: float(meta.get("seconds_cropped", 0.0))
                   for key, meta in zip(batch.get("keys", []), batch.get("meta", [])) if meta}
        rows = [with_data_crop(row, cropped) for row in prediction or []] + list(batch.get("errors", []))
        with open(self._path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def with_data_crop(row: dict[str, Any], cropped: dict[str, float]) -> dict[str, Any]:
    """``row`` with the seconds its input lost to the data module's crop (``cropped[key]``) added to
    ``seconds_ignored``: the model's own count starts from the audio it was given, already cropped."""
    extra = cropped.get(row.get("key"), 0.0)
    if not extra:
        return row
    return {**row, "seconds_ignored": round(float(row.get("seconds_ignored", 0.0)) + extra, 3)}
