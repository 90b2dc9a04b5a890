"""Bad input gets a clear error naming what was wrong (issue 21): a reward that returns NaN, an infinity or a
non-number stops the GRPO step (training and validation) naming the reward, the sample's key and the value,
while None (and NaN from a reward that declares ``nan_means_not_applicable``) still means "not applicable";
``emorl-plan`` refuses zero / negative flags with argparse's exit 2 naming the flag, and nonsensical config
values naming the key and the file."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.plan_cli import PlanConfigError, geometry_from_config, main
from emorl_pl.rewards import RewardSet, RewardValueError

LABELS = ("neutral", "happy", "angry", "sad")
ROOT = Path(__file__).resolve().parents[1]
CONFIG_JSON = ROOT / "configs/model/qwen2_audio_7b_config.json"
RECIPE = ["-c", str(ROOT / "configs/trainer/fsdp2_8gpu.yaml"), "--data", str(ROOT / "configs/data/iemocap.yaml"),
          "--model", str(ROOT / "configs/model/emorl_qwen2_audio_7b_lora.yaml"), "--model-config", str(CONFIG_JSON)]


def returning(*values):
    """A reward function that returns ``values`` (one per completion, cycled) whatever it is given."""

    def reward(completions, labels, **columns):
        return [values[i % len(values)] for i in range(len(completions))]

    return reward


# ------------------------------------------------------------------------------------ RewardSet alone
@pytest.mark.parametrize(("bad", "shown"), [
    (math.nan, "nan"), (np.float32("nan"), "nan"), (torch.tensor(math.nan), "nan"),
    (math.inf, "inf"), (-math.inf, "-inf"), (np.float64("inf"), "inf"),
], ids=["nan", "np-nan", "torch-nan", "inf", "-inf", "np-inf"])
def test_nan_and_inf_name_the_reward_the_sample_and_the_value(bad, shown):
    rs = RewardSet({"format": 1.0, "my_reward": returning(1.0, bad)}, LABELS, "ir")
    with pytest.raises(RewardValueError, match=rf"reward 'my_reward' returned {shown} for sample "
                                               rf"'Ses01F_impro01_F000' \(completion 1\); "):
        rs(["a", "b"], ["sad", "sad"], key=["Ses01M_script02_M010", "Ses01F_impro01_F000"])
    assert issubclass(RewardValueError, ValueError)


@pytest.mark.parametrize(("bad", "shown"), [
    ("0.5", r"'0\.5'"),  # float("0.5") would pass a string off as a number
    ("high", "'high'"),
    (torch.ones(3), r"tensor\(\[1\., 1\., 1\.\]\)"),
    (np.zeros(2), r"array\(\[0\., 0\.\]\)"),
    ([0.5], r"\[0\.5\]"),
    (1 + 2j, r"\(1\+2j\)"),
], ids=["numeric-string", "string", "tensor", "array", "list", "complex"])
def test_a_non_number_names_the_reward_the_sample_and_the_value(bad, shown):
    rs = RewardSet({"my_reward": returning(bad)}, LABELS, "esr")
    with pytest.raises(RewardValueError, match=rf"reward 'my_reward' returned {shown} for sample 'k0' "
                                               r"\(completion 0\); expected a float or None"):
        rs(["a"], ["sad"], keys=["k0"])


def test_none_and_declared_nan_mean_not_applicable():
    """None is "not applicable": left out of the reward's mean and of the total. A reward that declares
    ``nan_means_not_applicable`` (class or function attribute, also through init_args' partial) may say
    the same with NaN; its infinities are still errors."""

    class Vectorised:
        nan_means_not_applicable = True

        def __call__(self, completions, labels, **columns):
            return np.array([0.5, np.nan, 1.0])

    def scaled(completions, labels, scale=1.0, **columns):
        return [scale, math.nan, None]

    scaled.nan_means_not_applicable = True
    rs = RewardSet({"none": returning(None, 1.0, None), "vec": Vectorised(),
                    "fn": functools.partial(scaled, scale=2.0)}, LABELS, "esr")
    out = rs(["a", "b", "c"], ["sad"] * 3, key=["k0", "k1", "k2"])
    assert out.per_reward == {"none": [None, 1.0, None], "vec": [0.5, None, 1.0], "fn": [2.0, None, None]}
    assert out.total == [2.5, 1.0, 1.0]
    assert RewardSet.means(out.per_reward) == {"none": 1.0, "vec": 0.75, "fn": 2.0}
    everything_none = RewardSet({"none": returning(None)}, LABELS, "esr")(["a"], ["sad"])
    assert math.isnan(everything_none.total[0])  # no reward applies: nan-aware GRPO stats skip the row

    def infinite(completions, labels, **columns):
        return [math.inf]

    infinite.nan_means_not_applicable = True
    with pytest.raises(RewardValueError, match=r"reward 'inf' returned inf for completion 0; rewards must be finite"):
        RewardSet({"inf": infinite}, LABELS, "esr")(["a"], ["sad"])


@pytest.mark.parametrize("weight", [math.nan, math.inf, "nan"])
def test_a_non_finite_weight_names_the_reward(weight):
    with pytest.raises(ValueError, match=r"rewards\.my_reward\.weight must be a finite number"):
        RewardSet({"my_reward": {"class_path": "user_rewards.ConstantReward", "weight": weight}}, LABELS, "esr")


# ------------------------------------------------------------------------------------ in a GRPO run
def batch(i: int = 0) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"waveforms": [0.1 * torch.randn(8000, generator=g) for _ in range(2)], "sample_rate": 16000,
            "labels": ["happy", "sad"], "keys": [f"Ses01F_impro0{i}_F00{j}" for j in range(2)],
            "texts": [None, None], "corpus": ["mem"] * 2, "meta": [{}, {}]}


def grpo(toy_model_dir: str, reward) -> GRPOModule:
    return GRPOModule(AudioLMPolicy(toy_model_dir), labels="iemocap4", rewards={"format": 1.0, "my_reward": reward},
                      group_size=2, max_new_tokens=3, eval_max_new_tokens=3, micro_batch_size=4,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


@pytest.mark.parametrize(("bad", "message"), [
    (math.nan, r"returned nan for sample 'Ses01F_impro00_F001' \(completion 3\); return None for \"not applicable\""),
    (math.inf, r"returned inf for sample 'Ses01F_impro00_F001' \(completion 3\); rewards must be finite"),
    ("0.7", r"returned '0\.7' for sample 'Ses01F_impro00_F001' \(completion 3\); expected a float or None"),
], ids=["nan", "inf", "string"])
def test_training_step_stops_on_a_bad_reward(toy_model_dir, bad, message):
    # B = 2 utterances x G = 2 samples: completion 3 is the second sample of the second utterance.
    module = grpo(toy_model_dir, returning(1.0, 0.0, 0.5, bad))
    with pytest.raises(RewardValueError, match=r"reward 'my_reward' " + message):
        trainer(max_steps=1, limit_val_batches=0).fit(module, DataLoader([batch()], batch_size=None))
    assert module.global_step == 0  # no update was made from the bad step


def test_training_logs_only_applicable_rewards(toy_model_dir):
    """None and declared NaN are left out: the logged reward and the reward's mean stay finite."""

    def partly(completions, labels, **columns):
        return [1.0, None, 0.5, math.nan]

    partly.nan_means_not_applicable = True
    module = grpo(toy_model_dir, partly)
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(module, DataLoader([batch()], batch_size=None))
    logged = {k: float(v) for k, v in run.callback_metrics.items()}
    assert logged["rewards/my_reward/mean"] == pytest.approx(0.75)
    assert math.isfinite(logged["reward"])


def test_validation_stops_on_a_nan_reward(toy_model_dir):
    module = grpo(toy_model_dir, returning(0.5, math.nan))  # greedy: one completion per utterance
    with pytest.raises(RewardValueError, match=r"reward 'my_reward' returned nan for sample 'Ses01F_impro00_F001' "
                                               r"\(completion 1\)"):
        trainer().validate(module, DataLoader([batch()], batch_size=None), verbose=False)


# ------------------------------------------------------------------------------------ emorl-plan
@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--gpu-memory", "0", "a number of GiB > 0"),
    ("--gpu-memory", "-40", "a number of GiB > 0"),
    ("--gpu-memory", "nan", "a number of GiB > 0"),
    ("--gpus", "0", "a whole number of GPUs >= 1"),
    ("--gpus", "-2", "a whole number of GPUs >= 1"),
    ("--audio-seconds", "0", "a number of seconds > 0"),
    ("--audio-seconds", "-1", "a number of seconds > 0"),
], ids=["gpu-memory=0", "gpu-memory=-40", "gpu-memory=nan", "gpus=0", "gpus=-2", "audio-seconds=0",
        "audio-seconds=-1"])
def test_plan_flags_zero_or_negative_exit_2_naming_the_flag(capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_:
        main([*RECIPE, flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "message"), [
    (["--data.init_args.batch_size", "0"], "data.init_args.batch_size must be a whole number >= 1, got 0"),
    (["--data.init_args.eval_batch_size", "-1"], "data.init_args.eval_batch_size must be a whole number >= 1 or null"),
    (["--data.init_args.max_duration", "0"], "data.init_args.max_duration must be a number > 0 or null, got 0"),
    (["--model.init_args.group_size", "2.5"], "model.init_args.group_size must be a whole number >= 1, got 2.5"),
    (["--model.init_args.beta", "-0.1"], "model.init_args.beta must be a number >= 0, got -0.1"),
    (["--model.init_args.policy.init_args.lora.dropout", "1.5"],
     "model.init_args.policy.init_args.lora.dropout must be a number >= 0 and < 1, got 1.5"),
    (["--trainer.num_nodes", "0"], "trainer.num_nodes must be a whole number >= 1, got 0"),
    (["--trainer.devices", "0"], "trainer.devices must be a number >= 1, -1, a non-empty list"),
], ids=["batch_size", "eval_batch_size", "max_duration", "group_size", "beta", "lora.dropout", "num_nodes",
        "devices"])
def test_plan_config_values_name_the_key_and_the_file(capsys, override, message):
    assert main([*RECIPE, *override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "(in configs/" in err or f"(in {ROOT}" in err  # the file(s) that set the section


def test_plan_model_config_sizes_name_the_key(tmp_path):
    config = json.loads(CONFIG_JSON.read_text())
    config["text_config"]["num_attention_heads"] = 0  # divided by for head_dim
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(config))
    with pytest.raises(PlanConfigError, match=rf"text_config\.num_attention_heads must be a whole number >= 1, got 0 "
                                              rf"\(in {bad}\)"):
        geometry_from_config(bad)
