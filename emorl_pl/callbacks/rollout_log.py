"""Rollouts as records (one per completion) and ``RolloutJSONL``: every rollout to a JSON-lines file.

The GRPO module publishes the completions of each GRPO window as ``pl_module.last_rollout``, a
``emorl_pl.rollout_record.RolloutRecord`` (keys per utterance; golds, texts, rewards and advantages per
completion); ``as_record`` makes one from a ``(keys, golds, texts, scored[, advantages])`` tuple.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L

from emorl_pl.rollout_record import RolloutRecord


def as_record(rollout: RolloutRecord | Sequence[Any], group_size: int) -> RolloutRecord:
    """A ``RolloutRecord`` as it is, or one from a ``(keys, golds, texts, scored[, advantages])`` tuple."""
    if isinstance(rollout, RolloutRecord):
        return rollout
    keys, golds, texts, scored = rollout[:4]
    advantages = rollout[4] if len(rollout) > 4 else None
    if advantages is not None:
        advantages = [float(v) for v in (advantages.tolist() if hasattr(advantages, "tolist") else advantages)]
    return RolloutRecord.of_batches([(keys, golds, texts, scored, advantages)], group_size)


def current_rollout(pl_module: L.LightningModule) -> Any:
    """The module's latest rollout, its ``last_rollout`` (a ``RolloutRecord``); None before the first.
    Callbacks compare it by identity to log each rollout once."""
    return getattr(pl_module, "last_rollout", None)


def record_of(last: RolloutRecord | Sequence[Any], pl_module: L.LightningModule) -> RolloutRecord:
    """``current_rollout``'s value as a record (a tuple takes the module's ``hparams.group_size``)."""
    return last if isinstance(last, RolloutRecord) else as_record(last, pl_module.hparams.group_size)


def rollout_records(last: RolloutRecord | Sequence[Any], group_size: int, step: int) -> list[dict[str, Any]]:
    """One dict per completion: step, key, gold, sample (index in its group), total, rewards (name ->
    value or None), advantage (None when the rollout has none) and text."""
    record = as_record(last, group_size)
    G = record.group_size
    records = []
    for i, text in enumerate(record.texts):
        b, g = divmod(i, G)
        records.append({
            "step": int(step),
            "key": record.keys[b] if record.keys else None,
            "gold": record.golds[i],
            "sample": g,
            "total": float(record.scored.total[i]),
            "rewards": {name: values[i] for name, values in record.scored.per_reward.items()},
            "advantage": None if record.advantages is None else record.advantages[i],
            "text": text,
        })
    return records


def _json_safe(value: Any) -> Any:
    """NaN (a total where no reward applied) is not JSON; write it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def jsonl_line(record: dict[str, Any], rank: int) -> str:
    """A record as one JSON line, with the completion under ``completion`` and the writer's rank."""
    out = {"step": record["step"], "rank": rank, "key": record["key"], "gold": record["gold"],
           "sample": record["sample"], "completion": record["text"], "rewards": record["rewards"],
           "total": record["total"], "advantage": record["advantage"]}
    return json.dumps(_json_safe(out), ensure_ascii=False)


def rank_path(path: str | Path, rank: int) -> Path:
    """``rollouts.jsonl`` on rank 0, ``rollouts.rank3.jsonl`` on rank 3: each rank writes its own rollouts."""
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def is_due(step: int, every_n_steps: int) -> bool:
    return step % every_n_steps == 0


class RolloutJSONL(L.Callback):
    """Write every completion of the rollouts of every ``every_n_steps``-th training step as a JSON line:
    ``step, rank, key, gold, sample, completion, rewards {name: value}, total, advantage``. A GRPO module's
    rollout is a whole window (every batch of an accumulation window), recorded at its optimizer step.

    Each rank writes the rollouts it sampled: rank 0 to ``path``, rank r > 0 to ``<stem>.rank<r><suffix>``
    (so the files together hold every completion). ``path`` defaults to ``<log_dir>/rollouts.jsonl``. An
    existing file (of any rank) stops the run at setup unless ``overwrite`` (start afresh) or ``append``
    (e.g. when resuming) is set. A step counts when ``global_step % every_n_steps == 0`` after the batch;
    with ``num_iterations`` mu > 1 steps advance by mu per window, so use a multiple of mu.
    """

    def __init__(self, path: str | None = None, every_n_steps: int = 1, overwrite: bool = False,
                 append: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if overwrite and append:
            raise ValueError("RolloutJSONL: give overwrite or append, not both")
        self.path, self.every_n_steps = path, every_n_steps
        self.overwrite, self.append = overwrite, append
        self._file: IO[str] | None = None
        self._logged: Any = None  # the rollout last written, so that one is never written twice
        self.file_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._file is not None:
            return
        if self.file_path is not None:  # a later fit with this callback: continue the file it wrote
            self._file = self.file_path.open("a", encoding="utf-8")
            return
        base = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "rollouts.jsonl"
        # Every rank checks every rank's file, so that all of them stop or go on together.
        existing = [p for p in (rank_path(base, r) for r in range(trainer.world_size)) if p.exists()]
        if existing and not (self.overwrite or self.append):
            raise FileExistsError(f"RolloutJSONL: {', '.join(map(str, existing))} exists; set overwrite: true "
                                  "to replace it, append: true to add to it, or choose another path")
        self.file_path = rank_path(base, trainer.global_rank)
        self.file_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.file_path.open("a" if self.append else "w", encoding="utf-8")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = current_rollout(pl_module)
        if self._file is None or last is None or last is self._logged:
            return
        if not is_due(trainer.global_step, self.every_n_steps):
            return
        self._logged = last
        record = record_of(last, pl_module)
        records = rollout_records(record, record.group_size, trainer.global_step)
        self._file.write("".join(jsonl_line(r, trainer.global_rank) + "\n" for r in records))
        self._file.flush()  # a crashed run keeps what it sampled

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
