"""Confusion matrices of each validation / test set as figures (torchmetrics' own ``plot``) in any logger.

TensorBoard: ``add_figure`` plus a markdown table of the counts; W&B (any logger with ``log_image``): an
image; every other logger: a PNG under ``<log_dir>/confusion/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib import pyplot as plt
from torchmetrics.classification import MulticlassConfusionMatrix

from emorl_pl.callbacks.samples import free_path, logger_dir, logger_kind

INVALID = "invalid"


def square_confusion(confusion: torch.Tensor, labels: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """The K x (K+1) counts of ``SERMetrics`` (last column: unparseable answers) as the square matrix
    torchmetrics plots, with the axis names: an ``invalid`` gold row is added, all zeros (no utterance
    is gold-invalid), so that invalid answers stay visible as a column. A K x K matrix is returned as is."""
    k_rows, k_cols = confusion.shape
    if k_rows != len(labels) or k_cols not in (k_rows, k_rows + 1):
        raise ValueError(f"confusion of shape {tuple(confusion.shape)} does not fit {len(labels)} labels")
    if k_cols == k_rows:
        return confusion.long(), list(labels)
    square = torch.zeros(k_cols, k_cols, dtype=torch.long)
    square[:k_rows] = confusion.long().cpu()
    return square, [*labels, INVALID]


def confusion_figure(confusion: torch.Tensor, labels: Sequence[str], title: str | None = None) -> Any:
    """A matplotlib figure of the counts (rows gold, columns predicted), class names on both axes."""
    square, names = square_confusion(confusion, labels)
    fig, ax = MulticlassConfusionMatrix(num_classes=len(names)).plot(val=square, labels=names)
    if title:
        ax.set_title(title)
    return fig


def figure_array(fig: Any) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array: an image every logger takes (W&B included)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def counts_markdown(confusion: torch.Tensor, labels: Sequence[str]) -> str:
    header = "| gold \\ pred | " + " | ".join(labels) + (f" | {INVALID} |" if confusion.shape[1] > len(labels) else " |")
    rows = [header, "|" + "---|" * (confusion.shape[1] + 1)]
    for i, label in enumerate(labels):
        rows.append(f"| {label} | " + " | ".join(str(int(x)) for x in confusion[i].tolist()) + " |")
    return "\n".join(rows)


class ConfusionMatrixImages(L.Callback):
    """After each validation / test run, log ``<prefix>/<set>/confusion`` for each evaluated set
    (``pl_module.last_eval[prefix][set]["confusion"]``, synced over ranks) on rank 0; the sanity check
    is skipped."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        results = getattr(pl_module, "last_eval", {}).get(prefix)
        if not results or not trainer.is_global_zero or not trainer.loggers:
            return
        labels = list(pl_module.labels)
        step = trainer.global_step
        for name, values in results.items():
            conf = values.get("confusion")
            if conf is None:
                continue
            tag = f"{prefix}/{name}/confusion"
            fig = confusion_figure(conf, labels, title=f"{prefix}/{name}, step {step}")
            try:
                self._log_figure(trainer, fig, tag, f"{prefix}_{name}_step{step}", conf, labels)
            finally:
                plt.close(fig)  # pyplot keeps every figure alive until closed

    @staticmethod
    def _log_figure(trainer: L.Trainer, fig: Any, tag: str, stem: str, conf: torch.Tensor, labels: list[str]) -> None:
        step = trainer.global_step
        saved = set()
        for logger in trainer.loggers:
            kind = logger_kind(logger)
            if kind == "tensorboard":
                logger.experiment.add_figure(tag, fig, step, close=False)
                logger.experiment.add_text(tag, counts_markdown(conf, labels), step)
            elif kind == "wandb":
                logger.log_image(key=tag, images=[figure_array(fig)], step=step)
            else:
                folder = logger_dir(logger, trainer) / "confusion"
                if folder in saved:
                    continue
                saved.add(folder)
                folder.mkdir(parents=True, exist_ok=True)
                fig.savefig(free_path(folder / f"{stem}.png"))

    # The *_end hooks, not *_epoch_end: Lightning runs callbacks' epoch-end hooks before the module's,
    # which is where ``last_eval`` is filled, so an epoch-end hook would see the previous evaluation.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")
