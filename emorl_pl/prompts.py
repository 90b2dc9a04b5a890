"""The prompt's words, from YAML: instruction per response mode, how a transcript is shown, the system
prompt, optionally per corpus. The default is the built-in text (``emorl_pl.reasoning.instruction``).

    model:
      init_args:
        prompt:
          instructions:
            esr: "Which emotion does the speaker express? One of: {labels}. Answer as <think>...</think><answer>label</answer>"
          transcript: "The speaker says: {transcript}\\n{instruction}"
          system: "You are an expert in affective computing."
          corpora:
            meld: {system: "You are watching a TV series."}

A template that lacks a required field (``{labels}`` in an instruction, ``{transcript}`` and
``{instruction}`` in the transcript form) or names an unknown one is refused when the config is read,
naming the field.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from emorl_pl.emotions import get_label_set
from emorl_pl.reasoning import MODES, instruction

_FIELDS = {"instructions": ("labels",), "transcript": ("transcript", "instruction")}
DEFAULT_TRANSCRIPT = 'Transcript: "{transcript}"\n{instruction}'  # how a transcript goes before the instruction


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _check(where: str, text: str, required: Sequence[str]) -> None:
    names = _placeholders(text)
    missing = [f"{{{n}}}" for n in required if n not in names]
    unknown = sorted(names - set(required))
    if missing:
        raise ValueError(f"{where} must contain {', '.join(missing)}; got {text!r}")
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {', '.join('{' + u + '}' for u in unknown)} "
                         f"(allowed: {', '.join('{' + r + '}' for r in required)}); got {text!r}")


@dataclass
class PromptTemplate:
    """The user turn and system prompt of every prompt (see the module docstring).

    Args:
        instructions: response mode (``esr``, ``eur``, ``ir``) -> instruction text with ``{labels}`` (the
            label set, comma-separated); a mode not given uses the built-in instruction.
        transcript: how a transcript goes with the instruction when transcripts are used, with
            ``{transcript}`` and ``{instruction}``.
        system: the system prompt; None keeps the policy's ``system_prompt`` (else the chat template's).
        corpora: corpus name -> overrides of ``instructions`` / ``transcript`` / ``system`` for its samples.
    """

    instructions: dict[str, str] = field(default_factory=dict)
    transcript: str = DEFAULT_TRANSCRIPT
    system: str | None = None
    corpora: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate("prompt", self.instructions, self.transcript)
        for corpus, overrides in self.corpora.items():
            unknown = sorted(set(overrides) - {"instructions", "transcript", "system"})
            if unknown:
                raise ValueError(f"prompt.corpora.{corpus} has unknown key(s) {unknown} "
                                 "(allowed: instructions, transcript, system)")
            self._validate(f"prompt.corpora.{corpus}", overrides.get("instructions", {}),
                           overrides.get("transcript"))

    @staticmethod
    def _validate(where: str, instructions: dict[str, str], transcript: str | None) -> None:
        for mode, text in instructions.items():
            if mode not in MODES:
                raise ValueError(f"{where}.instructions has unknown mode {mode!r} (modes: {list(MODES)})")
            _check(f"{where}.instructions.{mode}", text, _FIELDS["instructions"])
        if transcript is not None:
            _check(f"{where}.transcript", transcript, _FIELDS["transcript"])

    def _get(self, key: str, corpus: str | None):
        overrides = self.corpora.get(corpus or "", {})
        return overrides[key] if key in overrides else getattr(self, key)

    def user_text(self, mode: str, labels: Sequence[str] | str, transcript: str | None = None,
                  corpus: str | None = None) -> str:
        """The user turn's text for one utterance (the audio goes before it)."""
        instructions = {**self.instructions, **self.corpora.get(corpus or "", {}).get("instructions", {})}
        label_set = get_label_set(labels)
        text = (instructions[mode].format(labels=", ".join(label_set)) if mode in instructions
                else instruction(mode, label_set))
        if transcript:
            text = self._get("transcript", corpus).format(transcript=transcript, instruction=text)
        return text

    def system_prompt(self, corpus: str | None = None) -> str | None:
        return self._get("system", corpus)
