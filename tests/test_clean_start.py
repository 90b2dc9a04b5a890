"""What a newcomer sees: a progress bar in RL terms (phase, optimizer steps of the run), and no start-up
noise that says nothing about the run (Lightning's litlogger tip, its LeafSpec deprecation warning, the
'modules in eval mode' warning); unexpected warnings still show."""

from __future__ import annotations

import logging
import subprocess
import warnings

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from test_distributed import EMORL, check_emorl, emorl_env, fit_args

from emorl_pl.callbacks.progress import RLProgressBar, phase_description
from emorl_pl.cli import EmoRLCLI, quiet_known_noise
from emorl_pl.modules.grpo_module import GRPOModule


def test_phase_description():
    assert [phase_description(s, 2) for s in (0, 1, 2, 5)] == ["cold start", "cold start", "GRPO", "GRPO"]
    assert phase_description(0, 0) == "GRPO"


def test_only_the_known_noise_is_quieted(caplog):
    quiet_known_noise()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()  # filters go first in the list
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "x.py", 1,
                               module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "x.py", 1,
                               module="lightning.pytorch.utilities._pytree")
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        log.info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]


def test_fit_shows_the_phase_and_steps_and_no_start_up_noise(tmp_path):
    args = fit_args(tmp_path, 4, []) + ["--trainer.enable_progress_bar", "true"]  # the RL bar is the default
    proc = subprocess.run([EMORL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=emorl_env())
    check_emorl(proc)
    out = proc.stdout + proc.stderr
    assert "cold start" in out and "GRPO" in out and "4/4" in out, out[-2000:]
    assert "/-2" not in out  # Lightning's bar for a max_steps run read "Epoch 1/-2"
    for noise in ("litlogger", "LeafSpec", "module(s) in eval mode"):
        assert noise not in out, noise


def _trainer(args: list[str]) -> L.Trainer:
    return EmoRLCLI(GRPOModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    args=args, run=False).trainer


@pytest.mark.parametrize("config", ["tests/configs/tiny_grpo.yaml", "configs/quickstart.yaml",
                                    "configs/trainer/fsdp2_8gpu.yaml"])
def test_progress_bar_is_the_rl_one_unless_disabled_or_chosen(tmp_path, config, toy_model_dir):
    """The CLI adds the RL bar itself, so ``--trainer.enable_progress_bar false`` works with every config
    (Lightning refuses a listed bar callback then), and a config's own bar is kept."""
    from test_distributed import REPO

    # a trainer config on top of the tiny run's model and data, as users combine them
    args = (["-c", str(REPO / "tests/configs/tiny_grpo.yaml")] if "trainer/" in config else []) + ["-c", str(REPO / config)]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
             "--trainer.strategy", "auto"]
    if "quickstart" in config:
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    args += ["--model.init_args.policy.init_args.model_dir", toy_model_dir]
    off = _trainer([*args, "--trainer.enable_progress_bar", "false"])
    assert off.progress_bar_callback is None
    on = _trainer([*args, "--trainer.enable_progress_bar", "true"])
    assert type(on.progress_bar_callback) is RLProgressBar
    assert sum(isinstance(c, TQDMProgressBar) for c in on.callbacks) == 1
    own = _trainer([*args, "--trainer.enable_progress_bar", "true",
                    "--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"])
    assert type(own.progress_bar_callback) is TQDMProgressBar
