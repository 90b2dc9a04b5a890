"""The test models' published text is the published text: Qwen3-Omni-30B-A3B-Instruct's chat template.

Oracles, written out by hand here: the SHA-256 and length of the "chat_template" string of the
"Qwen3-Omni-Instruct" entry in xorbitsai/inference's xinference/model/llm/llm_family.json (@a53c1936, unchanged
through @7ecec16b6), and the prompts that template renders for the policy's conversation
(``prompting.conversation``), with their token ids from the Qwen2 vocabulary (``user`` 872, the thinker
config's ``user_token_id``; ``assistant`` 77091; ``\\n`` 198; ``\\n\\n`` 271) and Qwen3-Omni's added tokens.
"""

from __future__ import annotations

import hashlib

import pytest

from emorl_pl.modules.prompting import conversation
from emorl_pl.modules.tiny import (
    QWEN3_NON_SPECIAL,
    QWEN3_OMNI_CHAT_TEMPLATE,
    QWEN3_OMNI_NAMED_TOKENS,
    QWEN3_OMNI_SPECIAL_TOKEN_IDS,
    real_qwen2_tokenizer,
)

INSTRUCTION = "What is the emotion of the speaker?"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
# Qwen3-Omni's added-token ids (tokenizer_config.json of the release), by hand
IM_START, IM_END, THINK, END_THINK = 151644, 151645, 151667, 151668
AUDIO_START, AUDIO_END, AUDIO_PAD = 151669, 151670, 151675
USER, ASSISTANT, NL, NL2 = 872, 77091, 198, 271


@pytest.fixture(scope="module")
def tokenizer():
    return real_qwen2_tokenizer(QWEN3_OMNI_SPECIAL_TOKEN_IDS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                named_tokens=QWEN3_OMNI_NAMED_TOKENS, non_special=QWEN3_NON_SPECIAL)


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=QWEN3_OMNI_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def test_qwen3_omni_template_is_the_published_text():
    text = QWEN3_OMNI_CHAT_TEMPLATE.encode("utf-8")
    assert len(text) == 6519
    assert hashlib.sha256(text).hexdigest() == "45777d2e798aae1d1ce6844e69edcb23fc0c710009554711c78efab9044da2c8"


def test_qwen3_omni_policy_prompt_renders_and_tokenizes(tokenizer):
    text = _render(tokenizer, conversation(INSTRUCTION))
    assert text == f"<|im_start|>user\n{AUDIO}{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    words = tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=False) == [
        IM_START, USER, NL, AUDIO_START, AUDIO_PAD, AUDIO_END, *words, IM_END, NL, IM_START, ASSISTANT, NL]


def test_qwen3_omni_system_prompt_and_transcript(tokenizer):
    # no default system turn: the system prompt appears only when given
    text = _render(tokenizer, conversation(INSTRUCTION, "hello there", "You are a judge."))
    assert text == ("<|im_start|>system\nYou are a judge.<|im_end|>\n"
                    f"<|im_start|>user\n{AUDIO}Transcript: \"hello there\"\n{INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_qwen3_omni_thinking_switch_and_no_audio_ids(tokenizer):
    text = _render(tokenizer, conversation(INSTRUCTION), enable_thinking=False, add_audio_id=True)
    assert text == f"<|im_start|>user\n{AUDIO}{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.encode(text, add_special_tokens=False)[-7:] == [
        IM_START, ASSISTANT, NL, THINK, NL2, END_THINK, NL2]


def test_qwen3_omni_tools_take_a_list_system_prompt(tokenizer):
    """The Instruct template's tools branch reads a list system content (the release's first template
    concatenated it as a string: QwenLM/Qwen3-Omni#41)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                *conversation(INSTRUCTION)]
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}
    text = _render(tokenizer, messages, tools=[tool])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert text.endswith(f"</tool_call><|im_end|>\n<|im_start|>user\n{AUDIO}{INSTRUCTION}<|im_end|>\n"
                         "<|im_start|>assistant\n")
