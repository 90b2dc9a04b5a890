"""``emorl fit|validate|test|predict -c CONFIG.yaml``: the LightningCLI entry point.

The model and the data are swappable ``class_path``/``init_args`` blocks. The label set is given once,
on the data (``data.init_args.label_set``), and linked into the model. ``--test_after_fit true``
runs the test sets on the best checkpoint right after ``fit`` and prints the WA/UA/F1 table.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from emorl_pl.callbacks.progress import RLProgressBar
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.report import format_results_table


class EmoRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run trainer.test after fit")
        parser.link_arguments("data.init_args.label_set", "model.init_args.labels")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        _refuse_linked_labels(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # The RL progress bar by default, added here rather than listed in configs: a config that lists a
        # bar breaks ``--trainer.enable_progress_bar false`` (Lightning refuses a bar callback then).
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            trainer["callbacks"] = [*callbacks, RLProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # The given config is the source of truth for --ckpt_path runs: the checkpoint's hparams omit the
        # policy block (weights come from model_dir + the checkpoint), so merging them would break it.
        return

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit"):
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self.after_test()

    def after_test(self) -> None:
        results = getattr(self.model, "last_eval", {}).get("test")
        if results and self.trainer.is_global_zero:
            print(format_results_table(results, title="test"))

    def after_validate(self) -> None:
        results = getattr(self.model, "last_eval", {}).get("val")
        if results and self.trainer.is_global_zero:
            print(format_results_table(results, title="validation"))


def _refuse_linked_labels(args: list[str]) -> None:
    """The model's label set is linked from ``data.init_args.label_set``; jsonargparse would silently
    replace a value given for it, so a user's ``model.init_args.labels`` is refused instead."""
    if any(a.split("=")[0] in ("--model.init_args.labels", "--model.labels") for a in args):
        raise ValueError(_LINKED_LABELS)
    for flag, value in zip(args, args[1:]):
        if flag not in ("-c", "--config", "--model") or not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            continue
        block = yaml.safe_load(Path(value).read_text()) or {}
        block = block.get("model", block) if flag != "--model" else block
        if isinstance(block, dict) and "labels" in (block.get("init_args") or {}):
            raise ValueError(f"{value}: {_LINKED_LABELS}")


_LINKED_LABELS = (
    "model.init_args.labels is set from data.init_args.label_set (they are linked so that they cannot "
    "disagree); give the label set on the data block instead"
)


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns None so that the script exits 0 on success)."""
    quiet_known_noise()
    run_cli(args)


def quiet_known_noise() -> None:
    """Drop two messages every run prints that say nothing about the run: Lightning's advertisement for
    litlogger (logged at start-up whenever another logger is used) and the deprecation warning that
    Lightning's own pytree helper triggers under torch 2.11 (``isinstance(treespec, LeafSpec)``). Only
    these: every other log line and warning still shows."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_litlogger_tip)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\.pytorch")


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def run_cli(args: list[str] | None = None) -> EmoRLCLI:
    return EmoRLCLI(
        GRPOModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
