"""Audio I/O with soundfile and resampling with torchaudio.functional (no torchaudio.load: it needs
torchcodec + FFmpeg, which these machines do not have).

Conventions: audio is float32 in [-1, 1], shape (frames,) for mono or (frames, channels).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


class AudioReadError(ValueError):
    """A file or byte string that is missing, unreadable or empty as audio."""


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile: (float32 array (frames,) or (frames, channels), sample rate).

    Raises AudioReadError naming the path when it is missing, not decodable, or has zero frames.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"audio file not found: {path}")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioReadError(f"cannot decode audio file {path}: {exc}") from exc
    if audio.size == 0:
        raise AudioReadError(f"audio file {path} has no samples")
    return audio, int(sr)


def decode_audio(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode an encoded audio byte string (FLAC, WAV, OGG...) like load_audio; ``name`` is used in errors."""
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as exc:
        raise AudioReadError(f"cannot decode audio {name}: {exc}") from exc
    if audio.size == 0:
        raise AudioReadError(f"audio {name} has no samples")
    return audio, int(sr)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """Encode mono/multichannel float audio as 16-bit PCM FLAC bytes (values outside [-1, 1] are clipped)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sample_rate, format="FLAC",
             subtype="PCM_16")
    return buf.getvalue()


def to_mono(x: np.ndarray) -> np.ndarray:
    """Mix (frames, channels) down to (frames,) by averaging channels; (frames,) is returned as float32.

    A (channels, frames) array with few channels and many frames is recognised and averaged over axis 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"audio must be 1-D or 2-D (frames, channels), got shape {x.shape}")
    # soundfile gives (frames, channels); tolerate channel-first arrays such as torch's (C, T).
    axis = 0 if x.shape[0] <= 8 < x.shape[1] else 1
    return x.mean(axis=axis, dtype=np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample 1-D float audio from sr_in to sr_out Hz (band-limited sinc, torchaudio.functional.resample).

    The output has ceil(len(x) * sr_out / sr_in) samples; same rate returns the input unchanged.
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    # One intra-op thread: on a 2-core CPU the multi-threaded conv1d was measured 20x slower for some
    # lengths (thread contention), and a 1-D resample gains nothing from threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Imported here: the CPU vLLM environment has no torchaudio (scripts/vllm_cpu_env.sh), and only
        # resampling needs it.
        try:
            import torchaudio.functional as AF
        except ImportError as e:  # the vLLM environment has none
            raise ImportError(f"resampling {sr_in} -> {sr_out} Hz needs torchaudio, which this environment lacks: "
                              "give 16 kHz audio (emorl-data writes 16 kHz shards) or install torchaudio") from e

        y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(sr_in), int(sr_out))
    finally:
        torch.set_num_threads(threads)
    return y.numpy().astype(np.float32, copy=False)
