"""Sampled completions (key, gold, each of the G answers with its rewards and advantage) to any logger.

Each configured logger gets them in its own form: TensorBoard a markdown table (``add_text``), W&B (or
any logger with W&B's ``log_table``) a table, every other logger (CSV, MLflow, ...) rows appended to
``<log_dir>/completions.csv``. The helpers that pick a logger's form are shared with the confusion
matrix callback.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from emorl_pl.callbacks.rollout_log import current_rollout, is_due, record_of, rollout_records


def logger_kind(logger: Logger) -> str:
    """``tensorboard``, ``wandb`` (anything with W&B's ``log_table`` / ``log_image``) or ``files``."""
    if isinstance(logger, TensorBoardLogger):
        return "tensorboard"
    if callable(getattr(logger, "log_table", None)):
        return "wandb"
    return "files"


def logger_dir(logger: Logger, trainer: L.Trainer) -> Path:
    """Where a file-based log goes: the logger's versioned ``log_dir``, else its ``save_dir``, else the
    trainer's ``default_root_dir``. Not ``trainer.log_dir``: it broadcasts, and callers run on rank 0 only."""
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(folder or trainer.default_root_dir)


def free_path(path: Path) -> Path:
    """``path`` if it does not exist, else the first free ``<stem>_<n><suffix>``: never overwrite."""
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def csv_target(path: Path, header: Sequence[str]) -> Path:
    """The file to append rows with ``header`` to: ``path`` when it is new or holds the same columns (a
    resumed run in the same folder), else a free sibling name, so that another run's file is never mixed
    with these rows nor overwritten."""
    if not path.exists():
        return path
    with path.open(encoding="utf-8", newline="") as f:
        first = next(csv.reader(f), None)
    return path if first == list(header) else free_path(path)


def append_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Append ``rows`` to ``path``, writing ``header`` first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerows(rows)


def table(records: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): step, key, gold, sample, total, <each reward>, advantage, text."""
    columns = ["step", "key", "gold", "sample", "total", *reward_names, "advantage", "text"]
    rows = [[r["step"], r["key"], r["gold"], r["sample"], r["total"], *(r["rewards"][n] for n in reward_names),
             r["advantage"], r["text"]] for r in records]
    return columns, rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_samples(records: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> str:
    """Markdown: per utterance, a table of its answers with total, per-reward scores and advantage."""
    out: list[str] = []
    for r in records:
        if r["sample"] == 0:
            if out:
                out.append("")
            key = r["key"] if r["key"] is not None else "(no key)"
            out.append(f"**{key}** (gold: {r['gold']})\n")
            out.append("| # | total | " + " | ".join(reward_names) + " | advantage | answer |\n|"
                       + "---|" * (len(reward_names) + 4))
        per = " | ".join(_cell(r["rewards"][n]) for n in reward_names)
        text = r["text"].replace("|", "\\|").replace("\n", " ")
        out.append(f"| {r['sample']} | {_cell(r['total'])} | {per} | {_cell(r['advantage'])} | `{text}` |")
    return "\n".join(out) + "\n"


class CompletionSamples(L.Callback):
    """Every ``every_n_steps`` training steps (``global_step % every_n_steps == 0`` after the batch), log
    the last rollout's first ``max_prompts`` utterances (all their G completions) to every logger.

    Rank 0's rollout only (a sample, not a record: ``RolloutJSONL`` keeps every completion of every
    rank). Files go to ``<log_dir>/<filename>``; an existing file with other columns is left alone
    and the rows go to ``completions_1.csv`` (and so on) instead.
    """

    def __init__(self, every_n_steps: int = 50, max_prompts: int = 2, filename: str = "completions.csv") -> None:
        if every_n_steps < 1 or max_prompts < 1:
            raise ValueError(f"every_n_steps and max_prompts must be >= 1, got {every_n_steps}, {max_prompts}")
        self.every_n_steps = every_n_steps
        self.max_prompts = max_prompts
        self.filename = filename
        self._logged: Any = None  # the rollout last logged, so that one is never logged twice
        self._csv_paths: dict[Path, Path] = {}  # log dir -> the file this run appends to

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = current_rollout(pl_module)
        if last is None or last is self._logged or not trainer.is_global_zero:
            return
        if not is_due(trainer.global_step, self.every_n_steps):
            return
        self._logged = last
        record = record_of(last, pl_module)
        records = rollout_records(record, record.group_size, trainer.global_step)[: self.max_prompts * record.group_size]
        self.log_records(trainer, records, record.reward_names)

    def log_records(self, trainer: L.Trainer, records: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> None:
        step = trainer.global_step
        columns, rows = table(records, reward_names)
        folders: list[Path] = []
        for logger in trainer.loggers:
            kind = logger_kind(logger)
            if kind == "tensorboard":
                logger.experiment.add_text("completions", render_samples(records, reward_names), step)
            elif kind == "wandb":
                logger.log_table(key="completions", columns=columns, data=rows, step=step)
            elif logger_dir(logger, trainer) not in folders:  # two file loggers in one folder: one file
                folders.append(logger_dir(logger, trainer))
        for folder in folders:
            if folder not in self._csv_paths:  # chosen once per run, then appended to
                self._csv_paths[folder] = csv_target(folder / self.filename, columns)
            append_csv(self._csv_paths[folder], columns, rows)
