"""Response modes: the instruction that asks for a format, a strict format check, a lenient parser.

Three modes (EMO-RL, Li et al. 2025):

* ``ir``  (instruction response, answer only)::

      <answer>label</answer>

* ``eur`` (free-form reasoning)::

      <think>reasoning</think><answer>label</answer>

* ``esr`` (the paper's explicit structured reasoning)::

      <think><content>what is said</content><acoustics>pitch, energy, rate, voice quality</acoustics>
      <summary>how they add up</summary></think><answer>label</answer>

Two readings of one completion:

* strict (``ParsedResponse.format_ok``, for the format reward): the tag sequence is exactly the mode's
  template (every tag once, in order, lower case, no tag of another mode), every leaf field is
  non-empty after stripping, only whitespace sits between container tags and outside the outer tags,
  and the answer normalises to an allowed label.
* lenient (``ParsedResponse.label``, for accuracy and evaluation): the text of the LAST ``<answer>``
  (closed or, for truncated output, running to the end of the text), else the whole text when there
  is no answer tag at all (so a bare ``happy`` counts), normalised with ``try_normalize_label``
  against the allowed labels; None when that fails.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from emorl_pl.emotions import get_label_set, normalize_label, try_normalize_label

MODES: tuple[str, ...] = ("ir", "eur", "esr")

TAGS: tuple[str, ...] = ("think", "content", "acoustics", "summary", "answer")
FIELDS: tuple[str, ...] = ("think", "content", "acoustics", "summary")

# Any spelling of a known tag (case, inner spaces), so that "<Answer>" or "< /think>" is seen as a tag
# that breaks the strict format rather than as plain text.
_TAG_RE = re.compile(r"<\s*(/?)\s*(" + "|".join(TAGS) + r")\s*>", re.IGNORECASE)

# Template per mode: a flat sequence of tags; leaf tags enclose free text, containers only whitespace.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "ir": ("<answer>", "</answer>"),
    "eur": ("<think>", "</think>", "<answer>", "</answer>"),
    "esr": (
        "<think>",
        "<content>",
        "</content>",
        "<acoustics>",
        "</acoustics>",
        "<summary>",
        "</summary>",
        "</think>",
        "<answer>",
        "</answer>",
    ),
}
_LEAVES: dict[str, tuple[str, ...]] = {
    "ir": ("answer",),
    "eur": ("think", "answer"),
    "esr": ("content", "acoustics", "summary", "answer"),
}

_DEFAULT_FIELDS: dict[str, str] = {
    "content": "The words alone do not settle the emotion.",
    "acoustics": "Pitch, energy, speaking rate and voice quality carry the cue.",
    "summary": "Together the content and the acoustics point to {label}.",
    "think": "The way the speaker sounds points to {label}.",
}


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known response mode, else raise naming the known ones."""
    if mode not in MODES:
        raise ValueError(f"unknown response mode {mode!r}; known modes: {', '.join(MODES)}")
    return mode


def instruction(mode: str, labels: Sequence[str] | str) -> str:
    """The task instruction for the prompt: the allowed labels and the exact output format of ``mode``."""
    check_mode(mode)
    label_list = ", ".join(get_label_set(labels))
    head = (
        "Identify the emotion of the speaker in the audio. "
        f"Choose exactly one of these labels: {label_list}.\n"
    )
    if mode == "ir":
        return (
            head + "Reply with the label only, inside answer tags, exactly like this:\n<answer>label</answer>"
        )
    if mode == "eur":
        return head + (
            "First reason about the emotion inside <think> </think>, then give the label inside "
            "<answer> </answer>, exactly like this:\n<think>your reasoning</think><answer>label</answer>"
        )
    return head + (
        "Reason in three steps inside <think> </think>: in <content> </content> describe what is said "
        "(the words and their meaning); in <acoustics> </acoustics> describe how it is said (pitch, "
        "energy, speaking rate, voice quality); in <summary> </summary> tie the content and the "
        "acoustics together into a judgement of the emotion. Then give the label inside "
        "<answer> </answer>. Use exactly this format:\n"
        "<think><content>...</content><acoustics>...</acoustics><summary>...</summary></think>"
        "<answer>label</answer>"
    )


@dataclass(frozen=True)
class ParsedResponse:
    """One completion read two ways: strict ``format_ok`` and lenient canonical ``label``.

    ``fields`` holds the stripped text of the first closed ``<think>``, ``<content>``, ``<acoustics>``,
    ``<summary>`` found (whatever the mode); ``answer`` the raw stripped answer text the label came from.
    """

    format_ok: bool
    label: str | None
    fields: dict[str, str] = field(default_factory=dict)
    answer: str | None = None


def _strict_format_ok(text: str, mode: str, labels: Sequence[str]) -> bool:
    """True iff ``text`` is exactly the mode's template with non-empty leaves and an allowed answer."""
    template = _TEMPLATES[mode]
    leaves = _LEAVES[mode]
    tags = list(_TAG_RE.finditer(text))
    if [m.group(0) for m in tags] != list(template):
        return False
    # Gaps: before the first tag, between consecutive tags, after the last tag.
    bounds = [0] + [p for m in tags for p in (m.start(), m.end())] + [len(text)]
    for k in range(len(tags) + 1):
        gap = text[bounds[2 * k] : bounds[2 * k + 1]]
        opened = template[k - 1] if k > 0 else ""
        is_leaf = k > 0 and not opened.startswith("</") and opened[1:-1] in leaves
        if is_leaf:
            if not gap.strip():
                return False
            if opened == "<answer>" and try_normalize_label(gap, allowed=labels) is None:
                return False
        elif gap.strip():
            return False
    return True


def _lenient_answer(text: str) -> str | None:
    """Text of the last ``<answer>`` up to its ``</answer>`` (or the end), other tags removed."""
    opens = [m for m in _TAG_RE.finditer(text) if not m.group(1) and m.group(2).lower() == "answer"]
    if not opens:
        return None
    rest = text[opens[-1].end() :]
    close = re.search(r"<\s*/\s*answer\s*>", rest, re.IGNORECASE)
    if close is not None:
        rest = rest[: close.start()]
    return _TAG_RE.sub(" ", rest).strip()


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in FIELDS:
        m = re.search(rf"<{name}>(.*?)</{name}>", text, re.DOTALL)
        if m is not None:
            out[name] = m.group(1).strip()
    return out


def parse_response(text: str, mode: str, labels: Sequence[str] | str) -> ParsedResponse:
    """Read a completion: strict format check and lenient label (see the module docstring)."""
    check_mode(mode)
    parsed = _parse_cached(text, mode, get_label_set(labels))
    # Each reward and the step's logging parse the same completions: parse once, hand out copies.
    return dataclasses.replace(parsed, fields=dict(parsed.fields))


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str, mode: str, labels: tuple[str, ...]) -> ParsedResponse:
    answer = _lenient_answer(text)
    if answer is not None:
        label = try_normalize_label(answer, allowed=labels)
    else:
        label = try_normalize_label(text, allowed=labels)
        answer = text.strip() if label is not None else None
    return ParsedResponse(
        format_ok=_strict_format_ok(text, mode, labels),
        label=label,
        fields=_fields(text),
        answer=answer,
    )


def format_response(mode: str, label: str, fields: Mapping[str, str] | None = None) -> str:
    """A perfectly formatted response of ``mode`` answering ``label`` (a cold-start SFT target).

    ``fields`` may give ``think`` (eur) or ``content`` / ``acoustics`` / ``summary`` (esr); keys unused
    by the mode are ignored, missing ones get a generic sentence naming the label. Field text must be
    non-empty and contain no tags, or the result would not pass the strict check.
    """
    check_mode(mode)
    label = normalize_label(label)
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown response fields {unknown}; known: {', '.join(FIELDS)}")
    if mode == "eur" and "think" not in fields:
        # A structured record can still feed free-form reasoning: join its parts.
        parts = [fields[k].strip() for k in ("content", "acoustics", "summary") if k in fields]
        if parts:
            fields["think"] = " ".join(parts)

    def leaf(name: str) -> str:
        value = fields.get(name, _DEFAULT_FIELDS[name].format(label=label)).strip()
        if not value:
            raise ValueError(f"response field {name!r} is empty")
        if _TAG_RE.search(value):
            raise ValueError(f"response field {name!r} contains a reserved tag: {value!r}")
        return value

    answer = f"<answer>{label}</answer>"
    if mode == "ir":
        return answer
    if mode == "eur":
        return f"<think>{leaf('think')}</think>{answer}"
    return (
        f"<think><content>{leaf('content')}</content><acoustics>{leaf('acoustics')}</acoustics>"
        f"<summary>{leaf('summary')}</summary></think>{answer}"
    )
