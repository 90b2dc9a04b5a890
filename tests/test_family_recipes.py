"""Each new family's shipped recipe, as a user runs it: ``emorl fit -c configs/trainer/single_gpu.yaml --model
configs/model/<recipe>.yaml --data configs/data/synth.yaml`` on that family's real-shape test model, with only the
overrides a CPU smoke run needs (device, precision, sizes, steps). Every other recipe setting (dtype, LoRA, gradient
checkpointing, G, loss, rewards, optimizer) is the recipe's own; then ``emorl predict`` from the checkpoint."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from emorl_pl.cli import run_cli
from emorl_pl.modules.families import family_for

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "audioflamingo3": ("emorl_audioflamingo3.yaml", "audioflamingo3_model_dir"),
    "qwen2_5_omni": ("emorl_qwen2_5_omni_7b.yaml", "qwen2_5_omni_model_dir"),
    "qwen3_omni_lora": ("emorl_qwen3_omni_30b_a3b_lora.yaml", "qwen3_omni_model_dir"),
}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth_recipes")


@pytest.mark.parametrize("family", list(RECIPES))
def test_recipe_fits_and_predicts_on_the_real_shape_model(family, synth_root, tmp_path, request):
    recipe, fixture = RECIPES[family]
    model_dir = request.getfixturevalue(fixture)
    recipe_path = REPO / "configs" / "model" / recipe
    policy_block = yaml.safe_load(recipe_path.read_text())["init_args"]["policy"]["init_args"]
    smoke = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "1",
             "--trainer.max_epochs", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
             "--model.init_args.policy.init_args.model_dir", model_dir, "--model.init_args.max_new_tokens", "8",
             "--model.init_args.eval_max_new_tokens", "8",
             "--data.init_args.root", str(synth_root), "--data.init_args.num_speakers", "3",
             "--data.init_args.utterances_per_speaker_per_label", "1", "--data.init_args.batch_size", "2",
             "--data.init_args.eval_batch_size", "2"]
    cli = run_cli(["fit", "-c", str(REPO / "configs/trainer/single_gpu.yaml"), "--model", str(recipe_path),
                   "--data", str(REPO / "configs/data/synth.yaml"), *smoke, "--test_after_fit", "false"])
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 1 and "val/ua" in trainer.callback_metrics
    # the recipe's own settings reached the policy (nothing replaced by the smoke overrides)
    policy = module.policy
    assert policy.dtype_name == policy_block.get("dtype", "float32")
    assert (policy.lora is None) == (policy_block.get("lora") is None)
    assert policy.gradient_checkpointing == policy_block.get("gradient_checkpointing", False)
    assert module.hparams.group_size == 6 and torch.isfinite(trainer.callback_metrics["loss"])
    config_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    assert type(policy.family) is type(family_for(config_type))  # the family's own adapter, from config.json
    last = Path(trainer.checkpoint_callback.last_model_path)
    assert last.is_file()
    # emorl predict on audio files from the same recipe and the checkpoint (README's "Evaluate and predict")
    import soundfile as sf

    for i, seconds in enumerate((1.0, 2.5)):
        wave = 0.1 * torch.randn(int(16000 * seconds), generator=torch.Generator().manual_seed(i))
        sf.write(tmp_path / f"clip{i}.wav", wave.numpy(), 16000)
    out = tmp_path / "predictions.jsonl"
    device = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "predict"), "--model.init_args.policy.init_args.model_dir", model_dir,
              "--model.init_args.eval_max_new_tokens", "8"]
    run_cli(["predict", "-c", str(REPO / "configs/trainer/single_gpu.yaml"), "--model", str(recipe_path),
             "--data", str(REPO / "configs/data/synth.yaml"), *device, "--ckpt_path", str(last),
             "--data", "emorl_pl.datamodules.files.AudioFilesDataModule",
             "--data.paths", str(tmp_path / "clip*.wav"),
             "--trainer.callbacks", "emorl_pl.callbacks.prediction_writer.JSONLPredictionWriter",
             "--trainer.callbacks.output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["key"]).name for r in rows) == ["clip0.wav", "clip1.wav"]
    assert all("error" not in r and "text" in r for r in rows)
