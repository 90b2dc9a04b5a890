"""The benchmarks run end to end with ``--quick`` (tiny sizes), so they do not rot. No timing asserts:
only that they finish and report what they promise (ratios present and finite, audio encoded once)."""

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_grpo_step_quick(bench_path, capsys):
    summary = importlib.import_module("grpo_step").main(["--quick"])
    out = capsys.readouterr().out
    assert "rollout (generate)" in out and "step / floor" in out
    assert all(math.isfinite(v) for v in summary.values())
    # --quick: B=2 utterances, encoded by one audio-tower call per step however many samples are drawn
    assert summary["audio_encoder_calls_per_step"] == 1 and summary["audio_utterances_per_step"] == 2


def test_vs_trl_quick(bench_path, capsys):
    pytest.importorskip("trl")
    summary = importlib.import_module("vs_trl").main(["--quick"])
    out = capsys.readouterr().out
    assert "ours_over_trl" in out and "step/floor" in out
    assert all(math.isfinite(v) and v > 0 for v in summary.values())


def test_rollout_quick(bench_path, capsys):
    summary = importlib.import_module("rollout").main(
        ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4", "--reps", "1"])
    out = capsys.readouterr().out
    assert all(path in out for path in ("generate", "off", "adapters", "merged"))
    assert summary["generate_over_generate"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in summary.values())
