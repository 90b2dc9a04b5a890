"""Counting audio-encoder calls in tests: a forward hook on the policy's audio tower (no production counter)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class EncoderCalls:
    calls: int = 0  # forward calls of the audio tower
    utterances: int = 0  # utterances encoded over those calls


@contextlib.contextmanager
def count_encoder_calls(policy) -> Iterator[EncoderCalls]:
    """Counts the calls of ``policy``'s audio tower inside the block, and the utterances they encoded (Omni's
    tower takes all utterances flat with ``feature_lens``; Qwen2-Audio's a batch of feature rows)."""
    counts = EncoderCalls()

    def hook(module, args, kwargs, output) -> None:
        lens = kwargs.get("feature_lens")
        features = args[0] if args else kwargs.get("input_features")
        counts.calls += 1
        counts.utterances += len(lens) if lens is not None else features.shape[0]

    handle = policy.direct_call_modules()["audio_tower"].register_forward_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def encoder_calls_of_a_step(policy, prompts, group_size: int, row_slices, **rollout_kwargs) -> EncoderCalls:
    """The audio-encoder calls of a rollout and every log-prob pass a GRPO step makes over it: policy and
    reference without grad, then the policy with grad per slice of rows (the micro-batches)."""
    with count_encoder_calls(policy) as encoder:
        rollout = policy.rollout(prompts, group_size, **rollout_kwargs)
        with torch.no_grad():
            policy.completion_logps(rollout)
            policy.completion_logps(rollout, reference=True)
        for rows in row_slices:
            policy.completion_logps(rollout, rows).sum().backward()
    return encoder
