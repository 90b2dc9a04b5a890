"""Confusion matrices of each validation/test set as TensorBoard images (no plotting library needed)."""

from __future__ import annotations

import lightning as L
import torch


def confusion_image(confusion: torch.Tensor, cell: int = 24) -> torch.Tensor:
    """A (3, H, W) image in [0, 1]: rows = gold, columns = predicted, each row normalised to recall.

    White = 0, dark blue = 1; a red tint marks the diagonal so that correct cells stand out.
    """
    c = confusion.float()
    recall = c / c.sum(dim=1, keepdim=True).clamp(min=1)
    k_rows, k_cols = recall.shape
    img = torch.ones(3, k_rows * cell, k_cols * cell)
    for i in range(k_rows):
        for j in range(k_cols):
            v = float(recall[i, j])
            rgb = (1 - v * (0.6 if i == j else 0.9), 1 - v * 0.8, 1 - v * (0.3 if i == j else 0.2))
            for ch in range(3):
                img[ch, i * cell : (i + 1) * cell - 1, j * cell : (j + 1) * cell - 1] = rgb[ch]
    return img.clamp(0, 1)


class ConfusionMatrixImages(L.Callback):
    """After each validation / test epoch, log ``<prefix>/<set>/confusion`` images and a text table."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        results = getattr(pl_module, "last_eval", {}).get(prefix)
        experiment = getattr(trainer.logger, "experiment", None)
        if not results or not trainer.is_global_zero or experiment is None or not hasattr(experiment, "add_image"):
            return
        labels = list(pl_module.labels)
        for name, values in results.items():
            conf = values.get("confusion")
            if conf is None:
                continue
            experiment.add_image(f"{prefix}/{name}/confusion", confusion_image(conf), trainer.global_step)
            header = "| gold \\ pred | " + " | ".join(labels) + (" | invalid |" if conf.shape[1] > len(labels) else " |")
            rows = [header, "|" + "---|" * (conf.shape[1] + 1)]
            for i, label in enumerate(labels):
                rows.append(f"| {label} | " + " | ".join(str(int(x)) for x in conf[i].tolist()) + " |")
            experiment.add_text(f"{prefix}/{name}/confusion", "\n".join(rows), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")
