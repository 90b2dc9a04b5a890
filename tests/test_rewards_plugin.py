"""Rewards a researcher plugs in by ``class_path`` from their own module (tests/user_rewards.py), without
registering them or editing the package: RewardSet specs, their errors, and a real ``emorl fit`` run."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from emorl_pl.rewards import ESWRReward, RewardSet, build_reward

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS / "configs"
EMORL = str(Path(sys.executable).with_name("emorl"))
CACHE = Path(os.environ.get("EMORL_TEST_CACHE", Path(tempfile.gettempdir()) / "emorl_pl_test_cache"))
LABELS = ("neutral", "happy", "angry", "sad")


# ----------------------------------------------------------------------------- RewardSet with class_path
def test_function_by_class_path_with_init_args_and_builtin_next_to_it():
    rs = RewardSet({"format": 1.0, "gold": {"class_path": "user_rewards.mentions_gold", "init_args": {"bonus": 0.25},
                                            "weight": 2.0}}, LABELS, "ir")
    out = rs(["<answer>sad</answer>", "sad?", "angry"], ["sad", "sad", "sad"], transcript=[None] * 3)
    assert out.per_reward == {"format": [1.0, 0.0, 0.0], "gold": [0.25, 0.25, 0.0]}
    assert out.total == [1.5, 0.5, 0.0]
    assert rs.weights == {"format": 1.0, "gold": 2.0}


def test_class_gets_labels_and_mode_only_when_its_init_takes_them(tmp_path):
    rs = RewardSet({
        "const": {"class_path": "user_rewards.ConstantReward", "init_args": {"value": 0.5}},  # no labels / mode
        "even": {"class_path": "user_rewards.GoldInLabelSet"},  # labels and mode
        "said": {"class_path": "user_rewards.TranscriptWordReward",  # labels only, plus init_args
                 "init_args": {"log_path": str(tmp_path / "seen.jsonl"), "min_chars": 4}},
    }, "iemocap4", "eur")
    const, even, said = rs.fns["const"], rs.fns["even"], rs.fns["said"]
    assert const.value == 0.5
    assert (even.labels, even.mode) == (LABELS, "eur")
    assert said.labels == LABELS and said.min_chars == 4
    out = rs(["it was fine", "no words"], ["happy", "angry"], transcript=["It was fine, thanks", None],
             key=["k0", "k1"], group=[0, 1], progress=0.0)
    assert out.per_reward == {"const": [0.5, 0.5], "even": [0.0, 1.0], "said": [1.0, None]}
    seen = json.loads((tmp_path / "seen.jsonl").read_text())
    assert seen["transcript"] == ["It was fine, thanks", None] and seen["columns"] == ["progress"]


def test_list_specs_dotted_names_and_jsonargparse_built_objects():
    from user_rewards import ConstantReward

    rs = RewardSet(["user_rewards.mentions_gold", {"class_path": "user_rewards.ConstantReward", "weight": 3},
                    {"name": "eswr", "alpha_schedule": "constant"}], LABELS, "ir")
    assert list(rs.fns) == ["user_rewards.mentions_gold", "ConstantReward", "eswr"]
    assert isinstance(rs.fns["eswr"], ESWRReward) and rs.weights["ConstantReward"] == 3.0
    # jsonargparse instantiates a weightless class_path block itself when the field is typed Any.
    built = RewardSet({"c": ConstantReward(0.2)}, LABELS, "esr")
    assert built(["x"], ["sad"]).total == [0.2]
    # ... or hands over a Namespace with the class's defaults filled in, labels=None included.
    from jsonargparse import Namespace

    spec = Namespace(class_path="user_rewards.TranscriptWordReward",
                     init_args=Namespace(log_path="unused.jsonl", labels=None, min_chars=3))
    assert RewardSet({"said": spec}, "iemocap4", "esr").fns["said"].labels == LABELS
    # init_args work for registered names too
    assert build_reward({"name": "eswr", "init_args": {"gamma": 0.9}}, LABELS, "esr").gamma == 0.9


@pytest.mark.parametrize(("spec", "error", "message"), [
    ({"class_path": "x.Y"}, ValueError,
     r"rewards\.my_len\.class_path 'x\.Y' could not be imported: No module named 'x' \(is the folder holding 'x' on PYTHONPATH"),
    ({"class_path": "user_rewards.Missing"}, ValueError,
     r"rewards\.my_len\.class_path 'user_rewards\.Missing' could not be imported: module 'user_rewards' has no attribute 'Missing'"),
    ({"class_path": "Y"}, ValueError, r"rewards\.my_len\.class_path 'Y' could not be imported: expected a dotted path"),
    ({"class_path": "user_rewards.ConstantReward", "init_args": {"valeu": 1}}, ValueError,
     r"rewards\.my_len: user_rewards\.ConstantReward\(value=1\.0\) cannot be built with \['valeu'\]"),
    ({"class_path": "user_rewards.TranscriptWordReward"}, ValueError,
     r"rewards\.my_len: user_rewards\.TranscriptWordReward\(log_path, labels, min_chars=3\) cannot be built with \['labels'\]: missing a required argument: 'log_path'"),
    ({"class_path": "user_rewards.mentions_gold", "init_args": {"bonuss": 1}}, ValueError,
     r"rewards\.my_len: user_rewards\.mentions_gold\(completions, labels, bonus=1\.0, \*\*columns\) cannot take \['bonuss'\]: not parameters"),
    ({"class_path": "user_rewards.ConstantReward", "value": 2}, ValueError,
     r"rewards\.my_len: unexpected keys \['value'\] next to class_path; put the reward's options under init_args"),
    ({"class_path": "user_rewards.no_columns"}, TypeError, r"rewards\.my_len: user_rewards\.no_columns.* must accept \*\*columns"),
    ({"class_path": "user_rewards.NOT_A_REWARD"}, TypeError, r"rewards\.my_len: 0\.5 is neither a class nor a function"),
    ({"class_path": "user_rewards.ConstantReward", "weight": "heavy"}, ValueError,
     r"rewards\.my_len\.weight must be a number, got 'heavy'"),
])
def test_errors_name_the_reward_and_what_was_expected(spec, error, message):
    with pytest.raises(error, match=message):
        RewardSet({"eswr": 1.0, "my_len": spec}, LABELS, "esr")


def test_unknown_name_points_to_class_path():
    with pytest.raises(ValueError, match=r"unknown reward 'my_len'; known rewards: .*eswr.*\(or give class_path"):
        RewardSet({"my_len": 1.0}, LABELS, "esr")


def test_bad_values_at_call_time_name_the_reward():
    rs = RewardSet({"bad": {"class_path": "user_rewards.NotARewardValue"}}, LABELS, "esr")
    with pytest.raises(ValueError, match=r"reward 'bad' returned 'high' for completion 0; expected a float or None"):
        rs(["a"], ["sad"])
    short = RewardSet({"c": {"class_path": "user_rewards.ConstantReward"}}, LABELS, "esr")
    short.fns["c"] = lambda completions, labels, **columns: [1.0]
    with pytest.raises(ValueError, match=r"reward 'c' returned 1 values for 2 completions"):
        short(["a", "b"], ["sad", "sad"])
    needs = RewardSet({"said": {"class_path": "user_rewards.TranscriptWordReward", "init_args": {"log_path": "x"}}},
                      LABELS, "esr")
    with pytest.raises(TypeError, match="transcript") as info:  # a column the batch did not have
        needs(["a"], ["sad"])
    assert "in reward 'said' (rewards.said)" in info.value.__notes__


def test_reward_values_are_converted_to_floats():
    rs = RewardSet({"g": {"class_path": "user_rewards.mentions_gold", "init_args": {"bonus": np.float32(0.5)}}},
                   LABELS, "esr")
    out = rs(["sad", "x"], ["sad", "sad"])
    assert out.per_reward["g"] == [0.5, 0.0] and all(type(v) is float for v in out.per_reward["g"])


# ----------------------------------------------------------------------------- emorl fit with a user reward
SENTENCES = ("it is an ok day", "we met at the station", "she said no to it", "on and on it goes")


def write_transcribed_corpus(root: Path) -> dict[str, str]:
    """Train / valid / test shards of noise audio whose metadata carries a transcript; key -> transcript.
    (The synth corpus of tiny_grpo.yaml has no transcripts: its ``text`` is None.)"""
    from emorl_pl.datamodules.shards import AudioSample, SplitWriter

    rng = np.random.default_rng(0)
    transcripts = {}
    for split, speakers in {"train": ["s0", "s1"], "valid": ["s2"], "test": ["s3"]}.items():
        with SplitWriter(root, split) as writer:
            for si, speaker in enumerate(speakers):
                for li, label in enumerate(LABELS):
                    key = f"{speaker}_{label}"
                    transcripts[key] = f"{SENTENCES[(si + li) % len(SENTENCES)]} ({speaker})"
                    audio = (0.1 * rng.standard_normal(8000)).astype(np.float32)
                    writer.write(AudioSample(key, audio, 16000, {
                        "label": label, "corpus_label": label, "corpus": "transcribed", "speaker": speaker,
                        "text": transcripts[key]}))
    return transcripts


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory) -> dict:
    from emorl_pl.modules.tiny import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("reward_plugin")
    transcripts = write_transcribed_corpus(tmp / "corpus")
    args = [
        "fit", "-c", str(CONFIGS / "tiny_grpo.yaml"), "-c", str(CONFIGS / "user_reward.yaml"),
        "--model.init_args.policy.init_args.model_dir", str(ensure_tiny_model(CACHE / "tiny")),
        "--model.init_args.sft_steps", "0",
        "--data.class_path", "emorl_pl.datamodules.webdataset.ShardDataModule",
        "--data.init_args.train", str(tmp / "corpus" / "train"),
        "--data.init_args.valid", str(tmp / "corpus" / "valid"),
        "--trainer.default_root_dir", str(tmp / "out"),
        "--trainer.logger.init_args.save_dir", str(tmp / "out"),
        "--trainer.max_steps", "2",
    ]
    # The user's module is found the way a user's would be: on PYTHONPATH; the run's cwd is tmp, where
    # the reward's relative log_path lands.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([EMORL, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emorl failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    calls = [json.loads(line) for line in (tmp / "seen_by_reward.jsonl").read_text().splitlines()]
    return {"dir": tmp / "out" / "csv" / "version_0", "calls": calls, "transcripts": transcripts}


def expected_mention(transcript: str, completion: str) -> float:
    """Independent of user_rewards.mentioned: min_chars is 2 in user_reward.yaml."""
    return float(any(w in completion.lower() for w in re.split(r"[^a-z']+", transcript.lower()) if len(w) >= 2))


def test_user_reward_sees_each_completions_transcript(plugin_run):
    calls, transcripts = plugin_run["calls"], plugin_run["transcripts"]
    assert len(calls) == 2  # one call per GRPO step: 2 steps of one batch, no cold start
    for call in calls:
        # batch_size 2, group_size 2: each utterance's transcript, key and gold label, repeated per sample
        assert len(call["key"]) == 4 and call["key"][0] == call["key"][1] and call["key"][2] == call["key"][3]
        assert call["transcript"] == [transcripts[k] for k in call["key"]]
        assert call["gold"] == [k.split("_", 1)[1] for k in call["key"]]
        assert call["group"] == [0, 0, 1, 1]
        assert call["label_set"] == list(LABELS)  # labels passed because __init__ takes them
        assert {"keys", "texts", "speaker", "corpus", "meta", "progress"} <= set(call["columns"])
        assert call["values"] == [expected_mention(t, c) for t, c in zip(call["transcript"], call["completions"])]
    assert len({v for call in calls for v in call["values"]}) == 2, "the run should exercise both outcomes"


def test_user_reward_mean_is_logged_under_its_name(plugin_run):
    rows = list(csv.DictReader(open(plugin_run["dir"] / "metrics.csv")))
    logged = [float(r["rewards/mentions/mean"]) for r in rows if r.get("rewards/mentions/mean")]
    expected = [sum(c["values"]) / len(c["values"]) for c in plugin_run["calls"]]
    assert logged == pytest.approx(expected)
    assert not any(k.startswith("rewards/format") for k in rows[0])  # user_reward.yaml's dict replaces the base one


def test_logging_callbacks_carry_the_user_reward(plugin_run):
    """CompletionSamples (CSV logger -> completions.csv, first utterance) and RolloutJSONL (every
    completion) hold the values the reward returned, for the texts it scored."""
    calls = plugin_run["calls"]
    samples = list(csv.DictReader(open(plugin_run["dir"] / "completions.csv")))
    assert [int(r["step"]) for r in samples] == [1, 1, 2, 2]
    for row, (step, i) in zip(samples, [(1, 0), (1, 1), (2, 0), (2, 1)]):
        call = calls[step - 1]
        assert (row["key"], row["text"]) == (call["key"][i], call["completions"][i])
        assert float(row["mentions"]) == call["values"][i]
    lines = [json.loads(line) for line in (plugin_run["dir"] / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for line, (step, i) in zip(lines, [(s, i) for s in (1, 2) for i in range(4)]):
        call = calls[step - 1]
        assert line["step"] == step and line["rank"] == 0
        assert (line["key"], line["completion"], line["sample"]) == (call["key"][i], call["completions"][i], i % 2)
        assert line["rewards"]["mentions"] == call["values"][i] and set(line["rewards"]) == {"eswr", "mentions"}
        assert line["total"] == pytest.approx(line["rewards"]["eswr"] + 0.5 * call["values"][i])
        assert math.isfinite(line["advantage"])
    # group-relative advantages: each pair sums to 0
    for a, b in zip(lines[::2], lines[1::2]):
        assert a["advantage"] + b["advantage"] == pytest.approx(0.0, abs=1e-6)
