"""Logging callbacks with real Lightning loggers: CompletionSamples (TensorBoard text, W&B table, CSV),
RolloutJSONL (every completion) and ConfusionMatrixImages (torchmetrics figures), driven by a real
Trainer over a small module that exposes rollouts / evaluation results the way GRPOModule does."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from matplotlib import image as mpimg
from matplotlib import pyplot as plt
from sklearn.metrics import confusion_matrix
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from emorl_pl.callbacks.confusion import ConfusionMatrixImages, confusion_figure, square_confusion
from emorl_pl.callbacks.rollout_log import RolloutJSONL, as_record, rank_path, rollout_records
from emorl_pl.callbacks.samples import CompletionSamples, csv_target, logger_kind, render_samples
from emorl_pl.metrics import SERMetrics
from emorl_pl.rewards import RewardOutput

LABELS = ("neutral", "happy", "angry", "sad")
G = 2


class FakeWandb(Logger):
    """Stands for WandbLogger (wandb is not a dependency): records log_table / log_image calls."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "fake_wandb"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append({"key": key, "images": images, "step": step})


def make_rollout(b: int, with_advantages: bool = True) -> tuple:
    """Batch b: utterances u{b}x and u{b}y, G = 2 samples each; the format reward does not apply (None)
    to the last completion."""
    keys = [f"u{b}x", f"u{b}y"]
    golds = ["happy", "happy", "sad", "sad"]
    texts = [f"answer {b}.{i} | with a pipe\nand a newline" if i == 0 else f"answer {b}.{i}" for i in range(4)]
    eswr = [1.0, 0.0, 0.5, float(b)]
    fmt = [1.0, 1.0, 0.0, None]
    total = [e + 0.5 * f if f is not None else e for e, f in zip(eswr, fmt)]
    scored = RewardOutput(total=total, per_reward={"eswr": eswr, "format": fmt})
    advantages = [0.7, -0.7, -0.25 * b, 0.25 * b]
    return (keys, golds, texts, scored, advantages) if with_advantages else (keys, golds, texts, scored)


class RolloutModule(L.LightningModule):
    """Sets ``last_rollout`` (a ``RolloutRecord``) like GRPOModule, at the batches in ``rollout_batches`` (others keep the
    previous one, as cold-start steps do), one optimizer step per batch."""

    def __init__(self, rollout_batches: tuple[int, ...] = (0, 2, 3), with_advantages: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.group_size = G
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.rollouts: dict[int, tuple] = {}

    def training_step(self, batch, batch_idx):
        if batch_idx in self.hparams.rollout_batches:
            self.rollouts[batch_idx] = make_rollout(batch_idx, self.hparams.with_advantages)
            self.last_rollout = as_record(self.rollouts[batch_idx], G)
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, loggers: list[Logger], callbacks: list[L.Callback], steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=loggers, callbacks=callbacks, accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=1)
    trainer.fit(module, DataLoader([torch.ones(1)] * steps, batch_size=None))
    return trainer


def tb_texts(log_dir: str, tag: str) -> list[tuple[int, str]]:
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def expected_rows(rollout: tuple, step: int, prompts: int) -> list[list[str]]:
    """The CSV rows of a rollout, built from its parts (not through rollout_records)."""
    keys, golds, texts, scored, *adv = rollout
    rows = []
    for i in range(prompts * G):
        fmt = scored.per_reward["format"][i]
        rows.append([str(step), keys[i // G], golds[i], str(i % G), str(scored.total[i]),
                     str(scored.per_reward["eswr"][i]), "" if fmt is None else str(fmt),
                     str(adv[0][i]) if adv else "", texts[i]])
    return rows


# ----------------------------------------------------------------------------- completion samples
def test_completion_samples_go_to_each_logger_in_its_form(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb = FakeWandb()
    module = RolloutModule()
    fit(module, [tb, csv_logger, wandb], [CompletionSamples(every_n_steps=2, max_prompts=1)])
    # Due at steps 2 and 4: step 2 still holds batch 0's rollout (batch 1 made none), step 4 batch 3's.
    logged = [(2, module.rollouts[0]), (4, module.rollouts[3])]
    header = ["step", "key", "gold", "sample", "total", "eswr", "format", "advantage", "text"]

    with open(Path(csv_logger.log_dir) / "completions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == header
    assert rows[1:] == [row for step, r in logged for row in expected_rows(r, step, prompts=1)]

    assert [t["step"] for t in wandb.tables] == [2, 4] and {t["key"] for t in wandb.tables} == {"completions"}
    for table, (step, rollout) in zip(wandb.tables, logged):
        assert table["columns"] == header
        assert [[str(v) if v is not None else "" for v in row] for row in table["data"]] == expected_rows(
            rollout, step, prompts=1)

    texts = tb_texts(tb.log_dir, "completions")
    assert [s for s, _ in texts] == [2, 4]
    md = texts[1][1]
    assert "**u3x** (gold: happy)" in md and "u3y" not in md  # max_prompts = 1
    assert "| # | total | eswr | format | advantage | answer |" in md
    assert "| 0 | 1.50 | 1.00 | 1.00 | 0.70 | `answer 3.0 \\| with a pipe and a newline` |" in md
    assert "| 1 | 0.50 | 0.00 | 1.00 | -0.70 | `answer 3.1` |" in md
    assert not (Path(tb.log_dir) / "completions.csv").exists()  # TensorBoard gets text, not a file


def test_completion_samples_accept_the_4_tuple_and_never_overwrite_another_runs_file(tmp_path):
    folder = tmp_path / "csv" / "version_0"
    folder.mkdir(parents=True)
    (folder / "completions.csv").write_text("step,key,other\n9,k,x\n")  # another run's, other columns
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    module = RolloutModule(rollout_batches=(0,), with_advantages=False)
    fit(module, [csv_logger], [CompletionSamples(every_n_steps=1, max_prompts=2)], steps=2)
    assert (folder / "completions.csv").read_text() == "step,key,other\n9,k,x\n"
    with open(folder / "completions_1.csv", newline="") as f:
        rows = list(csv.reader(f))
    # One rollout, logged once (step 1) although it is still the last one at step 2.
    assert rows[1:] == expected_rows(module.rollouts[0], 1, prompts=2)
    assert all(r[7] == "" for r in rows[1:])  # no advantages in a 4-tuple


def test_csv_target_appends_to_a_file_with_the_same_columns(tmp_path):
    path = tmp_path / "completions.csv"
    assert csv_target(path, ["a", "b"]) == path
    path.write_text("a,b\n1,2\n")
    assert csv_target(path, ["a", "b"]) == path  # a resumed run in the same folder appends
    assert csv_target(path, ["a", "c"]) == tmp_path / "completions_1.csv"
    (tmp_path / "completions_1.csv").write_text("x\n")
    assert csv_target(path, ["a", "c"]) == tmp_path / "completions_2.csv"


def test_logger_kinds():
    assert logger_kind(TensorBoardLogger("unused")) == "tensorboard"
    assert logger_kind(object.__new__(WandbLogger)) == "wandb"  # the real class, without wandb installed
    assert logger_kind(FakeWandb()) == "wandb"
    assert logger_kind(CSVLogger("unused")) == "files"


def test_render_samples_marks_missing_values():
    records = rollout_records(make_rollout(1, with_advantages=False), G, step=5)
    md = render_samples(records, ["eswr", "format"])
    assert "| 1 | 1.00 | 1.00 | - | - | `answer 1.3` |" in md  # format None, no advantage
    assert md.count("**u1") == 2


# ----------------------------------------------------------------------------- rollout JSONL
def test_rollout_jsonl_writes_every_completion_of_every_new_rollout(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    module = RolloutModule()
    fit(module, [CSVLogger(tmp_path)], [RolloutJSONL(path=str(path), every_n_steps=1)])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # Batches 0, 2, 3 made rollouts; each is written once, at the step after its batch.
    expected = []
    for b, step in ((0, 1), (2, 3), (3, 4)):
        keys, golds, texts, scored, adv = module.rollouts[b]
        for i in range(4):
            expected.append({"step": step, "rank": 0, "key": keys[i // G], "gold": golds[i], "sample": i % G,
                             "completion": texts[i],
                             "rewards": {"eswr": scored.per_reward["eswr"][i], "format": scored.per_reward["format"][i]},
                             "total": scored.total[i], "advantage": adv[i]})
    assert lines == expected


def test_rollout_jsonl_every_n_steps_and_default_path(tmp_path):
    logger = CSVLogger(tmp_path)
    module = RolloutModule(rollout_batches=(0, 1, 2, 3))
    fit(module, [logger], [RolloutJSONL(every_n_steps=2)])
    lines = [json.loads(line) for line in (Path(logger.log_dir) / "rollouts.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2] * 4 + [4] * 4
    assert [line["completion"] for line in lines] == module.rollouts[1][2] + module.rollouts[3][2]


def test_rollout_jsonl_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"mine": 1}\n')
    with pytest.raises(FileExistsError, match="rollouts.jsonl exists; set overwrite: true"):
        fit(RolloutModule(), [CSVLogger(tmp_path)], [RolloutJSONL(path=str(path))])
    assert path.read_text() == '{"mine": 1}\n'
    fit(RolloutModule(rollout_batches=(0,)), [CSVLogger(tmp_path)], [RolloutJSONL(path=str(path), append=True)], steps=1)
    assert path.read_text().splitlines()[0] == '{"mine": 1}' and len(path.read_text().splitlines()) == 5
    fit(RolloutModule(rollout_batches=(0,)), [CSVLogger(tmp_path)], [RolloutJSONL(path=str(path), overwrite=True)], steps=1)
    assert len(path.read_text().splitlines()) == 4 and "mine" not in path.read_text()
    # Another rank's file counts too: every rank must stop, not only the one whose file exists.
    other = rank_path(tmp_path / "r.jsonl", 1)
    assert other.name == "r.rank1.jsonl"
    other.write_text("")
    rank0_of_two = SimpleNamespace(world_size=2, global_rank=0, log_dir=None, default_root_dir=str(tmp_path))
    with pytest.raises(FileExistsError, match="r.rank1.jsonl exists"):
        RolloutJSONL(path=str(tmp_path / "r.jsonl")).setup(rank0_of_two, None, "fit")
    assert not (tmp_path / "r.jsonl").exists()
    rank1_of_two = SimpleNamespace(world_size=2, global_rank=1, log_dir=None, default_root_dir=str(tmp_path))
    cb = RolloutJSONL(path=str(tmp_path / "r.jsonl"), overwrite=True)
    cb.setup(rank1_of_two, None, "fit")
    assert cb.file_path == other
    cb.teardown(rank1_of_two, None, "fit")
    with pytest.raises(ValueError, match="overwrite or append, not both"):
        RolloutJSONL(path="x", overwrite=True, append=True)


def test_rollout_records_json_safe_nan_total(tmp_path):
    keys, golds, texts, scored, adv = make_rollout(0)
    scored.total[1] = math.nan  # no reward applied to that completion
    records = rollout_records((keys, golds, texts, scored, torch.tensor(adv)), G, step=3)
    assert math.isnan(records[1]["total"]) and records[2]["advantage"] == pytest.approx(0.0)
    from emorl_pl.callbacks.rollout_log import jsonl_line

    assert json.loads(jsonl_line(records[1], rank=2))["total"] is None
    with pytest.raises(ValueError, match="3 advantages for 4 completions"):
        rollout_records((keys, golds, texts, scored, adv[:3]), G, step=3)


# ----------------------------------------------------------------------------- confusion matrices
# 12 answers over 4 classes; None = unparseable (the invalid column).
GOLDS = ["happy", "happy", "happy", "sad", "sad", "angry", "angry", "angry", "neutral", "neutral", "sad", "happy"]
PREDS = ["happy", "sad", None, "sad", "sad", "angry", "happy", None, "neutral", "angry", "happy", "happy"]


def sklearn_counts(golds: list[str], preds: list[str | None]) -> np.ndarray:
    """(K+1) x (K+1) counts with 'invalid' as the last class: the square matrix the figure should show."""
    return confusion_matrix(golds, [p or "invalid" for p in preds], labels=[*LABELS, "invalid"])


def test_confusion_figure_shows_the_counts_with_class_names():
    metric = SERMetrics(LABELS)
    metric.update(PREDS, GOLDS)
    fig = confusion_figure(metric.compute()["confusion"], LABELS, title="val/val")
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), sklearn_counts(GOLDS, PREDS))
    assert [t.get_text() for t in ax.get_xticklabels()] == [*LABELS, "invalid"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [*LABELS, "invalid"]
    cell_texts = [t.get_text() for t in ax.texts]
    assert cell_texts[: 5] == [str(v) for v in sklearn_counts(GOLDS, PREDS)[0]]
    plt.close(fig)
    square, names = square_confusion(torch.eye(3, dtype=torch.long), ["a", "b", "c"])  # K x K stays as is
    assert names == ["a", "b", "c"] and square.shape == (3, 3)
    with pytest.raises(ValueError, match="does not fit 3 labels"):
        square_confusion(torch.zeros(3, 5), ["a", "b", "c"])


class EvalModule(L.LightningModule):
    """Evaluates ``answers`` (preds, golds) into SERMetrics; fills ``last_eval`` in its own epoch-end hook,
    as GRPOModule does (which runs after the callbacks' epoch-end hooks)."""

    def __init__(self, answers: list[tuple[list, list]]) -> None:
        super().__init__()
        self.labels = LABELS
        self.answers = answers
        self.metric = SERMetrics(LABELS)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def _step(self, batch_idx: int) -> None:
        preds, golds = self.answers[batch_idx]
        self.metric.update(preds, golds)

    def validation_step(self, batch, batch_idx):
        self._step(batch_idx)

    def test_step(self, batch, batch_idx):
        self._step(batch_idx)

    def _epoch_end(self, prefix: str) -> None:
        self.last_eval = {prefix: {"val" if prefix == "val" else "test": self.metric.compute()}}
        self.metric.reset()

    def on_validation_epoch_end(self):
        self._epoch_end("val")

    def on_test_epoch_end(self):
        self._epoch_end("test")


def counts_from_markdown(md: str) -> np.ndarray:
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| gold")]
    return np.array([[int(x) for x in line.strip("| ").split(" | ")[1:]] for line in rows])


def test_confusion_matrices_go_to_each_logger(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb = FakeWandb()
    trainer = L.Trainer(logger=[tb, csv_logger, wandb], callbacks=[ConfusionMatrixImages()], accelerator="cpu",
                        devices=1, enable_progress_bar=False, enable_model_summary=False)
    half = len(GOLDS) // 2
    first = EvalModule([(PREDS[:half], GOLDS[:half]), (PREDS[half:], GOLDS[half:])])
    loader = DataLoader([torch.ones(1)] * 2, batch_size=None)
    trainer.validate(first, loader, verbose=False)
    # A second evaluation with other answers: what is logged must be this one's, not the previous one's.
    second_preds = list(reversed(PREDS))
    second = EvalModule([(second_preds, GOLDS)])
    trainer.validate(second, DataLoader([torch.ones(1)], batch_size=None), verbose=False)
    trainer.test(second, DataLoader([torch.ones(1)], batch_size=None), verbose=False)

    expected = [sklearn_counts(GOLDS, PREDS), sklearn_counts(GOLDS, second_preds)]
    tables = tb_texts(tb.log_dir, "val/val/confusion")
    assert len(tables) == 2
    for (_, md), counts in zip(tables, expected):
        np.testing.assert_array_equal(counts_from_markdown(md), counts[: len(LABELS)])
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("val/val/confusion")) == 2 and len(acc.Images("test/test/confusion")) == 1

    assert [i["key"] for i in wandb.images] == ["val/val/confusion", "val/val/confusion", "test/test/confusion"]
    image = wandb.images[0]["images"][0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0

    pngs = sorted(p.name for p in (Path(csv_logger.log_dir) / "confusion").iterdir())
    assert pngs == ["test_test_step0.png", "val_val_step0.png", "val_val_step0_1.png"]  # never overwritten
    assert mpimg.imread(Path(csv_logger.log_dir) / "confusion" / pngs[1]).shape[:2] == image.shape[:2]
