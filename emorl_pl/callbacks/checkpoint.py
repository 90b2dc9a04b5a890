"""``ModelCheckpoint`` whose ``last.ckpt`` is always the latest step, also after Ctrl-C or SIGTERM.

Lightning 2.6's ``ModelCheckpoint`` refreshes ``last.ckpt`` at a validation / epoch-end event only when a
top-k checkpoint was saved at that step: with ``monitor: val/ua`` and ``save_top_k: 1``, a run whose UA
stopped improving keeps an old ``last.ckpt``, and ``--ckpt_path last`` resumes from the best step, not
the last. This subclass (same arguments) writes ``last.ckpt`` at every checkpoint event whatever the
monitor says. ``emorl`` puts it in place of ``lightning.pytorch.callbacks.ModelCheckpoint`` in any
config (``emorl_pl.cli``), so user configs get it too.

Interrupts. The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) asks the run to stop at the
next point between optimizer steps (the end of the current accumulation window: a checkpoint inside one
would lose its generations). There ``last.ckpt`` is written and the run stops with the usual interrupt
exit: Lightning's ``KeyboardInterrupt`` handling (exit 1) or ``SIGTERMException`` with exit code 143. Ranks agree on the
stop with one boolean all-reduce per batch, so they save at the same step. A second Ctrl-C aborts at
once without saving. Exception: with several processes, Lightning itself raises on SIGTERM at the start
of the next batch; if that batch is inside an accumulation window, ``last.ckpt`` stays at the previous
checkpoint event (logged).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def between_optimizer_steps(pl_module: L.LightningModule) -> bool:
    """Whether a checkpoint taken now holds a whole step (no accumulation window half-way)."""
    window_open = getattr(pl_module, "accumulation_window_open", None)
    return not (window_open() if callable(window_open) else False)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments) with ``last.ckpt`` written at every checkpoint event
    and at a clean interrupt. See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_step = -1  # the global step last.ckpt holds (-1: none written by this run)
        self._stop_signal: str | None = None  # "SIGINT" / "SIGTERM" once asked to stop
        self._previous_sigint: Any = None

    # ---------------------------------------------------------------- last.ckpt at every event
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer, at_epoch_end: bool) -> None:
        if (not self.save_last or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or trainer.fast_dev_run or self._should_save_on_train_epoch_end(trainer) != at_epoch_end
                or self._last_step == trainer.global_step or trainer.global_step == 0):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, at_epoch_end=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, at_epoch_end=True)

    # ---------------------------------------------------------------- interrupts
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave Ctrl-C to Lightning
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop_signal = "SIGINT"
        # A second Ctrl-C aborts at once (Python's default: KeyboardInterrupt where the code is).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("Ctrl-C: stopping after the current optimizer step and writing last.ckpt "
                    "(Ctrl-C again to abort without saving)")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        # Every rank takes part in the decision (one all-reduce), so all save at the same step.
        stop = trainer.strategy.reduce_boolean_decision(self._stop_signal is not None, all=False)
        if not stop or not between_optimizer_steps(pl_module):
            return
        if self.save_last and self._last_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.save_last:
            log.warning("interrupted (%s): last.ckpt holds step %d: %s", self._stop_signal or "another rank",
                        trainer.global_step, self.last_model_path)
        self._restore_sigint()
        if self._stop_signal == "SIGTERM" or (self._stop_signal is None and trainer.received_sigterm):
            raise SIGTERMException(128 + signal.SIGTERM)  # the shell's code for "killed by SIGTERM", not 0
        raise KeyboardInterrupt()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return super().on_exception(trainer, pl_module, exception)
        if not self.save_last or trainer.state.fn != TrainerFn.FITTING or self._last_step == trainer.global_step:
            return None
        # An interrupt that did not pass through on_train_batch_end (a second Ctrl-C, SIGTERM under several
        # processes): the step may be half done, so nothing is written.
        log.warning("interrupted at step %d before a clean stop point: last.ckpt is not updated (it holds step "
                    "%s)", trainer.global_step, self._last_step if self._last_step >= 0 else "none of this run")
        return None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)
        # Lightning's on_train_end writes last only if none was written; the run's final step must be there.
        if self.save_last and self._last_step != trainer.global_step and trainer.global_step > 0 \
                and between_optimizer_steps(pl_module) and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
