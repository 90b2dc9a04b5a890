"""Run identity: the settings that change what a training step means, saved in every checkpoint and
compared on resume.

A resumed run whose group size, label set, response mode, rewards, loss or model differ from the saved
run's is a different experiment glued onto the first one's weights and optimizer state; nothing in
Lightning notices. So every checkpoint holds ``RUN_IDENTITY_KEY``: a flat ``{setting: value}`` dict
(see ``GRPOModule.run_identity``), and ``emorl fit --ckpt_path ...`` compares it with the current
config before training (``emorl_pl.cli``):

- a changed **structural** setting (model family, vocabulary, LoRA rank / alpha / targets, which parts
  train) is always refused: the saved weights do not fit the new model;
- any other changed setting is refused unless ``--resume_changes allow`` says the change is intended.

Settings outside the identity change freely on resume: ``FREE_SETTINGS`` lists them for the README.
Pure functions, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RUN_IDENTITY_KEY = "emorl_run_identity"

# Settings whose change makes the saved weights unloadable: never allowed.
STRUCTURAL = ("policy.family", "policy.vocab_size", "policy.lora", "policy.freeze_audio_tower")

# For README and messages: what may change on resume without --resume_changes allow.
FREE_SETTINGS = (
    "optimizer (lr, weight_decay, ...)", "lr_schedule", "warmup_steps", "gradient_clip_val",
    "trainer.max_steps / max_epochs", "logging and log_every_n_steps", "val_check_interval",
    "limit_val_batches", "callbacks", "micro_batch_size", "eval_max_new_tokens", "eval_samples",
    "eval_temperature", "num_workers", "policy.model_dir (the path; the family and vocabulary are checked)",
    "policy.dtype / attn_implementation / gradient_checkpointing / fused_decode",
)

RESUME_CHANGES = ("refuse", "allow")


def _normalise(value: Any) -> Any:
    """JSON-like form, so that a tuple saved and a list read back (or a dataclass) compare equal."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return _normalise({f: getattr(value, f) for f in value.__dataclass_fields__})
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalise_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _normalise(v) for k, v in identity.items()}


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, saved value, current value)`` for each setting recorded on both sides that differs. A setting
    the checkpoint did not record (written by a version that did not have it) is not compared, so adding a
    setting to the identity never locks older checkpoints out."""
    saved, current = normalise_identity(saved), normalise_identity(current)
    return [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """A plain-text table: setting | saved | current."""
    rows = [("setting", "saved", "current")] + [(k, repr(a), repr(b)) for k, a, b in changes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  " + "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


class ResumeConfigError(ValueError):
    """A resume whose config changes what the saved run's steps meant."""


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], ckpt_path: str,
                 resume_changes: str = "refuse") -> list[tuple[str, Any, Any]]:
    """Raise ``ResumeConfigError`` with a table if the current config changes the saved run's identity.

    Structural changes are refused whatever ``resume_changes`` says; others only under ``"refuse"``.
    Returns the changes that were allowed (for the caller to log). A checkpoint without an identity
    (written before it was recorded) is accepted as it is: there is nothing to compare.
    """
    if resume_changes not in RESUME_CHANGES:
        raise ValueError(f"--resume_changes must be one of {list(RESUME_CHANGES)}, got {resume_changes!r}")
    if saved is None:
        return []
    changes = identity_changes(saved, current)
    if not changes:
        return []
    structural = [c for c in changes if c[0] in STRUCTURAL]
    if structural:
        raise ResumeConfigError(
            f"cannot resume {ckpt_path}: the model differs from the saved run's, so its weights do not fit:\n"
            f"{format_changes(structural)}\n"
            "Restore these settings to resume, or start a new run (without --ckpt_path)."
        )
    if resume_changes != "allow":
        raise ResumeConfigError(
            f"cannot resume {ckpt_path}: the config changes settings that define the saved run's steps:\n"
            f"{format_changes(changes)}\n"
            "Restore them to resume the same run, or pass --resume_changes allow if the change is intended "
            "(it is then recorded in the next checkpoint)."
        )
    return changes
