"""Rollouts as records (one per completion) and ``RolloutJSONL``: every rollout to a JSON-lines file.

The GRPO module keeps its last rollout as ``pl_module._last_rollout = (keys, golds, texts, scored[,
advantages])``: ``keys`` one per utterance (or None), ``golds`` and ``texts`` one per completion (G per
utterance, in order), ``scored`` the ``RewardOutput`` and ``advantages`` one float per completion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L


def _float_list(values: Any) -> list[float]:
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def rollout_records(last: Sequence[Any], group_size: int, step: int) -> list[dict[str, Any]]:
    """One dict per completion: step, key, gold, sample (index in its group), total, rewards (name ->
    value or None), advantage (None when the rollout has none) and text."""
    keys, golds, texts, scored = last[:4]
    advantages = _float_list(last[4]) if len(last) > 4 and last[4] is not None else None
    if len(golds) != len(texts) or len(texts) % group_size:
        raise ValueError(f"rollout has {len(texts)} completions and {len(golds)} gold labels; expected "
                         f"equal counts, a multiple of the group size {group_size}")
    if advantages is not None and len(advantages) != len(texts):
        raise ValueError(f"rollout has {len(advantages)} advantages for {len(texts)} completions")
    records = []
    for i, text in enumerate(texts):
        b, g = divmod(i, group_size)
        records.append({
            "step": int(step),
            "key": keys[b] if keys else None,
            "gold": golds[i],
            "sample": g,
            "total": float(scored.total[i]),
            "rewards": {name: values[i] for name, values in scored.per_reward.items()},
            "advantage": None if advantages is None else advantages[i],
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
    ``step, rank, key, gold, sample, completion, rewards {name: value}, total, advantage``.

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
        last = getattr(pl_module, "_last_rollout", None)
        if self._file is None or last is None or last is self._logged:
            return
        if not is_due(trainer.global_step, self.every_n_steps):
            return
        self._logged = last
        records = rollout_records(last, pl_module.hparams.group_size, trainer.global_step)
        self._file.write("".join(jsonl_line(r, trainer.global_rank) + "\n" for r in records))
        self._file.flush()  # a crashed run keeps what it sampled

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
