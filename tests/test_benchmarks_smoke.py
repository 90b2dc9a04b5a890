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
    # the roofline: every phase against its floor, and the step's share of the floor
    assert "roofline floor per phase" in out and "floor / step" in out
    assert all(phase in out for phase in importlib.import_module("roofline").PHASES)
    assert summary["roofline_floor_over_step"] > 0  # a ratio of two timings: its size is the benchmark's to print


def test_shapes_set_the_defaults_and_options_win(bench_path):
    grpo_step = importlib.import_module("grpo_step")
    toy = grpo_step.parse_args([])
    assert (toy.shape, toy.batch_size, toy.group_size, toy.max_new_tokens, toy.seconds, toy.reps, toy.hf_floor) == (
        "toy", 4, 6, 64, 1.5, 5, True)
    real = grpo_step.parse_args(["--shape", "realistic"])
    assert (real.batch_size, real.group_size, real.max_new_tokens, real.seconds, real.warmup, real.reps) == (
        4, 6, 64, 4.0, 1, 2)
    assert real.hf_floor is False
    mine = grpo_step.parse_args(["--shape", "realistic", "--reps", "3", "--hf-floor", "--batch-size", "2"])
    assert (mine.reps, mine.hf_floor, mine.batch_size, mine.seconds) == (3, True, 2, 4.0)
    # the realistic model's sizes (built by emorl_pl.modules.tiny.build_real_shape_qwen2_audio)
    sizes = importlib.import_module("_common").REALISTIC_SIZES
    assert (sizes["hidden_size"], sizes["num_layers"], sizes["num_kv_heads"], sizes["intermediate_size"]) == (
        512, 4, 2, 2048)
    assert (sizes["audio_d_model"], sizes["encoder_layers"], sizes["audio_ffn"]) == (256, 4, 1024)


def test_vs_trl_quick(bench_path, capsys):
    pytest.importorskip("trl")
    summary = importlib.import_module("vs_trl").main(["--quick"])
    out = capsys.readouterr().out
    assert "ours_over_trl" in out and "step/floor" in out and "roofline floor per phase" in out
    assert all(math.isfinite(v) and v > 0 for v in summary.values())


def test_vs_trl_quick_audioflamingo3(bench_path, capsys):
    """TRL's GRPOTrainer with the audio carried trains AF3 too (its mask under AF3's keyword)."""
    pytest.importorskip("trl")
    summary = importlib.import_module("vs_trl").main(["--quick", "--family", "audioflamingo3"])
    out = capsys.readouterr().out
    assert "family=audioflamingo3" in out and "ours_over_trl" in out
    assert all(math.isfinite(v) and v >= 0 for v in summary.values())
    # times are positive; sampled RSS over a 2-step CPU run can rise by 0 MiB, so memory ratios may be 0
    assert all(v > 0 for k, v in summary.items() if "mem" not in k and "footprint" not in k)


@pytest.mark.parametrize("family, thinker", [("qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration"),
                                             ("qwen3_omni", "Qwen3OmniMoeThinkerForConditionalGeneration")])
def test_vs_trl_says_why_trl_cannot_run_the_omni_thinkers(bench_path, capsys, family, thinker):
    """TRL's fused LM head calls model.base_model, which is the thinker itself: exit 2 with the reason, before
    any training (the run that tries fails with AttributeError: ... has no attribute 'last_hidden_state')."""
    pytest.importorskip("trl")
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("vs_trl").main(["--quick", "--family", family])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"cannot run {thinker}" in err and "base_model_prefix is 'thinker'" in err and "last_hidden_state" in err


def test_vs_trl_realistic_shape_is_qwen2_audios_only(bench_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("vs_trl").main(["--shape", "realistic", "--family", "audioflamingo3"])
    assert exit_info.value.code == 2 and "realistic shape is built for qwen2_audio only" in capsys.readouterr().err


def test_rollout_quick(bench_path, capsys):
    summary = importlib.import_module("rollout").main(
        ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4", "--reps", "1"])
    out = capsys.readouterr().out
    assert all(path in out for path in ("generate", "off", "adapters", "merged"))
    assert summary["generate_over_generate"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in summary.values())


def test_learning_4class_smoke(bench_path, toy_model_dir, tmp_path, capsys):
    """The quickstart benchmark path end to end (cold starts, GRPO with ESWR and accuracy, tests), on the
    shipped quickstart config with the progress bar switched off, as the script runs it."""
    per_seed = importlib.import_module("learning").main([
        "--smoke", "--seeds", "0", "--no-control", "--model-dir", toy_model_dir, "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    (res,) = per_seed
    assert list(res) == ["untrained", "SFT (esr)", "GRPO esr + ESWR", "GRPO esr + accuracy", "SFT (ir)",
                         "GRPO ir + ESWR"]
    assert all(0 <= r["ua"] <= 1 for r in res.values())
    assert "| GRPO esr + ESWR |" in out and "UA points per seed" in out


def test_learning_quickstart_stages_on_a_new_family_smoke(bench_path, tmp_path, capsys):
    """``--family``: the script builds that family's toy itself (no model folder given) and runs the
    quickstart's stages on it; the family row reports their test UA."""
    import json

    learning = importlib.import_module("learning")
    out_dir = tmp_path / "runs"
    per_seed = learning.main(["--smoke", "--seeds", "0", "--family", "qwen3_omni", "--quickstart-stages",
                              "--out", str(out_dir)])
    out = capsys.readouterr().out
    (res,) = per_seed
    assert list(res) == list(learning.QUICKSTART_STAGES) == ["untrained", "SFT (esr)", "GRPO esr + ESWR"]
    assert all(0 <= r["ua"] <= 1 for r in res.values())
    toy = out_dir / "tiny-qwen3_omni"
    assert json.loads((toy / "config.json").read_text())["model_type"] == "qwen3_omni_moe"
    run = json.loads((out_dir / "run.json").read_text())
    assert run["family"] == "qwen3_omni" and run["model_dir"] == str(toy) and len(run["wall_s"]) == 1
    assert "| family (toy) | untrained UA |" in out and "| qwen3_omni | " in out


def test_lm_head_ops_quick(bench_path, capsys):
    ratios = importlib.import_module("lm_head_ops").main(["--quick"])
    out = capsys.readouterr().out
    assert len(ratios) == 5 and all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert "ours / before" in out and "sample a token" in out


def test_learning_8class_smoke(bench_path, toy_model_dir, tmp_path, capsys):
    """The 8-class benchmark path end to end: ESR cold start, GRPO with ESWR and with accuracy, test on the
    held-out speakers, curves, table, comparison and format lines, the three figures."""
    figures = tmp_path / "figures"
    per_seed = importlib.import_module("learning").main([
        "--eight-class", "--smoke", "--seeds", "0",  # smoke: 2 + 2 steps, validation every 2
        "--variants", "grpo_esr_eswr", "grpo_esr_accuracy", "--model-dir", toy_model_dir,
        "--out", str(tmp_path / "runs"), "--figures", str(figures)])
    out = capsys.readouterr().out
    (res,) = per_seed
    assert list(res) == ["cold start esr", "GRPO esr + ESWR", "GRPO esr + accuracy"]
    for name, r in res.items():
        assert set(r["test"]) >= {"wa", "ua", "f1_macro", "format_rate", "confusion"}
        assert all(0.0 <= r["test"][k] <= 1.0 for k in ("wa", "ua", "f1_macro", "format_rate"))
        assert len(r["test"]["confusion"]) == 8 and len(r["test"]["confusion"][0]) == 9  # + unparseable
        assert r["sft_steps"] == 2 and r["max_steps"] == (2 if name == "cold start esr" else 4)
    assert [s for s, _ in res["cold start esr"]["val_ua"]] == [2]
    assert [s for s, _ in res["GRPO esr + ESWR"]["val_ua"]] == [2, 4]  # the cold start's point, then GRPO's
    assert [s for s, _ in res["GRPO esr + ESWR"]["format"]] == [3, 4]  # GRPO steps only
    assert res["cold start esr"]["format"] == []
    assert "| GRPO esr + accuracy |" in out and "steps to val UA >= 40" in out
    assert "GRPO esr + ESWR - GRPO esr + accuracy, test UA points" in out
    assert "format reward rising while accuracy stays flat" in out
    for name in ("val_ua", "format", "confusion"):
        assert (figures / f"learning_8class_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "data" / "synth_options.json").is_file()  # a smoke corpus of its own
    # the table and figures again from the saved results, without training
    importlib.import_module("learning").main([
        "--eight-class", "--from-results", str(tmp_path / "runs" / "results_8class.json"), "--figures", ""])
    assert "| cold start esr |" in capsys.readouterr().out


def test_learning_8class_helpers(bench_path):
    learning = importlib.import_module("learning")
    assert learning.first_step_reaching([(100, 0.2), (200, 0.45), (300, 0.5)], 0.4) == 200
    assert learning.first_step_reaching([(100, 0.2)], 0.4) is None
    steps, mean, lo, hi = learning.band([[(1, 0.2), (2, 0.4)], [(1, 0.4), (2, 0.6), (3, 0.9)]])
    assert steps == [1, 2] and mean == pytest.approx([0.3, 0.5]) and lo == [0.2, 0.4] and hi == [0.4, 0.6]
    rising = [(s, 0.5 + 0.05 * s) for s in range(8)]
    flat = [(s, 0.3) for s in range(8)]
    assert "training accuracy 30.0 -> 30.0" in learning.format_up_accuracy_flat(rising, flat)
    assert learning.format_up_accuracy_flat(rising, rising) is None  # accuracy rose with it
    assert learning.format_up_accuracy_flat(flat, flat) is None
    names = [v.name for v in learning.select_variants(["grpo_ir_eswr"])]
    assert names == ["cold start ir", "GRPO ir + ESWR"]
    with pytest.raises(ValueError, match="grpo_esr_eswr"):
        learning.select_variants(["grpo_esr_bogus"])
    by_name = {v.name: v for v in learning.VARIANTS_8}
    assert learning.step_overrides(by_name["cold start esr"], 10, 5, None) == [
        "--model.init_args.sft_steps", "10", "--trainer.max_steps", "10"]
    assert learning.step_overrides(by_name["GRPO esr + ESWR"], 10, 5, 2) == [
        "--model.init_args.sft_steps", "10", "--trainer.max_steps", "15", "--trainer.val_check_interval", "2"]
    assert learning.step_overrides(by_name["control: SFT esr for all steps"], 10, 5, None) == [
        "--model.init_args.sft_steps", "15", "--trainer.max_steps", "15"]
    assert learning.step_overrides(by_name["GRPO esr + ESWR"], None, None, None) == []  # the configs' own


def test_learning_8class_configs_parse_and_agree(bench_path, capsys):
    """Every variant of the 8-class benchmark resolves to the run it claims (mode, rewards, step counts)
    on the ambiguous RAVDESS-8 corpus; without printing a model or a corpus."""
    import yaml

    from emorl_pl.cli import run_cli

    learning = importlib.import_module("learning")
    configs = {}
    for v in learning.VARIANTS_8:
        with pytest.raises(SystemExit):
            run_cli(["fit", "-c", str(learning.CONFIGS_8 / "base.yaml"), "-c", str(learning.CONFIGS_8 / v.config),
                     "--print_config"])
        configs[v.name] = yaml.safe_load(capsys.readouterr().out)
    cold = configs["cold start esr"]
    sft, total = cold["model"]["init_args"]["sft_steps"], configs["GRPO esr + ESWR"]["trainer"]["max_steps"]
    assert cold["trainer"]["max_steps"] == sft < total
    for v in learning.VARIANTS_8:
        c = configs[v.name]
        init = c["model"]["init_args"]
        assert c["data"]["init_args"]["label_set"] == "ravdess8" and c["data"]["init_args"]["ambiguity"] > 0
        assert init["mode"] == v.config.split("_")[-2 if v.after else -1].removesuffix(".yaml")
        assert init["sft_steps"] == (total if v.control else sft)
        assert c["trainer"]["max_steps"] == (sft if v.after is None and not v.control else total)
        expected = {"accuracy", "format"} if "accuracy" in v.name else {"eswr", "format"}
        assert set(init["rewards"]) == expected, v.name
