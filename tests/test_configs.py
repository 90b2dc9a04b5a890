"""Every shipped config parses and prints a complete config; config errors name the key and come
before any model is loaded."""

from pathlib import Path

import pytest
import yaml

from emorl_pl.cli import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA_BLOCKS = sorted((CONFIGS / "data").glob("*.yaml"))
MODEL_BLOCKS = sorted((CONFIGS / "model").glob("*.yaml"))
TRAINER_BLOCKS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_quickstart_prints_complete_config(capsys):
    config = print_config(["-c", str(CONFIGS / "quickstart.yaml")], capsys)
    assert config["model"]["class_path"] == "emorl_pl.modules.grpo_module.GRPOModule"
    assert config["model"]["init_args"]["policy"]["init_args"]["model_dir"] == "runs/tiny-qwen2-audio"
    assert config["data"]["class_path"] == "emorl_pl.datamodules.synth.SynthDataModule"
    assert config["data"]["init_args"]["label_set"] == "iemocap4"
    assert config["test_after_fit"] is True
    assert config["trainer"]["max_steps"] > config["model"]["init_args"]["sft_steps"] > 0


@pytest.mark.parametrize("trainer", TRAINER_BLOCKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", MODEL_BLOCKS, ids=lambda p: p.stem)
def test_paper_recipe_blocks_combine(trainer, model, capsys):
    for data in DATA_BLOCKS:
        config = print_config(["-c", str(trainer), "--model", str(model), "--data", str(data)], capsys)
        init = config["model"]["init_args"]
        # The paper's recipe: ESR, ESWR on Plutchik with gamma 0.7 and linear alpha, G = 6.
        assert init["mode"] == "esr" and init["group_size"] == 6
        assert init["rewards"]["eswr"]["similarity"] == "plutchik" and init["rewards"]["eswr"]["gamma"] == 0.7
        assert init["rewards"]["eswr"]["alpha_schedule"] == "linear"
        # The label set is given once, on the data, and linked into the model.
        assert "labels" not in init
        assert config["data"]["init_args"]["label_set"] == yaml.safe_load(data.read_text())["init_args"]["label_set"]


def test_paper_recipe_uses_fsdp2_on_8_gpus_with_lr_1e6(capsys):
    config = print_config(
        ["-c", str(CONFIGS / "trainer/fsdp2_8gpu.yaml"), "--model", str(CONFIGS / "model/emorl_qwen2_audio_7b.yaml"),
         "--data", str(CONFIGS / "data/iemocap.yaml")],
        capsys,
    )
    assert config["trainer"]["devices"] == 8
    assert config["trainer"]["strategy"]["class_path"] == "emorl_pl.strategies.FSDP2Strategy"
    # FSDP2's mixed-precision policy (bf16 compute, fp32 reductions and master weights), not autocast.
    strategy = config["trainer"]["strategy"]["init_args"]
    assert strategy["param_dtype"] == "bfloat16" and strategy["reduce_dtype"] == "float32"
    assert config["trainer"]["precision"] in (None, "32-true")
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-6


def test_missing_model_dir_fails_before_loading_and_names_the_key(tmp_path, capsys):
    with pytest.raises((FileNotFoundError, SystemExit, ValueError)) as err:
        run_cli(["fit", "-c", str(CONFIGS / "quickstart.yaml"),
                 "--model.init_args.policy.init_args.model_dir", str(tmp_path / "absent"),
                 "--trainer.max_steps", "1"])
    text = str(err.value) + capsys.readouterr().err
    assert "model_dir" in text and "absent" in text


def test_unknown_reward_fails_before_loading_and_names_it(tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as err:
        run_cli(["fit", "-c", str(CONFIGS / "quickstart.yaml"),
                 "--model.init_args.policy.init_args.model_dir", str(tmp_path / "never-built"),
                 "--model.init_args.rewards", "{eswr: 1.0, bogus: 1.0}", "--trainer.max_steps", "1"])
    text = str(err.value) + capsys.readouterr().err
    assert "bogus" in text and "eswr" in text
    assert not (tmp_path / "never-built").exists(), "no model may be built or loaded before the config is valid"


def test_ckpt_path_runs_take_the_model_from_the_config(tmp_path, capsys, monkeypatch, toy_model_dir):
    """``emorl validate|test|predict -c CONFIG --ckpt_path FILE``: Lightning checkpoints carry the module's
    hparams (without the policy block); the CLI must build the model from the config, not from them."""
    import torch

    config = print_config(["-c", str(CONFIGS / "quickstart.yaml")], capsys)
    hparams = {k: v for k, v in config["model"]["init_args"].items() if k not in ("policy", "optimizer")}
    hparams.update(_class_path=config["model"]["class_path"], _instantiator="lightning.pytorch.cli.instantiate_module")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "pytorch-lightning_version": "2.6.6", "hyper_parameters": hparams}, ckpt)
    # The policy block comes from the config file alone (its relative model_dir, the toy, is put here).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny-qwen2-audio").symlink_to(toy_model_dir)
    cli = run_cli(["validate", "-c", str(CONFIGS / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path),
                   "--data.init_args.root", str(tmp_path / "synth"), "--data.init_args.num_speakers", "3",
                   "--data.init_args.utterances_per_speaker_per_label", "1",
                   "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--model.init_args.max_new_tokens", "4",
                   "--ckpt_path", str(ckpt)])
    assert "val/ua" in cli.trainer.callback_metrics


def test_model_labels_are_refused_because_they_come_from_the_data(tmp_path):
    with pytest.raises(ValueError, match="data.init_args.label_set"):
        run_cli(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "--model.init_args.labels", "meld7"])
    block = yaml.safe_load((CONFIGS / "model" / "emorl_qwen2_audio_7b.yaml").read_text())
    block["init_args"]["labels"] = "meld7"
    bad = tmp_path / "model.yaml"
    bad.write_text(yaml.safe_dump(block))
    with pytest.raises(ValueError, match="model.yaml.*data.init_args.label_set"):
        run_cli(["fit", "-c", str(CONFIGS / "trainer" / "single_gpu.yaml"), "--model", str(bad),
                 "--data", str(CONFIGS / "data" / "iemocap.yaml")])
