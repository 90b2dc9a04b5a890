"""``emorl fit|validate|test|predict -c CONFIG.yaml``: the LightningCLI entry point.

The model and the data are swappable ``class_path``/``init_args`` blocks. The label set is given once,
on the data (``data.init_args.label_set``), and linked into the model. ``--test_after_fit true``
runs the test sets on the best checkpoint right after ``fit`` and prints the WA/UA/F1 table.

What the CLI adds to Lightning so that no run loses work (README "Resume"):
- ``--ckpt_path last`` resumes the config's newest run in its own log folder, or stops saying where it
  looked (``emorl_pl.resume``); the resumed run's config is saved as ``config.resume-K.yaml`` beside the
  first one's;
- a checkpoint's run identity is compared with the config before training (``emorl_pl.run_identity``):
  a change is refused with a table unless ``--resume_changes allow``;
- ``lightning.pytorch.callbacks.ModelCheckpoint`` becomes ``emorl_pl.callbacks.checkpoint.ModelCheckpoint``
  (same arguments; ``last.ckpt`` is always the latest step, also after Ctrl-C / SIGTERM);
- checkpoints are written by ``AtomicCheckpointIO`` unless the config names its own checkpoint IO, so a
  write error stops the run with the path and the OS error.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from emorl_pl.callbacks.progress import RLProgressBar
from emorl_pl.checkpointing import METADATA_FILENAME, AtomicCheckpointIO, is_sharded_checkpoint
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.report import format_results_table
from emorl_pl.resume import ResumeError, next_config_name, resolve_last, version_of
from emorl_pl.run_identity import (
    RESUME_CHANGES,
    RUN_IDENTITY_KEY,
    STRUCTURAL,
    ResumeConfigError,
    check_resume,
)
from emorl_pl.strategies import FSDP2Strategy, LaunchMismatchError

log = logging.getLogger(__name__)

LIGHTNING_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
EMORL_CHECKPOINT = "emorl_pl.callbacks.checkpoint.ModelCheckpoint"
_CHECKPOINT_CLASSES = (LIGHTNING_CHECKPOINT, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
                       EMORL_CHECKPOINT)
# Lightning's ckpt_path keywords other than "last", resolved by Lightning itself.
_LIGHTNING_CKPT_KEYWORDS = ("best", "hpc", "registry")


class EmoRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run trainer.test after fit")
        parser.link_arguments("data.init_args.label_set", "model.init_args.labels")
        parser.add_argument("--resume_changes", type=str, default="refuse",
                            help="with --ckpt_path: 'refuse' (default) stops a resume whose config changes the "
                                 "saved run's settings (group size, labels, rewards, ...) with a table of the "
                                 "changes; 'allow' resumes anyway")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        _refuse_linked_labels(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("resume_changes") not in RESUME_CHANGES:
            raise ValueError(f"--resume_changes must be one of {list(RESUME_CHANGES)}, got {config.get('resume_changes')!r}")
        _use_emorl_checkpoint(config)
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self._resolve_resume(config)

    def _resolve_resume(self, config) -> None:
        """Point ``ckpt_path`` at the checkpoint meant and the logger at that run's folder (module docstring)."""
        trainer = config.trainer
        log_root, version = _logger_root(trainer)
        ckpt = str(config.ckpt_path)
        if ckpt in _LIGHTNING_CKPT_KEYWORDS:
            return
        if ckpt == "last":
            default_dir = Path(trainer.get("default_root_dir") or ".") / "checkpoints"
            target = resolve_last(log_root, version, _checkpoint_dirpath(trainer), default_dir)
            path, run_version = target.ckpt_path, target.version
        else:
            path = Path(ckpt)
            if not path.exists():
                raise ResumeError(f"--ckpt_path {ckpt}: no such checkpoint file or folder")
            run_version = version_of(path, log_root) if version is None else None
        config.ckpt_path = str(path)
        if run_version is not None:
            _set_logger_version(trainer, run_version)
            run_dir = log_root / (f"version_{run_version}" if isinstance(run_version, int) else str(run_version))
            name = next_config_name(run_dir, self.save_config_kwargs.get("config_filename", "config.yaml"))
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}
            _keep_csv_metrics(trainer, run_dir, name)
        print(f"emorl: resuming {path}" + (f" (logging into {run_dir})" if run_version is not None else ""),
              file=sys.stderr)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # The RL progress bar by default, added here rather than listed in configs: a config that lists a
        # bar breaks ``--trainer.enable_progress_bar false`` (Lightning refuses a bar callback then).
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            trainer["callbacks"] = [*callbacks, RLProgressBar()]
        # Atomic single-file saves whose errors stop the run, unless the config chose a checkpoint IO.
        plugins = trainer.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not isinstance(trainer.get("strategy"), FSDP2Strategy) and not any(
                isinstance(p, CheckpointIO) for p in plugins):
            trainer["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _check_run_identity(self, structural_only: bool) -> None:
        config = self.config[self.subcommand]
        ckpt = config.get("ckpt_path")
        if not ckpt or str(ckpt) in (*_LIGHTNING_CKPT_KEYWORDS, "last") or not isinstance(self.model, GRPOModule):
            return
        saved = read_run_identity(ckpt)
        current = self.model.run_identity(self.datamodule)
        if structural_only and saved is not None:
            saved = {k: v for k, v in saved.items() if k in STRUCTURAL}
            current = {k: v for k, v in current.items() if k in STRUCTURAL}
        allowed = check_resume(saved, current, str(ckpt), config.get("resume_changes", "refuse"))
        if allowed:
            log.warning("resuming %s with changed settings (--resume_changes allow): %s", ckpt,
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in allowed))

    def before_fit(self) -> None:
        self._check_run_identity(structural_only=False)

    def before_validate(self) -> None:
        self._check_run_identity(structural_only=True)

    def before_test(self) -> None:
        self._check_run_identity(structural_only=True)

    def before_predict(self) -> None:
        self._check_run_identity(structural_only=True)

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


def _use_emorl_checkpoint(config) -> None:
    """Lightning's ``ModelCheckpoint`` in the config becomes ours (same arguments; see the module docstring)."""
    for callback in config.trainer.get("callbacks") or []:
        if getattr(callback, "class_path", None) == LIGHTNING_CHECKPOINT:
            callback.class_path = EMORL_CHECKPOINT


def _logger_config(trainer):
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = next((lg for lg in logger if getattr(lg, "init_args", None) is not None), None)
    return logger


def _logger_root(trainer) -> tuple[Path | None, int | str | None]:
    """``(<save_dir>/<name>, pinned version)`` of the run's versioned logger; ``(None, None)`` without one.
    ``logger: true`` / unset is Lightning's default logger: ``<default_root_dir>/lightning_logs``."""
    logger = _logger_config(trainer)
    if logger is False:
        return None, None
    if logger is None or logger is True:
        return Path(trainer.get("default_root_dir") or ".") / "lightning_logs", None
    args = getattr(logger, "init_args", None)
    if args is None or "save_dir" not in args:
        return None, None
    save_dir = args.get("save_dir") or trainer.get("default_root_dir") or "."
    name = args.get("name")
    root = Path(save_dir) / name if name else Path(save_dir)
    return root, args.get("version")


def _set_logger_version(trainer, version: int | str) -> None:
    logger = _logger_config(trainer)
    if logger is None or logger is True:  # Lightning's default logger, made explicit to pin its version
        from jsonargparse import Namespace

        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(
            save_dir=trainer.get("default_root_dir") or ".", name="lightning_logs", version=version))
        return
    logger.init_args.version = version


def _keep_csv_metrics(trainer, run_dir: Path, config_name: str) -> None:
    """Lightning's CSV logger deletes an existing ``metrics.csv`` when it opens a run folder again: keep the
    earlier steps' file as ``metrics.before-resume-K.csv`` (K as in ``config.resume-K.yaml``)."""
    logger = _logger_config(trainer)
    metrics = run_dir / "metrics.csv"
    if getattr(logger, "class_path", "").endswith("CSVLogger") and metrics.is_file():
        k = config_name.removeprefix("config.resume-").removesuffix(".yaml") if "resume-" in config_name else "0"
        metrics.rename(run_dir / f"metrics.before-resume-{k}.csv")


def _checkpoint_dirpath(trainer) -> Path | None:
    for callback in trainer.get("callbacks") or []:
        if getattr(callback, "class_path", None) in _CHECKPOINT_CLASSES:
            dirpath = (getattr(callback, "init_args", None) or {}).get("dirpath")
            if dirpath:
                return Path(dirpath)
    return None


def read_run_identity(ckpt_path: str | Path) -> dict | None:
    """The run identity saved in a checkpoint (a ``.ckpt`` file, memory-mapped, or a sharded folder's
    ``meta.pt``); None when it has none."""
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):
        meta = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=False)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return meta.get(RUN_IDENTITY_KEY)


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns None so that the script exits 0 on success; a resume that cannot go on
    exits 2 with its reason)."""
    quiet_known_noise()
    try:
        run_cli(args)
    except (ResumeError, ResumeConfigError, LaunchMismatchError) as e:
        print(f"emorl: error: {e}", file=sys.stderr)
        sys.exit(2)


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
