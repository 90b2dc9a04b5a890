"""Prompts for an audio-LM: one chat turn per utterance (audio, optional transcript, instruction) through the
model's chat template and processor, with audio longer than the encoder's window cropped and counted."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from emorl_pl.prompts import DEFAULT_TRANSCRIPT

log = logging.getLogger(__name__)


@dataclass
class Prompts:
    """Processor outputs for B utterances; text left-padded for generation."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    input_features: Tensor  # (B, n_mels, frames)
    feature_attention_mask: Tensor  # (B, frames)
    # Per utterance: seconds of audio past the encoder window, cropped before the model saw it (0.0 if none).
    seconds_ignored: tuple[float, ...] = ()
    # What an inference engine gets (``emorl_pl.modules.vllm_engine``): each rendered prompt with one audio
    # placeholder per audio (the engine expands it; a pre-expanded id run is silently misplaced by vLLM), and
    # the cropped audio at the feature extractor's rate.
    texts: tuple[str, ...] = ()
    audio: tuple[Any, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Prompts:
        return Prompts(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.input_features,
                                                  self.feature_attention_mask)), seconds_ignored=self.seconds_ignored,
                       texts=self.texts, audio=self.audio)


@dataclass
class PromptEmbeds:
    """Prompt embeddings with the audio merged, plus the cached audio-tower output to re-merge later.

    ``audio_hidden[b]``: audio tower output of utterance b, (n_audio_tokens_b, D_audio), detached.
    ``ref_audio_hidden``: the same from the reference copy (full fine-tuning with a trainable tower only).
    """

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    inputs_embeds: Tensor  # (B, P, D)
    audio_hidden: list[Tensor]
    prompts: Prompts
    ref_audio_hidden: list[Tensor] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class CroppedAudio:
    """Running totals of audio cropped to a length limit: the encoder's window (the policy's), or a data
    module's ``max_duration`` (``what`` and ``where`` say which, in the warnings).

    Warns the first time any audio is cropped, with that batch's figures, and again with the totals so far
    each time the number of cropped waveforms reaches a power of ten (10, 100, ...): a single warning with
    the first batch's figures under-reported what a run ignored, and nothing else showed the totals."""

    utterances: int = 0  # waveforms cropped
    seconds: float = 0.0  # seconds cut off, in total
    seen: int = 0  # waveforms looked at (cropped or not)
    limit: float | None = None  # seconds, as last given to ``add``
    what: str = "the encoder's {limit:g} s window"
    where: str = ("the policy counts them in cropped_utterances / cropped_seconds, and predictions record "
                  "seconds_ignored per file; audio a data module cropped to its max_duration before is counted "
                  "by the data module (its cropped totals)")

    def add(self, seconds_ignored: Sequence[float], window_seconds: float) -> None:
        """Count one batch: the seconds cut off each waveform (0.0: not cropped) at a limit of
        ``window_seconds``."""
        cropped = [s for s in seconds_ignored if s > 0]
        before = self.utterances
        self.limit = window_seconds
        self.seen += len(seconds_ignored)
        self.utterances += len(cropped)
        self.seconds += sum(cropped)
        if not cropped:
            return
        if not before:
            log.warning(
                "%d of %d waveforms are longer than %s: %.2f s of audio ignored (cropped) in this batch; the "
                "totals follow at 10, 100, 1000... cropped waveforms; %s.", len(cropped), len(seconds_ignored),
                self._what(), sum(cropped), self.where,
            )
        elif len(str(self.utterances)) > len(str(before)):  # crossed 10, 100, 1000...
            log.warning("%s so far (%s).", self.summary(), self.where)

    def _what(self) -> str:
        return self.what.format(limit=self.limit) if self.limit is not None else "the limit"

    def summary(self) -> str:
        """The totals in words: ``"12 of 40 waveforms longer than ...: 31.50 s of audio ignored (cropped)"``."""
        return (f"{self.utterances} of {self.seen} waveforms longer than {self._what()}: {self.seconds:.2f} s "
                "of audio ignored (cropped)")


def conversation(instruction: str, transcript: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """One user turn: the audio, then the (transcript and) instruction; the system prompt if set.

    The audio part carries an ``audio`` key because Qwen2-Audio's published chat template recognises
    audio by that key only ({"type": "audio"} alone renders no ``<|AUDIO|>``); the waveform itself goes
    to the processor separately. Qwen2.5-Omni's template accepts the same part.
    """
    text = DEFAULT_TRANSCRIPT.format(transcript=transcript, instruction=instruction) if transcript else instruction
    turns = [{"role": "user", "content": [{"type": "audio", "audio": "<waveform>"}, {"type": "text", "text": text}]}]
    if system_prompt is not None:
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def build_prompts(
    processor,
    waveforms: Sequence[Tensor],
    sample_rate: int,
    instruction: str | Sequence[str],
    texts: Sequence[str | None] | None = None,
    *,
    system_prompt: str | None | Sequence[str | None] = None,
    cropped: CroppedAudio | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Prompts:
    """Chat-template prompts with one audio each, through the processor (left-padded text).

    Each 1-D waveform is resampled to the feature extractor's rate when ``sample_rate`` differs, and
    cropped to the feature extractor's ``chunk_length`` seconds (the encoder takes a fixed-length
    window: 30 s for Qwen2-Audio). What is cropped is counted per utterance in ``Prompts.seconds_ignored``
    and added to ``cropped``. A transcript in ``texts[i]`` goes before the instruction. ``instruction`` and
    ``system_prompt`` are one for all rows or one per row (``emorl_pl.prompts.PromptTemplate`` renders them
    per utterance). The features come in ``dtype`` and everything on ``device``.
    """
    fe = processor.feature_extractor
    if texts is not None and len(texts) != len(waveforms):
        raise ValueError(f"texts has {len(texts)} entries but there are {len(waveforms)} waveforms")
    audio, ignored = [], []
    for i, wave in enumerate(waveforms):
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(f"waveforms[{i}] must be a non-empty 1-D tensor, got shape {tuple(wave.shape)}")
        if sample_rate != fe.sampling_rate:
            try:
                import torchaudio.functional as AF
            except ImportError as e:  # the vLLM environment has none
                raise ImportError(f"resampling {sample_rate} -> {fe.sampling_rate} Hz needs torchaudio, which this environment lacks: "
                                  "give 16 kHz audio (emorl-data writes 16 kHz shards) or install torchaudio") from e

            wave = AF.resample(wave, sample_rate, fe.sampling_rate)
        audio.append(wave[: fe.n_samples].cpu().numpy())
        ignored.append(max(wave.numel() - fe.n_samples, 0) / fe.sampling_rate)
    if cropped is not None:
        cropped.add(ignored, fe.n_samples / fe.sampling_rate)
    n = len(audio)
    instructions = [instruction] * n if isinstance(instruction, str) else list(instruction)
    systems = list(system_prompt) if isinstance(system_prompt, (list, tuple)) else [system_prompt] * n
    if len(instructions) != n or len(systems) != n:
        raise ValueError(f"got {len(instructions)} instructions and {len(systems)} system prompts for {n} waveforms")
    chats = [conversation(instructions[i], texts[i] if texts else None, systems[i]) for i in range(n)]
    prompts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    # The feature extractor computes in torch and converts to numpy, which has no bfloat16: keep it out
    # of a surrounding autocast (Lightning's bf16-mixed on CPU wraps the training step in one).
    with torch.autocast("cpu", enabled=False):
        out = processor(text=prompts, audio=audio, sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt")
    return Prompts(
        input_ids=out["input_ids"],
        attention_mask=out["attention_mask"],
        input_features=out["input_features"].to(dtype),
        feature_attention_mask=out["feature_attention_mask"],
        seconds_ignored=tuple(ignored),
        texts=tuple(prompts),
        audio=tuple(audio),
    ).to(device)
