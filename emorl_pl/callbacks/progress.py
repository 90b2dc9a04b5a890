"""A training progress bar in RL terms: the phase (cold start / GRPO) and optimizer steps out of the
run's total, instead of Lightning's per-epoch bar ("Epoch 1/-2" for a run bounded by ``max_steps``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def phase_description(global_step: int, sft_steps: int) -> str:
    """``cold start`` while ``global_step < sft_steps`` (supervised warm-up), then ``GRPO``."""
    return "cold start" if global_step < sft_steps else "GRPO"


class RLProgressBar(TQDMProgressBar):
    """One bar for the whole fit: n = optimizer steps done, total = the run's optimizer steps
    (``GRPOModule.total_steps``: ``max_steps`` / ``max_epochs`` with accumulation and mu), described by the
    current phase. Validation, test and predict bars are Lightning's."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 or self._leave:
            super().on_train_epoch_start(trainer, pl_module)
            total = pl_module.total_steps() if hasattr(pl_module, "total_steps") else None
            self.train_progress_bar.total = total
            self.train_progress_bar.n = trainer.global_step
            self._describe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        self._describe(trainer, pl_module)
        if self._should_update(trainer.global_step, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _describe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sft = int(getattr(pl_module.hparams, "sft_steps", 0) or 0)
        self.train_progress_bar.set_description(phase_description(trainer.global_step, sft))
