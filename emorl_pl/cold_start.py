"""Supervised cold-start targets: a perfectly formatted answer whose reasoning tells the truth.

The cold start teaches the response format before GRPO (as EMO-RL's base model already follows
instructions). For the ESR mode the acoustics field describes the utterance's actual prosody, taken
from the sample's metadata (the generated corpus stores it under ``prosody``), so the format reward
is earned honestly and the acoustics field is never invented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emorl_pl.reasoning import format_response

_PROSODY_ORDER = ("pitch", "range", "contour", "rate", "loudness", "voice")
_PROSODY_NOUN = {
    "pitch": "pitch",
    "range": "pitch range",
    "contour": "contour",
    "rate": "speaking rate",
    "loudness": "volume",
    "voice": "voice",
}


def describe_prosody(prosody: Mapping[str, Any] | None) -> str:
    """One sentence from coarse prosody words, e.g. ``high pitch, wide pitch range, fast speaking rate``."""
    if not prosody:
        return "no reliable acoustic cues were measured"
    words = prosody.get("words", prosody)
    parts = [f"{words[k]} {_PROSODY_NOUN[k]}" for k in _PROSODY_ORDER if isinstance(words.get(k), str)]
    return ", ".join(parts) if parts else "no reliable acoustic cues were measured"


def cold_start_target(mode: str, label: str, meta: Mapping[str, Any] | None = None) -> str:
    """The supervised target response for one utterance in ``mode`` with gold ``label``.

    ``meta`` is the sample's JSON (``text`` = transcript, ``prosody`` = measured prosody words).
    """
    meta = meta or {}
    text = meta.get("text")
    content = f'the speaker says "{text}"' if text else "unclear words"
    acoustics = describe_prosody(meta.get("prosody"))
    words = (meta.get("prosody") or {}).get("words", {})
    cues = [f"{words[k]} {_PROSODY_NOUN[k]}" for k in ("pitch", "loudness", "rate") if isinstance(words.get(k), str)]
    summary = f"{', '.join(cues) if cues else 'the acoustic cues'} suggest {label}"
    fields = {"content": content, "acoustics": acoustics, "summary": summary, "think": f"{acoustics}, so {label}"}
    return format_response(mode, label, fields)
