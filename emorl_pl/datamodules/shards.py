"""The shard format shared by the corpus converters, the synthetic generator and the DataModules.

A split is a folder ``<root>/<split>/`` with ``shard-000000.tar``, ``shard-000001.tar``, ... (WebDataset
tars) and ``index.json``. One sample is two tar members with the same key:

* ``<key>.flac``: 16-bit PCM FLAC, mono, at the split's sample rate (16 kHz by default);
* ``<key>.json``: ``label`` (canonical emotion), ``corpus_label`` (the corpus's own), ``corpus``,
  ``speaker``, ``duration`` (seconds, filled in by the writer), optional ``text``, ``session``,
  ``fold`` and any extra fields (e.g. ``prosody`` from the synthetic generator).

Keys contain no dots (WebDataset splits key and extension at the first dot of the file name): the
writer replaces ``.`` by ``_`` and refuses duplicate keys within a split.

``index.json``: ``{"split", "num_samples", "label_counts", "speaker_counts", "shards", "sample_rate",
"corpora", "total_duration", "skipped", "cropped", "shard_label_counts"}`` (``shard_label_counts``:
``{shard name: {label: n}}``, which lets the training stream partition samples exactly without reading
the shards; indexes written before it existed lack it, and the stream then counts with
``count_shard_labels``). It is written last and only when the whole split was written, so a folder
with tars and no index is an interrupted conversion (``is_partial_split``).
"""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from emorl_pl.audio import AudioReadError, decode_audio, encode_flac, resample, to_mono
from emorl_pl.datamodules.remote import ReadOptions, display_url, is_remote, join, read_bytes, shard_records
from emorl_pl.emotions import try_normalize_label

SHARD_PATTERN = "shard-%06d.tar"
INDEX_NAME = "index.json"
REQUIRED_META = ("label", "corpus_label", "corpus", "speaker")
INDEX_KEYS = ("split", "num_samples", "label_counts", "shards", "sample_rate")


@dataclass
class AudioSample:
    """One utterance to write: ``audio`` float32, (frames,) or (frames, channels), at ``sample_rate``."""

    key: str
    audio: np.ndarray
    sample_rate: int
    meta: dict = field(default_factory=dict)


def safe_key(key: str) -> str:
    """A WebDataset-safe key: dots become underscores (the tar member is ``<key>.<ext>``)."""
    key = str(key).replace(".", "_").strip()
    if not key:
        raise ValueError("sample key is empty")
    return key


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays come from feature code and converters; store them as plain JSON.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def is_partial_split(split_dir: str | Path) -> bool:
    """True when ``split_dir`` holds shards but no index.json: a conversion that stopped before the end."""
    split_dir = Path(split_dir)
    return any(split_dir.glob("shard-*.tar")) and not (split_dir / INDEX_NAME).exists()


class SplitWriter:
    """Write one split as WebDataset shards + index.json (a context manager; ``close`` writes the index).

    Leaving the ``with`` block through an exception closes the open shard but writes no index, so an
    interrupted conversion never looks complete (``is_partial_split``).

    Each ``write`` mixes to mono, resamples to ``sample_rate``, crops (``overlong="crop"``) or skips
    (``overlong="skip"``) audio longer than ``max_duration`` seconds, and encodes FLAC PCM_16.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        sample_rate: int = 16000,
        max_count: int = 1000,
        max_bytes: int = 200_000_000,
        max_duration: float | None = None,
        overlong: str = "crop",
        overwrite: bool = False,
    ) -> None:
        if overlong not in ("crop", "skip"):
            raise ValueError(f"overlong must be 'crop' or 'skip', got {overlong!r}")
        if max_duration is not None and max_duration <= 0:
            raise ValueError(f"max_duration must be positive or None, got {max_duration}")
        if not split or "/" in split or split.startswith("."):
            raise ValueError(f"split must be a plain folder name, got {split!r}")
        self.split = split
        self.dir = Path(root) / split
        self.sample_rate = int(sample_rate)
        self.max_count = int(max_count)
        self.max_bytes = int(max_bytes)
        self.max_duration = max_duration
        self.overlong = overlong
        existing = sorted(self.dir.glob("shard-*.tar")) + sorted(self.dir.glob(INDEX_NAME))
        if existing and not overwrite:
            if is_partial_split(self.dir):
                raise FileExistsError(
                    f"split folder {self.dir} holds a partial conversion ({len(existing)} shard(s), no "
                    f"{INDEX_NAME}): pass overwrite=True to replace it"
                )
            raise FileExistsError(
                f"split folder {self.dir} already has shards/index ({len(existing)} files); "
                "pass overwrite=True to replace them"
            )
        for path in existing:
            path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writer: wds.ShardWriter | None = None
        self._shards: list[str] = []
        self._keys: set[str] = set()
        self._labels: Counter[str] = Counter()
        self._speakers: Counter[str] = Counter()
        self._shard_labels: dict[str, dict[str, int]] = {}
        self._open_shard_labels: Counter[str] = Counter()  # labels written to the shard still open
        self._corpora: set[str] = set()
        self._total_duration = 0.0
        self._cropped = 0
        self._skipped_files: list[dict[str, str]] = []
        self._index: dict | None = None

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._index is not None:
            return
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            # Release the open tar, but write no index: the split is incomplete and must look so.
            self._writer.close()
            self._writer = None

    def _shard_done(self, fname: str) -> None:
        # ShardWriter calls this when it closes a shard, before the next record is written.
        self._shards.append(Path(fname).name)
        self._shard_labels[Path(fname).name] = dict(sorted(self._open_shard_labels.items()))
        self._open_shard_labels = Counter()

    @property
    def num_samples(self) -> int:
        return sum(self._labels.values())

    def skip(self, reason: str, path: str) -> None:
        """Record a source file that was not written (missing, unreadable, unknown label...)."""
        self._skipped_files.append({"path": str(path), "reason": str(reason)})

    def write(self, sample: AudioSample) -> bool:
        """Encode and append one sample; returns False when it was skipped as overlong (counted).

        Raises ValueError naming the key for a duplicate key, missing metadata fields, an unknown
        label, empty or non-finite audio.
        """
        if self._index is not None:
            raise RuntimeError(f"SplitWriter for {self.dir} is closed")
        key = safe_key(sample.key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in split {self.dir}")
        meta = dict(sample.meta)
        missing = [k for k in REQUIRED_META if meta.get(k) in (None, "")]
        if missing:
            raise ValueError(f"sample {key!r}: metadata lacks required field(s) {missing}; need {list(REQUIRED_META)}")
        label = try_normalize_label(meta["label"])
        if label is None:
            raise ValueError(f"sample {key!r}: label {meta['label']!r} is not a known emotion")
        audio = to_mono(sample.audio)
        if audio.size == 0:
            raise ValueError(f"sample {key!r}: audio is empty")
        problem = nonfinite_problem(audio)
        if problem is not None:
            raise ValueError(f"sample {key!r}: {problem}")
        audio = resample(audio, int(sample.sample_rate), self.sample_rate)
        if self.max_duration is not None and len(audio) > self.max_duration * self.sample_rate:
            if self.overlong == "skip":
                self.skip(f"longer than max_duration={self.max_duration}s "
                          f"({len(audio) / self.sample_rate:.2f}s)", key)
                return False
            audio = audio[: int(self.max_duration * self.sample_rate)]
            self._cropped += 1
        duration = len(audio) / self.sample_rate
        meta.update(label=label, corpus=str(meta["corpus"]), speaker=str(meta["speaker"]),
                    corpus_label=str(meta["corpus_label"]), duration=round(duration, 4))
        record = {
            "__key__": key,
            "flac": encode_flac(audio, self.sample_rate),
            "json": json.dumps(meta, default=_json_default, ensure_ascii=False).encode("utf-8"),
        }
        if self._writer is None:
            # Opened lazily so that an empty split leaves no empty tar behind.
            self._writer = wds.ShardWriter(str(self.dir / SHARD_PATTERN), maxcount=self.max_count,
                                           maxsize=self.max_bytes, verbose=0,
                                           post=self._shard_done)
        self._writer.write(record)
        self._keys.add(key)
        self._labels[label] += 1
        self._open_shard_labels[label] += 1
        self._speakers[meta["speaker"]] += 1
        self._corpora.add(meta["corpus"])
        self._total_duration += duration
        return True

    def close(self) -> dict:
        """Finish the last shard, write index.json and return it plus ``skipped_files`` (path, reason)."""
        if self._index is None:
            if self._writer is not None:
                self._writer.close()
            self._index = {
                "split": self.split,
                "num_samples": self.num_samples,
                "label_counts": dict(sorted(self._labels.items())),
                "speaker_counts": dict(sorted(self._speakers.items())),
                "shards": sorted(self._shards),
                "sample_rate": self.sample_rate,
                "corpora": sorted(self._corpora),
                "total_duration": round(self._total_duration, 3),
                "skipped": len(self._skipped_files),
                "cropped": self._cropped,
                "shard_label_counts": dict(sorted(self._shard_labels.items())),
            }
            tmp = self.dir / (INDEX_NAME + ".tmp")
            tmp.write_text(json.dumps(self._index, indent=2, ensure_ascii=False) + "\n")
            tmp.replace(self.dir / INDEX_NAME)
        return {**self._index, "skipped_files": list(self._skipped_files)}


def read_index(split_dir: str | Path, options: ReadOptions | None = None) -> dict:
    """Load ``<split_dir>/index.json`` (a local folder or a URL prefix such as ``s3://bucket/train``);
    raises FileNotFoundError / ValueError naming the file and the problem (SourceReadError when a URL
    cannot be read after ``options.retries`` retries)."""
    if isinstance(split_dir, str) and is_remote(split_dir):
        path = join(split_dir, INDEX_NAME)
        try:
            text = read_bytes(path, options or ReadOptions()).decode("utf-8", "replace")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no {INDEX_NAME} at {display_url(path)} (not a converted split?)") from exc
        path = display_url(path)
    else:
        path = Path(split_dir) / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {INDEX_NAME} in split folder {Path(split_dir)} (not a converted split?)")
        text = path.read_text()
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(index).__name__}")
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise ValueError(f"{path} lacks field(s) {missing}; expected at least {list(INDEX_KEYS)}")
    return index


def split_shards(split_dir: str | Path, options: ReadOptions | None = None) -> list[str]:
    """The shards listed in a split's index.json: absolute paths (checked to exist) for a local folder,
    URLs under the prefix for a remote one (not checked: a missing one fails when it is read)."""
    if isinstance(split_dir, str) and is_remote(split_dir):
        return [join(split_dir, name) for name in read_index(split_dir, options)["shards"]]
    split_dir = Path(split_dir)
    paths = [split_dir / name for name in read_index(split_dir)["shards"]]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"shards listed in {split_dir / INDEX_NAME} are missing: {absent}")
    return [str(p) for p in paths]



class SampleDecodeError(ValueError):
    """A shard record that cannot be turned into a training sample (bad audio, JSON, label or field)."""


class LabelOutsideSetError(SampleDecodeError):
    """A known emotion that is not in the label set in use (expected, e.g. MELD's disgust under iemocap4).

    ``label``: the canonical label, so that the data modules can count the drops per label."""

    def __init__(self, message: str, label: str | None = None) -> None:
        super().__init__(message)  # args stay (message,): the error still pickles and unpickles
        self.label = label


def nonfinite_problem(audio: np.ndarray) -> str | None:
    """None when every sample of ``audio`` is finite, else what is wrong (``"audio has 3 NaN and 1 inf
    value(s) among 16000 samples"``): such audio would turn the model's features into NaN."""
    finite = np.isfinite(audio)
    if finite.all():
        return None
    nan = int(np.isnan(audio).sum())
    return f"audio has {nan} NaN and {int(finite.size - finite.sum()) - nan} inf value(s) among {audio.size} samples"


def _record_where(record: dict) -> str:
    url = record.get("__url__")
    return f"{'<unknown shard>' if url is None else display_url(url)}:{record.get('__key__', '<no key>')}"


def record_meta(record: dict, label_set: tuple[str, ...] | None = None) -> tuple[dict, str]:
    """The checks of ``decode_record`` that need no audio decoding: ``(meta, canonical label)``.

    A record passing them is *usable*: the training stream partitions exactly these records, so this
    predicate must stay the one ``decode_record`` applies before it decodes the audio.
    """
    where = _record_where(record)
    if "json" not in record or "flac" not in record:
        have = sorted(k for k in record if not k.startswith("__"))
        raise SampleDecodeError(f"{where}: record needs .flac and .json members, has {have}")
    try:
        meta = json.loads(record["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SampleDecodeError(f"{where}: .json is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise SampleDecodeError(f"{where}: .json must be an object, got {type(meta).__name__}")
    if "label" not in meta:
        raise SampleDecodeError(f"{where}: .json lacks the 'label' field")
    label = try_normalize_label(meta["label"])
    if label is None:
        raise SampleDecodeError(f"{where}: label {meta['label']!r} is not a known emotion")
    if label_set is not None and label not in label_set:
        raise LabelOutsideSetError(f"{where}: label {label!r} is outside the label set {list(label_set)}", label)
    return meta, label


def decode_record(
    record: dict, *, sample_rate: int = 16000, max_duration: float | None = None,
    label_set: tuple[str, ...] | None = None,
) -> dict:
    """Decode one raw WebDataset record ``{"__key__", "__url__", "flac", "json"}`` into a sample dict.

    Returns ``{"key", "waveform" (1-D float32 np.ndarray at sample_rate, at most max_duration s),
    "label" (canonical, in label_set when given), "text", "corpus", "meta"}``; audio cropped to
    ``max_duration`` sets ``meta["seconds_cropped"]`` (the seconds cut off). Raises SampleDecodeError
    naming the shard URL and key for undecodable or non-finite (NaN/inf) audio, bad JSON, a missing field
    or a label outside ``label_set`` (aliases are mapped to canonical names first).
    """
    key = record.get("__key__", "<no key>")
    where = _record_where(record)
    meta, label = record_meta(record, label_set)
    try:
        audio, sr = decode_audio(record["flac"], where)
    except AudioReadError as exc:
        raise SampleDecodeError(str(exc)) from exc
    problem = nonfinite_problem(audio)
    if problem is not None:
        raise SampleDecodeError(f"{where}: {problem}")
    audio = resample(to_mono(audio), sr, sample_rate)
    if max_duration is not None:
        limit = int(math.floor(max_duration * sample_rate))
        if len(audio) > limit:
            # recorded so that the loader can count it and a prediction can say what the model never heard
            meta["seconds_cropped"] = (len(audio) - limit) / sample_rate
            audio = audio[:limit]
    text = meta.get("text")
    return {
        "key": key,
        "waveform": audio,
        "label": label,
        "text": text if isinstance(text, str) else None,
        "corpus": str(meta.get("corpus", "")),
        "meta": meta,
    }


def _member_key(name: str) -> tuple[str, str] | None:
    # WebDataset's grouping (webdataset.tariterators.base_plus_ext): key = path up to the first dot of
    # the file name, extension = the rest, lower-cased.
    base = name.rsplit("/", 1)[-1]
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def count_shard_labels(path: str | Path, options: ReadOptions | None = None) -> dict[str, int]:
    """``{canonical label: records}`` of one shard, reading only its .json members (tar headers are
    skipped over, audio is not read; a remote shard is downloaded, retried as ``options`` say). Counts
    the records ``record_meta`` accepts (label set aside): the fallback of the training stream's plan for
    shards whose index.json has no ``shard_label_counts``. Raises OSError naming the file when it cannot
    be read."""
    if isinstance(path, str) and is_remote(path):
        remote: Counter[str] = Counter()
        for record in shard_records(path, options or ReadOptions(), handler=lambda exc: True):  # bad data: not counted
            try:
                _, label = record_meta(record)
            except SampleDecodeError:
                continue
            remote[label] += 1
        return dict(sorted(remote.items()))
    counts: Counter[str] = Counter()
    current: str | None = None
    members: dict[str, bytes | None] = {}

    def flush() -> None:
        if current is None or "flac" not in members or members.get("json") is None:
            return
        try:
            _, label = record_meta({"json": members["json"], "flac": b"", "__key__": current})
        except SampleDecodeError:
            return
        counts[label] += 1

    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                split = _member_key(info.name) if info.isreg() else None
                if split is None or split[0].rsplit("/", 1)[-1].startswith("__"):
                    continue
                key, ext = split
                if key != current:
                    flush()
                    current, members = key, {}
                extracted = tar.extractfile(info) if ext == "json" else None
                members[ext] = extracted.read() if extracted is not None else None
            flush()
    except (OSError, tarfile.TarError) as exc:
        raise OSError(f"cannot read shard {path}: {exc}") from exc
    return dict(sorted(counts.items()))
