"""What a newcomer sees: a progress bar in RL terms (phase, optimizer steps of the run), and no start-up
noise that says nothing about the run (Lightning's litlogger tip, its LeafSpec deprecation warning, the
'modules in eval mode' warning); unexpected warnings still show."""

from __future__ import annotations

import logging
import subprocess
import warnings

from test_distributed import EMORL, check_emorl, emorl_env, fit_args

from emorl_pl.callbacks.progress import phase_description
from emorl_pl.cli import quiet_known_noise


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
    args = fit_args(tmp_path, 4, []) + [
        "--trainer.enable_progress_bar", "true",
        "--trainer.callbacks+", "emorl_pl.callbacks.progress.RLProgressBar",
    ]
    proc = subprocess.run([EMORL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=emorl_env())
    check_emorl(proc)
    out = proc.stdout + proc.stderr
    assert "cold start" in out and "GRPO" in out and "4/4" in out, out[-2000:]
    assert "/-2" not in out  # Lightning's bar for a max_steps run read "Epoch 1/-2"
    for noise in ("litlogger", "LeafSpec", "module(s) in eval mode"):
        assert noise not in out, noise
