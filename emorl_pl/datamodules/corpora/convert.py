"""The shared writer loop: load each planned utterance's audio, write shards per split, summarise.

Audio is read with soundfile (``emorl_pl.audio.load_audio``). Video containers (MELD's ``.mp4``) are
read from a same-stem ``.wav``/``.flac`` beside them when there is one, else decoded by ``ffmpeg`` when
it is on PATH; without either the conversion stops before writing anything. A missing or unreadable
file, or one whose samples include NaN/inf, is skipped and listed with the reason in the summary, the
index's ``skipped`` count and ``conversion.json`` (``strict=True`` stops instead).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from emorl_pl.audio import AudioReadError, decode_audio, load_audio
from emorl_pl.datamodules.corpora.common import Plan, PlannedUtterance
from emorl_pl.datamodules.shards import (
    INDEX_NAME,
    AudioSample,
    SplitWriter,
    is_partial_split,
    nonfinite_problem,
)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4a")
SIBLING_SUFFIXES = (".wav", ".flac")
SUMMARY_NAME = "conversion.json"


class ConversionError(RuntimeError):
    """The conversion cannot start or finish (existing shards, FFmpeg needed, strict mode, nothing readable)."""


def find_ffmpeg() -> str | None:
    """Path of the ``ffmpeg`` executable on PATH, or None."""
    return shutil.which("ffmpeg")


def resolve_audio(path: Path) -> Path:
    """The file to read for ``path``: a same-stem .wav/.flac sibling of a video file when one exists."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        for suffix in SIBLING_SUFFIXES:
            sibling = path.with_suffix(suffix)
            if sibling.is_file():
                return sibling
    return path


def needs_ffmpeg(path: Path) -> bool:
    """True when ``resolve_audio(path)`` is an existing video file (no pre-extracted audio beside it)."""
    resolved = resolve_audio(path)
    return resolved.suffix.lower() in VIDEO_SUFFIXES and resolved.is_file()


def check_ffmpeg_available(utterances: list[PlannedUtterance]) -> None:
    """Raise ConversionError before any writing when video files need FFmpeg and it is not on PATH."""
    video = [u.path for u in utterances if needs_ffmpeg(u.path)]
    if video and find_ffmpeg() is None:
        raise ConversionError(
            f"{len(video)} audio source(s) are video files with no same-stem .wav/.flac beside them "
            f"(e.g. {video[0]}), and ffmpeg is not on PATH: install FFmpeg (e.g. `apt-get install ffmpeg`) "
            f"or pre-extract the audio next to each video, e.g. "
            f"`ffmpeg -i {video[0].name} -vn -ac 1 -ar 16000 {video[0].with_suffix('.wav').name}`"
        )


def load_with_ffmpeg(path: Path, sample_rate: int) -> tuple[np.ndarray, int]:
    """Decode the audio track of a video file to mono ``sample_rate`` Hz with ffmpeg (WAV through a pipe)."""
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise ConversionError(f"ffmpeg is needed to read {path} and is not on PATH")
    cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(sample_rate),
           "-f", "wav", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
        raise AudioReadError(f"ffmpeg could not decode {path}: {err}")
    return decode_audio(proc.stdout, str(path))


def load_source_audio(path: Path, sample_rate: int = 16000) -> tuple[np.ndarray, int]:
    """Audio of a planned utterance (see module docstring); AudioReadError naming the path on failure."""
    resolved = resolve_audio(path)
    if resolved.suffix.lower() in VIDEO_SUFFIXES:
        if not resolved.is_file():
            raise AudioReadError(f"audio file not found: {path} (nor a same-stem .wav/.flac)")
        return load_with_ffmpeg(resolved, sample_rate)
    return load_audio(resolved)


def existing_outputs(out_dir: Path, splits: list[str]) -> list[Path]:
    """Split folders under ``out_dir`` that already hold shards or an index."""
    return [out_dir / s for s in splits
            if any((out_dir / s).glob("shard-*.tar")) or (out_dir / s / INDEX_NAME).exists()]


def refusal_message(taken: list[Path]) -> str:
    """Why a conversion into ``taken`` (folders with shards or an index) is refused, and what to do."""
    partial = [p for p in taken if is_partial_split(p)]
    complete = [p for p in taken if p not in partial]
    parts = []
    if complete:
        parts.append(f"refusing to overwrite existing shards in {', '.join(map(str, complete))}")
    if partial:
        # A conversion that stopped early leaves shards without index.json (written only on success).
        parts.append(f"{', '.join(map(str, partial))} "
                     f"{'holds' if len(partial) == 1 else 'hold'} a partial conversion (no {INDEX_NAME})")
    return "; ".join(parts) + ": rerun with --overwrite (overwrite=True) to replace them"


def convert_plan(
    plan: Plan,
    out_dir: str | Path,
    *,
    sample_rate: int = 16000,
    max_count: int = 1000,
    max_bytes: int = 200_000_000,
    max_duration: float | None = None,
    overlong: str = "crop",
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Write every split of ``plan`` under ``out_dir``; returns ``{split: index}`` (with ``skipped_files``).

    Refuses (ConversionError naming the folders) when a split folder already has shards and not
    ``overwrite``, saying which hold a partial conversion; checks FFmpeg needs up front. A split's
    index.json is written only when the split was written to the end. Also writes
    ``out_dir/conversion.json`` (the summary).
    """
    out_dir = Path(out_dir)
    splits = plan.splits()
    if not overwrite:
        taken = existing_outputs(out_dir, splits)
        if taken:
            raise ConversionError(refusal_message(taken))
    if plan.utterances and not any(resolve_audio(u.path).is_file() for u in plan.utterances):
        raise ConversionError(f"none of the {len(plan.utterances)} planned audio files exists (e.g. "
                              f"{plan.utterances[0].path}); check the audio root / corpus folder")
    check_ffmpeg_available(plan.utterances)
    indexes: dict[str, dict] = {}
    for split in splits:
        todo = [u for u in plan.utterances if u.split == split]
        with SplitWriter(out_dir, split, sample_rate=sample_rate, max_count=max_count, max_bytes=max_bytes,
                         max_duration=max_duration, overlong=overlong, overwrite=overwrite) as writer:
            bar = tqdm(todo, desc=f"{plan.corpus}/{split}", unit="utt", disable=None if progress else True)
            for u in bar:
                try:
                    audio, sr = load_source_audio(u.path, sample_rate)
                    problem = nonfinite_problem(audio)
                    if problem is not None:
                        # one bad file must not abort the corpus (the writer refuses such audio)
                        raise AudioReadError(f"{u.path}: {problem}")
                except AudioReadError as exc:
                    if strict:
                        raise ConversionError(f"{exc} (--strict: stopping; the {split} split is incomplete)") from exc
                    writer.skip(str(exc), str(u.path))
                    continue
                writer.write(AudioSample(u.key, audio, sr, u.meta()))
            indexes[split] = writer.close()
    written = sum(ix["num_samples"] for ix in indexes.values())
    _write_summary(out_dir, plan, indexes)
    if plan.utterances and written == 0:
        first = next((f["reason"] for ix in indexes.values() for f in ix["skipped_files"]), None)
        raise ConversionError(f"none of the {len(plan.utterances)} planned audio files could be read "
                              f"(first: {first}); check the audio files")
    return indexes


def _write_summary(out_dir: Path, plan: Plan, indexes: dict[str, dict]) -> None:
    summary: dict[str, Any] = {
        "corpus": plan.corpus,
        "notes": plan.notes,
        "dropped": dict(plan.dropped),
        "splits": {s: {k: v for k, v in ix.items()} for s, ix in indexes.items()},
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def format_plan(plan: Plan) -> str:
    """Human-readable planned counts per split and label, dropped counts and split notes."""
    lines = [f"{plan.corpus}: {len(plan.utterances)} utterances planned"]
    for split in plan.splits():
        counts = plan.label_counts(split)
        speakers = len({u.speaker for u in plan.utterances if u.split == split})
        lines.append(f"  {split}: {sum(counts.values())} ({_fmt_counts(counts)}); {speakers} speaker(s)")
    if plan.dropped:
        lines.append(f"  dropped: {sum(plan.dropped.values())} ({_fmt_counts(plan.dropped)})")
    lines += [f"  {note}" for note in plan.notes]
    return "\n".join(lines)


def format_summary(plan: Plan, indexes: dict[str, dict], max_listed: int = 50) -> str:
    """Written counts per split and label, dropped counts, and the skipped files (first ``max_listed``)."""
    lines = [f"{plan.corpus}: wrote {sum(ix['num_samples'] for ix in indexes.values())} utterances"]
    skipped: list[dict] = []
    for split, ix in indexes.items():
        extra = f", {ix.get('cropped', 0)} cropped" if ix.get("cropped") else ""
        lines.append(f"  {split}: {ix['num_samples']} ({_fmt_counts(ix['label_counts'])}), "
                     f"{ix['total_duration'] / 3600:.2f} h, {len(ix['shards'])} shard(s), "
                     f"{ix['skipped']} skipped{extra}")
        skipped += ix.get("skipped_files", [])
    if plan.dropped:
        lines.append(f"  dropped by label/filter: {sum(plan.dropped.values())} ({_fmt_counts(plan.dropped)})")
    lines += [f"  {note}" for note in plan.notes]
    if skipped:
        lines.append(f"  skipped files ({len(skipped)}):")
        lines += [f"    {f['reason']}" if f["path"] in f["reason"] else f"    {f['path']}: {f['reason']}"
                  for f in skipped[:max_listed]]
        if len(skipped) > max_listed:
            lines.append(f"    ... and {len(skipped) - max_listed} more (all listed in {SUMMARY_NAME})")
    return "\n".join(lines)


def _fmt_counts(counts: dict | Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
