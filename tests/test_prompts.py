"""Prompt templates from YAML: defaults equal the built-in text, placeholders are checked when the config is
read (naming the field), per-corpus overrides, and a custom instruction reaching the rendered prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from emorl_pl.prompts import PromptTemplate
from emorl_pl.reasoning import instruction

LABELS = ["neutral", "happy", "angry", "sad"]


def test_default_is_the_built_in_text():
    t = PromptTemplate()
    for mode in ("esr", "eur", "ir"):
        assert t.user_text(mode, LABELS) == instruction(mode, LABELS)
    assert t.user_text("ir", LABELS, transcript="I am fine.") == f'Transcript: "I am fine."\n{instruction("ir", LABELS)}'
    assert t.system_prompt() is None


def test_custom_instruction_transcript_system_and_corpus_overrides():
    t = PromptTemplate(
        instructions={"ir": "Pick one of {labels}."},
        transcript="Words: {transcript} | {instruction}",
        system="You are an expert.",
        corpora={"meld": {"system": "TV series.", "instructions": {"ir": "Friends! One of {labels}."}}},
    )
    assert t.user_text("ir", LABELS) == "Pick one of neutral, happy, angry, sad."
    assert t.user_text("ir", LABELS, transcript="hi") == "Words: hi | Pick one of neutral, happy, angry, sad."
    assert t.user_text("ir", LABELS, corpus="meld") == "Friends! One of neutral, happy, angry, sad."
    assert t.user_text("esr", LABELS) == instruction("esr", LABELS)  # a mode not given keeps the default
    assert (t.system_prompt(), t.system_prompt("meld"), t.system_prompt("iemocap")) == (
        "You are an expert.", "TV series.", "You are an expert.")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(instructions={"esr": "Say the emotion."}), r"prompt\.instructions\.esr must contain \{labels\}"),
        (dict(instructions={"esr": "{labels} {speaker}"}), r"prompt\.instructions\.esr has unknown field\(s\) \{speaker\}"),
        (dict(instructions={"xyz": "{labels}"}), r"prompt\.instructions has unknown mode 'xyz'"),
        (dict(transcript="{transcript} only"), r"prompt\.transcript must contain \{instruction\}"),
        (dict(corpora={"meld": {"transcript": "{instruction}"}}), r"prompt\.corpora\.meld\.transcript must contain \{transcript\}"),
        (dict(corpora={"meld": {"sytem": "x"}}), r"prompt\.corpora\.meld has unknown key\(s\) \['sytem'\]"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**kwargs)


def test_module_renders_the_template_per_corpus_into_the_real_chat_template(real_model_dir):
    import torch

    from emorl_pl.modules.grpo_module import GRPOModule
    from emorl_pl.modules.policy import AudioLMPolicy

    template = PromptTemplate(instructions={"ir": "Which of {labels}?"}, transcript="Said: {transcript}. {instruction}",
                              system="Default system.", corpora={"meld": {"system": "TV series."}})
    module = GRPOModule(AudioLMPolicy(real_model_dir), labels="iemocap4", mode="ir", prompt=template,
                        use_transcripts=True)
    batch = {"waveforms": [torch.zeros(8000), torch.zeros(8000)], "sample_rate": 16000, "labels": ["sad", "happy"],
             "texts": ["I lost it", None], "corpus": ["meld", "iemocap"]}
    prompts = module._prompts(batch)
    tok = module.policy.processor.tokenizer
    first, second = (tok.decode(ids[mask.bool()]) for ids, mask in zip(prompts.input_ids, prompts.attention_mask))
    assert "<|im_start|>system\nTV series.<|im_end|>" in first
    assert "Said: I lost it. Which of neutral, happy, angry, sad?<|im_end|>" in first
    assert "<|im_start|>system\nDefault system.<|im_end|>" in second
    assert "<|audio_eos|>\nWhich of neutral, happy, angry, sad?<|im_end|>" in second  # no transcript: none shown
    assert first.count("<|AUDIO|>") > 0 and second.count("<|AUDIO|>") > 0


def test_bad_template_in_yaml_is_refused_at_config_time(tmp_path, capsys):
    from emorl_pl.cli import run_cli

    # A model folder that exists (a missing one is refused first, naming model_dir) but holds nothing: the template
    # error must come before anything is read from it.
    (tmp_path / "model").mkdir()
    with pytest.raises((ValueError, SystemExit)) as err:
        run_cli(["fit", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                 "--model.init_args.policy.init_args.model_dir", str(tmp_path / "model"),
                 "--model.init_args.prompt.instructions", "{esr: 'Say the emotion.'}", "--trainer.max_steps", "1"])
    text = str(err.value) + capsys.readouterr().err
    assert "instructions.esr must contain {labels}" in text
    assert not any((tmp_path / "model").iterdir()), "refused before anything was loaded or built"
