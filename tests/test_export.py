"""``emorl-export``: LoRA merged into the base model loads with ``from_pretrained`` and gives the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import CONFIGS, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA policy with random (non-zero) adapter weights, saved as a trainable-only checkpoint."""
    from emorl_pl.export import policy_from_config

    tmp = tmp_path_factory.mktemp("export")
    policy = policy_from_config(CONFIGS / "tiny_grpo.yaml", str(tiny_model_dir())).load()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    state = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items() if ".lora_" in k}
    ckpt = tmp / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 6}, ckpt)
    return policy, ckpt, tmp


def _prompt_logits(model, policy, wave):
    prompts = policy.build_prompts([wave], 16000, "Which emotion?")
    out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                input_features=prompts.input_features, feature_attention_mask=prompts.feature_attention_mask)
    return out.logits


def test_exported_model_matches_lora_policy(trained):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from emorl_pl.export import main

    policy, ckpt, tmp = trained
    out = tmp / "exported"
    rc = main(["--config", str(CONFIGS / "tiny_grpo.yaml"), "--model_dir", str(tiny_model_dir()),
               "--ckpt", str(ckpt), "--out", str(out)])
    assert rc == 0
    exported = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    assert not any("lora" in k for k in exported.state_dict()), "LoRA must be merged, not saved as adapters"
    assert AutoProcessor.from_pretrained(out).tokenizer.get_vocab() == policy.processor.tokenizer.get_vocab()

    wave = torch.randn(16000, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        want = _prompt_logits(policy.model.eval(), policy, wave)
        got = _prompt_logits(exported, policy, wave)
        base = _prompt_logits(Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model_dir()).eval(), policy, wave)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(base, want, atol=1e-3), "the adapters must change the logits for this test to mean anything"


def test_export_refuses_non_empty_out_and_bad_checkpoint(trained, tmp_path, capsys):
    from emorl_pl.export import main

    _, ckpt, _ = trained
    (tmp_path / "keep.txt").write_text("user data")
    base = ["--config", str(CONFIGS / "tiny_grpo.yaml"), "--model_dir", str(tiny_model_dir())]
    assert main(base + ["--ckpt", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "user data"

    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"policy.not.a.param": torch.ones(1)}}, wrong)
    assert main(base + ["--ckpt", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "do not belong" in capsys.readouterr().err
    assert main(base + ["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
