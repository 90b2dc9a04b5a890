"""ShardDataModule: WebDataset shards (see shards.py) -> model-agnostic batches of variable-length audio.

A batch is ``{"waveforms": list[Tensor (T,) float32], "sample_rate": int, "labels": list[str],
"keys": list[str], "texts": list[str | None], "corpus": list[str], "meta": list[dict],
"is_pad": list[bool], "errors": list[{"key", "error"}]}`` (no padding of the audio: the policy's
processor pads/featurises). ``is_pad`` rows exist only so that every rank runs the same number of
steps (ranks of a sharded model must make the same collective calls); they are never real data and
evaluation metrics skip them.

Training stream (rank ``r`` of ``R``, ``B`` samples per batch, DataLoader workers ``W``):

* a *usable* sample is a record whose JSON parses and whose label is in the label set
  (``shards.record_meta``); ``U`` of them per pass. Per-shard counts come from index.json
  (``shard_label_counts``) or, for older indexes and bare tar patterns, from reading the shards'
  .json members once when the loader is built;
* pass ``p``: the shard list is shuffled with seed ``(seed, p)``, the same on every rank and worker;
  the usable samples, in that shard order, get positions ``0..U-1``, and rank ``r`` takes the
  contiguous range ``[r*U//R, (r+1)*U//R)``. The ranges partition the pass: every usable sample goes
  to exactly one rank, whatever the number and sizes of the shards (several ranks may read parts of
  one shard). The rank's range goes through a shuffle buffer seeded ``(seed, p, r)`` and is cut into
  ``Np = ceil(ceil(U/R) / B)`` full batches;
* padding, the one exception to "each sample exactly once per pass": ranks must run the same number
  of steps (or DDP/FSDP hang), so a rank whose range is shorter than ``Np * B`` (at most ``B`` rows
  short) fills its last batch(es) with repeats of its first samples of the pass, flagged
  ``is_pad``. A sample whose audio cannot be decoded is skipped (logged, counted) and its row
  replaced the same way, so a batch never shrinks;
* the rank's batch sequence is a pure function of (seed, p, r, R, B, U): it does not depend on the
  number of DataLoader workers. Each worker reads the rank's records (tar reading and JSON parsing,
  cheap) and decodes only the batches it hands out: batch ``k`` of the epoch comes from worker
  ``k % W`` (DataLoader's in-order round robin);
* epochs: without ``epoch_length`` epoch ``e`` is pass ``e``. With it, the stream is passes 0, 1, 2...
  back to back and epoch ``e`` is its batches ``[e*L, (e+1)*L)``, so each pass is still seen once;
* resuming: ``state_dict() = {"epoch", "batches", "world_size", "batch_size", "seed", "samples",
  "epoch_length"}`` (``batches`` handed out in the current epoch). After ``load_state_dict`` the
  workers regenerate the epoch's batch sequence and decode from batch ``batches`` on. A different
  ``num_workers`` resumes exactly (the sequence does not depend on it). A different world size,
  batch size, seed, sample count or epoch_length changes the sequence, so resuming inside an epoch
  with one is refused with a ValueError naming the saved and current values; at an epoch boundary
  (``batches == 0``, no epoch_length) it is accepted: the next epoch is a new pass planned with the
  current values. The same state is exposed by the train loader itself, which Lightning saves and
  restores in checkpoints (``_Stateful``). Workers are not persistent (each epoch re-creates them).

Evaluation streams (valid / each test set): every sample exactly once across ranks. Records are
enumerated in shard order; those whose JSON parses and whose label is in the label set get an index
``j``, and rank ``r`` keeps ``j % R == r``. Every rank runs ``ceil(ceil(J/R) / B)`` batches: a rank
with one sample fewer gets a padding batch (a copy of a real sample, ``is_pad``), and a sample whose
audio cannot be decoded stays in its batch as a placeholder (0.1 s of silence, ``is_pad``, with an
``errors`` entry), so a corrupt sample never changes the number of steps of a rank. With ``W`` workers
each worker reads all shards of the set (cheap: tar reading, not decoding) and decodes batch ``m`` of
its rank iff ``m % W == w``.

Sources (``find_shards``): a split folder, a glob, a brace pattern or a tar file, local or as a URL
(``s3://``, ``gs://`` and other fsspec protocols, ``http(s)://``, ``pipe:COMMAND``), or a ``.txt`` list of
them. The plan needs the usable samples per shard: from the index.json next to the shards (a URL split
folder's ``<url>/index.json``), else by reading the shards once when the loader is built (downloading
remote ones). The partition above is a function of the shard list and these counts only, so it holds
for URLs exactly as for files. Reading (``remote.py``): an http(s) or pipe read that gets no data for
``read_timeout`` seconds fails; a remote shard that fails with a network error is read again, at most
``read_retries`` times, skipping the records already handed out. A shard that still cannot be read (or
a local one that fails once) is skipped: logged with its URL, counted per rank in
``self.failed_shards[split]`` (``{url: times}``) and in the loader's summary. In training its rows in the
rank's share are replaced by padding rows; in evaluation its unread samples become placeholder rows
(``is_pad``, with an ``errors`` entry) when index.json gives its sample count. Either way every rank keeps
its number of steps: a dead http(s) or pipe shard costs its rank at most ``read_retries + 1`` timeouts
plus the waits between them (fsspec backends apply their own timeouts), and the other ranks that long
at their next collective, never a hang.

Skipped samples (undecodable or non-finite (NaN/inf) audio, bad JSON, missing field, label outside the
label set, bad data in a readable tar) are logged (one warning each, with shard URL and key; a label outside the set
at debug level) and counted in ``self.skipped[split]``; those with a label outside the label set are also
counted per label in ``self.dropped_labels[split]`` (``{"fear": 12, "disgust": 3}``). The counts travel
from workers to the main process alongside the batches, so they are exact after an iteration with any
number of workers, and each loader logs a one-line summary when it finishes (``<split>: N sample(s)
skipped on rank r: 15 with a label outside the label set [...] ({'fear': 12, 'disgust': 3}); ...``: a
warning, except for label drops alone after the loader's first summary, which are expected and go to info).

Cropping: audio longer than ``max_duration`` keeps its first ``max_duration`` seconds. The samples handed
out that were cropped (padding rows aside) are counted in ``self.cropped[split]`` (a
``prompting.CroppedAudio``: waveforms, seconds cut off), warned about the first time and at every
power of ten, and each such sample's ``meta["seconds_cropped"]`` says how much it lost.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emorl_pl.datamodules import remote
from emorl_pl.datamodules.remote import ReadOptions, SourceReadError
from emorl_pl.datamodules.shards import (
    LabelOutsideSetError,
    SampleDecodeError,
    count_shard_labels,
    decode_record,
    read_index,
    record_meta,
    split_shards,
)
from emorl_pl.emotions import get_label_set, try_normalize_label
from emorl_pl.modules.prompting import CroppedAudio

log = logging.getLogger(__name__)

Batch = dict[str, Any]
# (message, log level, label outside the label set, shard given up on) of a skipped record or shard
Problem = tuple[str, int, str | None, str | None]
# (message, label outside the label set or None, shard URL when a whole shard could not be read, else None)
Skip = tuple[str, str | None, str | None]
PLACEHOLDER_SECONDS = 0.1
# The fields of the training stream's position that its batch sequence depends on (see the docstring).
LAYOUT_KEYS = ("world_size", "batch_size", "seed", "samples", "epoch_length")
LIST_SUFFIX = ".txt"  # a data source ending so is a list of sources, one per line


def rank_and_world_size(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, world_size) of ``trainer``, else of torch.distributed when it is up, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collate_samples(samples: list[dict], sample_rate: int) -> Batch:
    """Lists, no padding: decoded samples -> the model-agnostic batch dict (waveforms still numpy here;
    ShardLoader makes them tensors in the main process, because sending many small tensors from workers
    through shared memory was measured slower than pickling arrays)."""
    return {
        "waveforms": [np.ascontiguousarray(s["waveform"], dtype=np.float32) for s in samples],
        "sample_rate": sample_rate,
        "labels": [s["label"] for s in samples],
        "keys": [s["key"] for s in samples],
        "texts": [s["text"] for s in samples],
        "corpus": [s["corpus"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "is_pad": [bool(s.get("is_pad", False)) for s in samples],
        "errors": [{"key": s["key"], "error": s["error"]} for s in samples if s.get("error")],
    }


def placeholder_sample(key: str, label: str, sample_rate: int, error: str | None = None,
                       meta: dict | None = None) -> dict:
    """A row that stands in for a sample that cannot be decoded (or for padding when a rank has no
    decodable sample at all): 0.1 s of silence, flagged ``is_pad`` so that metrics skip it."""
    meta = dict(meta or {})
    return {"key": key, "waveform": np.zeros(int(sample_rate * PLACEHOLDER_SECONDS), np.float32),
            "label": label, "text": None, "corpus": str(meta.get("corpus", "")), "meta": meta,
            "is_pad": True, "error": error}


@dataclass
class ShardSource:
    """What a data source names: its shards (paths or URLs, in a fixed order), the sample and label counts
    of index.json when the shards are whole splits (else None), and the per-shard label counts that the
    index.json files next to the shards hold (``{shard: {label: n}}``, possibly for some shards only)."""

    urls: list[str]
    num_samples: int | None
    label_counts: dict[str, int] | None
    shard_labels: dict[str, dict[str, int]]


def _norm(url: str) -> str:
    return url if remote.is_remote(url) else str(Path(url))


def _index_key(folder: str, name: str) -> str:
    return _norm(remote.join(folder, name))


def _with_indexes(urls: list[str], options: ReadOptions) -> ShardSource:
    """``urls`` plus what the index.json of their folders says: per-shard label counts, and the totals
    when the urls are all of those folders' shards (a subset of a split: the index cannot tell)."""
    total: int | None = 0
    counts: Counter[str] = Counter()
    shard_labels: dict[str, dict[str, int]] = {}
    folders = {u: remote.parent(u) for u in urls}
    if None in folders.values():
        total = None  # a pipe: command or a signed URL: no index.json to look in
    for folder in sorted({f for f in folders.values() if f is not None}):
        try:
            index = read_index(folder, options)
        except (FileNotFoundError, PermissionError, ValueError):
            total = None
            continue
        per_shard = index.get("shard_label_counts")
        if isinstance(per_shard, dict):
            shard_labels.update({_index_key(folder, name): dict(c) for name, c in per_shard.items()
                                 if isinstance(c, dict)})
        listed = {_index_key(folder, name) for name in index["shards"]}
        if listed != {_norm(u) for u, f in folders.items() if f == folder}:
            total = None
        elif total is not None:
            total += int(index["num_samples"])
            counts.update(index["label_counts"])
    return ShardSource(urls, total, None if total is None else dict(counts), shard_labels)


def _expand(spec: str, options: ReadOptions) -> list[str] | None:
    """The shards a pattern or shard spec names (None for a split folder)."""
    if remote.is_remote(spec):
        if remote.is_pipe(spec) and "{" in spec:
            # braces only: the shell's own ${VAR} (e.g. a token) must reach the shell unexpanded
            return list(braceexpand.braceexpand(spec))
        if "{" in spec:
            return list(wds.shardlists.expand_urls(spec))
        if not remote.is_pipe(spec) and remote.scheme(spec) not in ("http", "https") and any(c in spec for c in "*?["):
            import fsspec  # object stores can list: s3://bucket/train/shard-*.tar

            fs, _ = fsspec.core.url_to_fs(spec, **options.storage_options)
            return [fs.unstrip_protocol(path) for path in fs.glob(spec)]
        # one shard: a command, a .tar URL, or a URL with a query string (a signed URL names one object)
        one = remote.is_pipe(spec) or remote.looks_like_shard(spec) or "?" in spec
        return [spec] if one else None
    if Path(spec).is_dir():
        return None
    if "{" in spec:
        return list(wds.shardlists.expand_urls(spec))
    if any(c in spec for c in "*?["):
        return glob.glob(spec)
    return [spec]


def _local(spec: str) -> str:
    return remote.local_path(spec) or spec


def _folder_source(folder: str, options: ReadOptions) -> ShardSource:
    index = read_index(folder, options)
    # a local split's shards are checked to exist; a remote one's fail when they are read
    shards = [remote.join(folder, n) for n in index["shards"]] if remote.is_remote(folder) else split_shards(folder)
    per_shard = index.get("shard_label_counts")
    shard_labels = {_index_key(folder, name): dict(c) for name, c in per_shard.items()
                    if isinstance(c, dict)} if isinstance(per_shard, dict) else {}
    return ShardSource(shards, int(index["num_samples"]), dict(index["label_counts"]), shard_labels)


def _shards_of(spec: str, options: ReadOptions) -> list[str] | None:
    """The sorted shards a pattern or shard spec names (checked to exist when local), None for a folder."""
    urls = _expand(spec, options)
    if urls is None:
        return None
    urls = sorted(set(urls))
    missing = [u for u in urls if not remote.is_remote(u) and not Path(u).is_file()]
    if not urls or missing:
        raise FileNotFoundError(
            f"data source {spec!r}: expected a split folder with index.json, a tar file, a glob or a brace "
            f"pattern of tars, a URL or a .txt list of them; no such file(s): {missing or spec}"
        )
    return urls


def _list_source(spec: str, options: ReadOptions) -> ShardSource:
    """A text file (local or a URL) with one source per line: shards, patterns or split folders (blank
    lines and ``#`` comments ignored; relative paths are relative to the list's folder). The shards keep
    the list's order; the index.json of each folder is read once."""
    data = remote.read_bytes(spec, options).decode("utf-8")
    base = remote.parent(spec) if remote.is_remote(spec) else os.path.dirname(_local(spec))
    urls: list[str] = []
    folders: list[ShardSource] = []
    loose: list[str] = []  # shards named by patterns or one by one
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().endswith(LIST_SUFFIX):
            raise ValueError(f"shard list {spec!r} names another list {line!r}; lists cannot be nested")
        if not remote.is_remote(line):
            line = _local(line)
            if not os.path.isabs(line) and base is not None:
                line = remote.join(base, line)
        shards = _shards_of(line, options)
        if shards is None:
            folders.append(_folder_source(line, options))
            urls += folders[-1].urls
        else:
            loose += shards
            urls += shards
    if not urls:
        raise ValueError(f"shard list {spec!r} names no shard (one path or URL per line)")
    twice = sorted(u for u, n in Counter(_norm(u) for u in urls).items() if n > 1)
    if twice:
        raise ValueError(f"shard list {spec!r} names these shards more than once: {twice[:5]}")
    parts = folders + ([_with_indexes(loose, options)] if loose else [])
    known = all(p.num_samples is not None and p.label_counts is not None for p in parts)
    labels: Counter[str] = Counter()
    for p in parts:
        labels.update(p.label_counts or {})
    return ShardSource(urls, sum(p.num_samples for p in parts) if known else None, dict(labels) if known else None,
                       {k: v for p in parts for k, v in p.shard_labels.items()})


def find_shards(spec: str, options: ReadOptions | None = None) -> ShardSource:
    """The shards of a data source: a split folder (with index.json), a brace pattern
    (``a/shard-{000000..000003}.tar``), a glob (``a/*.tar``), a tar file, any of these as a URL
    (``s3://bucket/iemocap/train``, ``https://host/train/shard-{000000..000009}.tar``, ``pipe:COMMAND``)
    or a ``.txt`` file listing them, one per line. Patterns give their shards sorted; a list keeps its
    order. Raises FileNotFoundError naming the spec when a local path matches nothing, and
    SourceReadError naming the URL when an index.json or list cannot be read."""
    options = options or ReadOptions()
    if spec.lower().endswith(LIST_SUFFIX):
        return _list_source(spec, options)
    spec = spec if remote.is_remote(spec) else _local(spec)  # file:// URLs become paths
    shards = _shards_of(spec, options)
    return _folder_source(spec, options) if shards is None else _with_indexes(shards, options)


def resolve_shards(spec: str, options: ReadOptions | None = None) -> tuple[list[str], int | None, dict[str, int] | None]:
    """``find_shards`` as (shard paths or URLs, num_samples or None, label_counts or None)."""
    source = find_shards(spec, options)
    return source.urls, source.num_samples, source.label_counts


def count_in_label_set(label_counts: dict[str, int] | None, num_samples: int | None,
                       label_set: tuple[str, ...]) -> int | None:
    """Samples whose (alias-normalised) label is in the label set, from index.json's label_counts."""
    if label_counts is None:
        return num_samples
    return sum(n for lab, n in label_counts.items() if try_normalize_label(lab, label_set) is not None)


def _usable(labels: dict[str, int], label_set: tuple[str, ...]) -> int:
    return sum(n for lab, n in labels.items() if try_normalize_label(lab, label_set) is not None)


def indexed_shard_label_counts(urls: list[str]) -> dict[str, dict[str, int]]:
    """``{shard path: {label: n}}`` for the shards whose folder's index.json has ``shard_label_counts``."""
    return _with_indexes(list(urls), ReadOptions()).shard_labels


def shard_usable_counts(urls: list[str], label_set: tuple[str, ...], known: dict[str, dict[str, int]] | None = None,
                        options: ReadOptions | None = None) -> list[int]:
    """Usable samples (label in the label set) per shard, from index.json (``known``: per-shard label
    counts already read, e.g. ``ShardSource.shard_labels``) or, where it lacks them, by reading the
    shard's .json members (``count_shard_labels``; a remote shard is downloaded for it)."""
    options = options or ReadOptions()
    indexed = indexed_shard_label_counts(urls) if known is None else known
    unknown = [u for u in urls if _norm(u) not in indexed]
    remote_unknown = [u for u in unknown if remote.is_remote(u)]
    if remote_unknown:
        log.warning("%d remote shard(s) have no per-shard counts in an index.json next to them (first: %s): "
                    "reading them once to count their samples. Put the split's index.json (from emorl-data) "
                    "next to the shards to skip this download.", len(remote_unknown),
                    remote.display_url(remote_unknown[0]))
    counts = []
    for url in urls:
        labels = indexed.get(_norm(url))
        if labels is None:
            labels = count_shard_labels(url, options)
        counts.append(_usable(labels, label_set))
    return counts


def rank_bounds(total: int, world_size: int) -> list[int]:
    """Boundaries of the ranks' contiguous ranges of ``total`` positions: rank r has [b[r], b[r+1])
    (sizes differ by at most one)."""
    return [r * total // world_size for r in range(world_size + 1)]


def batches_per_pass(total: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per pass: enough for the largest rank range, ``ceil(ceil(U/R) / B)``."""
    return math.ceil(math.ceil(total / world_size) / batch_size)


@dataclass(frozen=True)
class ShardSlice:
    """A shard a rank reads in a pass: its usable records get positions ``start .. start+count-1``."""

    url: str
    start: int
    count: int
    report: bool  # this rank reports the shard's skipped records (exactly one rank does, per shard)


@dataclass(frozen=True)
class RankPass:
    """One rank's part of one pass: positions ``[lo, hi)`` and the shards holding them, in pass order."""

    lo: int
    hi: int
    shards: tuple[ShardSlice, ...]
    order: tuple[str, ...]  # every shard, in pass order (the last resort for padding rows)


def plan_rank_pass(urls: list[str], counts: list[int], *, seed: int, pass_index: int, rank: int,
                   world_size: int) -> RankPass:
    """Rank ``rank``'s range of pass ``pass_index`` (see the module docstring): a pure function of its
    arguments, so every rank and worker derives the same partition without talking to the others.

    Shard i's skipped records are reported by the rank whose range holds the shard's first position
    (the last rank for shards after the last usable sample), so each is counted once per pass."""
    order = np.random.default_rng([seed, pass_index]).permutation(len(urls))
    bounds = rank_bounds(sum(counts), world_size)
    lo, hi = bounds[rank], bounds[rank + 1]
    slices, start = [], 0
    for i in order:
        n = counts[i]
        owner = min(bisect.bisect_right(bounds, start) - 1, world_size - 1)
        if (start < hi and start + n > lo) or owner == rank:
            slices.append(ShardSlice(urls[i], start, n, owner == rank))
        start += n
    return RankPass(lo, hi, tuple(slices), tuple(urls[i] for i in order))


def check_resume_layout(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (ValueError naming the saved and current values) to resume a training stream position
    that the current layout cannot reproduce: inside an epoch, any of LAYOUT_KEYS that changed changes
    the rest of the epoch's batches."""
    at_boundary = int(saved.get("batches", 0)) == 0 and saved.get("epoch_length") is None \
        and current.get("epoch_length") is None
    changed = [(k, saved[k], current[k]) for k in LAYOUT_KEYS if k in saved and saved[k] != current[k]]
    if not changed or at_boundary:
        return
    what = ", ".join(f"{k}: saved {s!r}, current {c!r}" for k, s, c in changed)
    raise ValueError(
        f"cannot resume the training data stream at epoch {saved.get('epoch')}, batch {saved.get('batches')}: "
        f"the checkpoint's stream was laid out differently ({what}). The rest of that epoch cannot be "
        "reproduced with the current values, and replaying another order would repeat or skip samples. "
        "Resume with the saved values, or from a checkpoint taken at an epoch boundary. "
        "(num_workers may differ: it does not change the order.)"
    )


def _buffer_shuffle(items: Iterator, bufsize: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a buffer of ``bufsize`` items (bufsize <= 1: unchanged order)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _ignore(exn: Exception) -> bool:
    return True  # another rank/worker reports this unreadable data


class _ShardStream(IterableDataset):
    """Yields ``(batch or None, [skip messages])`` for one rank; split across DataLoader workers.

    Training needs ``counts`` (usable samples per url), ``pass_batches`` (Np) and ``num_batches``
    (batches per epoch); ``epoch`` and ``start`` (batches of the epoch already handed out) are set by
    ShardLoader before each iteration.
    """

    def __init__(self, urls: list[str], *, train: bool, batch_size: int, rank: int, world_size: int,
                 sample_rate: int, max_duration: float | None, label_set: tuple[str, ...], seed: int = 0,
                 epoch: int = 0, num_batches: int = 0, shuffle_buffer: int = 0, counts: list[int] | None = None,
                 pass_batches: int = 0, read_options: ReadOptions | None = None,
                 shard_counts: list[int | None] | None = None) -> None:
        self.urls, self.train, self.batch_size = list(urls), train, batch_size
        self.read_options = read_options or ReadOptions()
        # evaluation: usable samples per shard where index.json says (to keep the ranks in step when a
        # shard cannot be read), else None
        self.shard_counts = list(shard_counts) if shard_counts is not None else [None] * len(self.urls)
        self.rank, self.world_size = rank, world_size
        self.decode_kw = dict(sample_rate=sample_rate, max_duration=max_duration, label_set=label_set)
        self.sample_rate, self.label_set = sample_rate, label_set
        self.seed, self.epoch, self.num_batches, self.shuffle_buffer = seed, epoch, num_batches, shuffle_buffer
        self.counts, self.pass_batches, self.start = list(counts or []), pass_batches, 0
        self._skips: list[Skip] = []
        self._pending: list[Problem] = []
        self._worker = 0
        self._substitutes: dict[int, dict] = {}

    def _skip(self, msg: str, level: int = logging.WARNING, label: str | None = None,
              shard: str | None = None) -> None:
        log.log(level, "skipping %s: %s", "sample" if shard is None else "shard", msg)
        self._skips.append((msg, label, shard))

    def _tar_handler(self, exn: Exception) -> bool:
        self._skip(f"unreadable shard data: {exn!r}")
        return True  # continue with the next record

    def _read(self, url: str, handler: Callable[[Exception], bool] = _ignore) -> Iterator[dict]:
        """The records of one shard (remote ones retried, see remote.shard_records); SourceReadError when
        it cannot be read. ``handler`` gets bad data inside a readable shard (a duplicate member...)."""
        return remote.shard_records(url, self.read_options, handler)

    def _readable_records(self, urls: tuple[str, ...] | list[str]) -> Iterator[dict]:
        """The records of ``urls`` in order, passing over shards that cannot be read (reported where they
        are read for real: this is for padding rows only)."""
        for url in urls:
            try:
                yield from self._read(url)
            except SourceReadError:
                continue

    def _decode(self, record: dict, count: bool = True) -> tuple[dict | None, str | None]:
        """(sample, None), or (None, why) for a record that cannot be decoded (logged and counted
        unless ``count`` is false: a record decoded again for padding was counted already)."""
        try:
            return decode_record(record, **self.decode_kw), None
        except LabelOutsideSetError as exc:
            # expected when a corpus has more classes than the label set: counted, logged quietly
            if count:
                self._skip(str(exc), logging.DEBUG, exc.label)
            return None, str(exc)
        except SampleDecodeError as exc:
            if count:
                self._skip(str(exc))
            return None, str(exc)

    def _emit(self, batch_samples: list[dict]) -> tuple[Batch | None, list[Skip]]:
        skips, self._skips = self._skips, []
        return (collate_samples(batch_samples, self.sample_rate) if batch_samples else None), skips

    def __iter__(self) -> Iterator[tuple[Batch | None, list[Skip]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skips, self._pending, self._worker, self._substitutes = [], [], worker, {}
        gen = self._train_batches(worker, num_workers) if self.train else self._eval_batches(worker, num_workers)
        # Each batch is handed out when the next one is ready, so that the skips found after a worker's
        # last batch (trailing bad records) travel with that batch: the loader may stop after its
        # last batch without asking for more.
        held: list[dict] | None = None
        for batch in gen:
            if held is not None:
                yield self._emit(held)
            held = batch
        if held is not None:
            yield self._emit(held)
        if self._skips:
            yield self._emit([])  # a worker without batches

    # -- training: passes partitioned across ranks (see the module docstring) --
    def _problem(self, record: dict) -> Problem | None:
        """None for a usable record, else why it is skipped."""
        try:
            record_meta(record, self.label_set)
        except LabelOutsideSetError as exc:
            return str(exc), logging.DEBUG, exc.label, None
        except SampleDecodeError as exc:
            return str(exc), logging.WARNING, None, None
        return None

    def _note_tar_error(self, exn: Exception) -> bool:
        self._pending.append((f"unreadable shard data: {exn!r}", logging.WARNING, None, None))
        return True

    def _rank_records(self, plan: RankPass) -> Iterator[dict]:
        """The usable records of this rank's range, in pass order. Skipped records of the shards this
        rank reports go to ``_pending`` (attributed to the next batch handed out, see _pass_batches)."""
        for sl in plan.shards:
            handler = self._note_tar_error if sl.report else _ignore
            q = 0  # usable records of this shard so far
            records = self._read(sl.url, handler)
            try:
                for record in records:
                    problem = self._problem(record)
                    if problem is None and q < sl.count:
                        pos, q = sl.start + q, q + 1
                        if plan.lo <= pos < plan.hi:
                            yield record
                        elif pos >= plan.hi and not sl.report:
                            break  # the rest of the shard belongs to later ranks, which report it
                    elif sl.report:
                        self._pending.append(problem or (
                            f"{remote.display_url(sl.url)}:{record.get('__key__')}: the shard has more usable "
                            f"samples than its index.json lists ({sl.count}); stale index, re-run the conversion",
                            logging.WARNING, None, None))
            except SourceReadError as exc:
                # Every rank that reads the shard reports its own failure: the rows it loses are its own.
                lost = max(0, min(plan.hi, sl.start + sl.count) - max(plan.lo, sl.start + q))
                self._pending.append((f"{exc}; skipped: {lost} sample(s) of rank {self.rank}'s share of the pass "
                                      "are replaced by padding", logging.WARNING, None, sl.url))
                continue
            finally:
                records.close()
            if sl.report and q < sl.count and self._worker == 0:
                log.warning("shard %s gave %d usable samples, its index.json lists %d (stale index or unreadable "
                            "data): the missing rows are padded", sl.url, q, sl.count)

    def _take_pending(self) -> list[Problem]:
        pending, self._pending = self._pending, []
        return pending

    def _pass_batches(self, pass_index: int) -> Iterator[tuple[list[tuple[dict | None, bool]], list[dict], list[Problem]]]:
        """Raw batches of this rank in pass ``pass_index``: ``(rows, pool, problems)``, exactly
        ``pass_batches`` of them. A row is ``(record, is_pad)``; ``pool`` holds the rank's first ``B``
        records of the pass (the padding source; a padding row of None means "no record at all");
        ``problems`` are the skipped records read while the batch was formed (reported by the worker
        that hands the batch out, so once)."""
        plan = plan_rank_pass(self.urls, self.counts, seed=self.seed, pass_index=pass_index, rank=self.rank,
                              world_size=self.world_size)
        rng = np.random.default_rng([self.seed, pass_index, self.rank])
        B = self.batch_size
        pool: list[dict] = []
        rows: list[tuple[dict | None, bool]] = []
        held: list[tuple[dict | None, bool]] | None = None
        made = 0
        for record in _buffer_shuffle(self._rank_records(plan), self.shuffle_buffer, rng):
            if len(pool) < B:
                pool.append(record)
            rows.append((record, False))
            if len(rows) == B:
                # Hold each full batch back until the next one is full, so that the skipped records
                # read after the rank's last usable one are reported with the last real batch.
                if held is not None:
                    yield held, pool, self._take_pending()
                    made += 1
                held, rows = rows, []
        last = [held] if held is not None else []
        fill: list[dict | None] = list(pool) or [None]
        k = 0
        while made + len(last) < self.pass_batches:
            while len(rows) < B:
                rows.append((fill[k % len(fill)], True))
                k += 1
            last.append(rows)
            rows = []
        if rows:
            raise RuntimeError(f"rank {self.rank} got more samples than {self.pass_batches} batches hold in pass "
                               f"{pass_index}: the plan's counts are inconsistent ({plan.lo}..{plan.hi})")
        for batch in last:
            yield batch, pool, self._take_pending()

    def _first_decodable(self, records: Iterator[dict]) -> dict | None:
        return next((s for s in (self._decode(r, count=False)[0] for r in records) if s is not None), None)

    def _substitute(self, pool: list[dict], pass_index: int) -> dict:
        """A decodable sample to repeat in a padding row: the first of the pool, else the first of the
        pass. Raises RuntimeError when the training data has no decodable usable sample at all."""
        if pass_index not in self._substitutes:
            found = self._first_decodable(iter(pool))
            if found is None:  # this rank has no decodable sample in this pass: borrow one
                order = plan_rank_pass(self.urls, self.counts, seed=self.seed, pass_index=pass_index, rank=self.rank,
                                       world_size=self.world_size).order
                found = self._first_decodable(r for r in self._readable_records(order) if self._problem(r) is None)
            if found is None:
                raise RuntimeError(f"training shards have no decodable sample with a label in {list(self.label_set)} "
                                   f"(rank {self.rank}, pass {pass_index}): {self.urls[:3]}"
                                   f"{' ...' if len(self.urls) > 3 else ''}")
            self._substitutes[pass_index] = found
        return self._substitutes[pass_index]

    def _train_rows(self, rows: list[tuple[dict | None, bool]], pool: list[dict], pass_index: int) -> list[dict]:
        out = []
        for record, pad in rows:
            sample = None
            if record is not None:
                # a padding row repeats a record that its own batch reported already
                sample, _ = self._decode(record, count=not pad)
            if sample is None:
                sample, pad = self._substitute(pool, pass_index), True
            out.append(dict(sample, is_pad=pad))
        return out

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        """Batches ``start..num_batches-1`` of epoch ``epoch`` that this worker hands out (every
        ``num_workers``-th from ``start + worker``); earlier batches are formed but not decoded."""
        per_pass, per_epoch = self.pass_batches, self.num_batches
        first, end = self.epoch * per_epoch + self.start, (self.epoch + 1) * per_epoch
        if first + worker >= end:
            return  # no batch of this epoch is this worker's
        last = first + worker + (end - 1 - first - worker) // num_workers * num_workers  # this worker's last
        g = first // per_pass * per_pass  # global index of the batch being formed
        while True:
            pass_index = g // per_pass
            for rows, pool, problems in self._pass_batches(pass_index):
                if g >= first and (g - first) % num_workers == worker:
                    for msg, level, label, shard in problems:
                        self._skip(msg, level, label, shard)
                    yield self._train_rows(rows, pool, pass_index)
                    if g == last:
                        return
                g += 1

    # -- evaluation: each sample once across ranks, in order; short ranks padded with flagged copies --
    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        R, B = self.world_size, self.batch_size
        j = 0  # index among records with a usable label
        i = 0  # index among all records
        batch: list[dict] = []
        filler: dict | None = None
        # Every rank and worker reads all of an evaluation set: one of them reports unreadable data.
        handler = self._tar_handler if self.rank == 0 and worker == 0 else _ignore

        def position(pos: int) -> int | None:
            """This rank's index m of usable sample ``pos`` when this worker hands out its batch, else None."""
            m = pos // R
            return m if pos % R == self.rank and (m // B) % num_workers == worker else None

        for url, expected in zip(self.urls, self.shard_counts):
            first = j
            records = self._read(url, handler)
            try:
                for record in records:
                    i += 1
                    try:
                        meta = json.loads(record.get("json", b"null"))
                        label = try_normalize_label(meta.get("label"), self.label_set)
                    except (ValueError, AttributeError, UnicodeDecodeError):
                        label = None
                    if label is None:
                        # the owner of raw record i reports it (worker 0), so each bad record is counted once
                        if (i - 1) % R == self.rank and worker == 0:
                            self._decode(record)  # raises inside -> logged and counted with the precise reason
                        continue
                    j += 1
                    m = position(j - 1)
                    if m is None:
                        continue
                    sample, error = self._decode(record)
                    if sample is None:
                        # Keep the row: dropping it could leave this rank with fewer (or empty) batches than
                        # the others, and ranks of a sharded model hang when their step counts differ.
                        sample = placeholder_sample(str(record.get("__key__")), label, self.sample_rate, error, meta)
                    else:
                        filler = sample
                    batch.append(sample)
                    if (m + 1) % B == 0:
                        yield batch
                        batch = []
            except SourceReadError as exc:
                if worker == 0:
                    self._skip(f"{exc}; skipped", shard=url)
                if expected is None:
                    if worker == 0:
                        log.warning("%s: no index.json lists its samples, so its unread ones cannot be replaced by "
                                    "placeholders; the ranks may run different numbers of evaluation steps",
                                    remote.display_url(url))
                    continue
                # The shard's unread samples become placeholder rows (is_pad, with the error), so that every
                # rank keeps the positions, and the number of steps, it would have had.
                for pos in range(j, first + expected):
                    m = position(pos)
                    if m is None:
                        continue
                    batch.append(placeholder_sample(f"{remote.display_url(url)}#{pos - first}", self.label_set[0],
                                                    self.sample_rate, str(exc)))
                    if (m + 1) % B == 0:
                        yield batch
                        batch = []
                j = max(j, first + expected)
            finally:
                records.close()
        if batch:
            yield batch
        mine = j // self.world_size + (1 if self.rank < j % self.world_size else 0)
        own_batches = math.ceil(mine / self.batch_size)
        # Every rank must run the same number of eval steps: sharded models gather weights collectively
        # in each forward, so a rank that stopped early would hang the others. Padding rows are flagged
        # ``is_pad`` and never counted in metrics.
        most = math.ceil(math.ceil(j / self.world_size) / self.batch_size) if self.world_size > 1 else own_batches
        for k in range(own_batches, most):
            if k % num_workers == worker:
                filler = filler or self._first_sample() or placeholder_sample(
                    "<padding>", self.label_set[0], self.sample_rate)
                yield [dict(filler, is_pad=True, error=None)]

    def _first_sample(self) -> dict | None:
        for record in self._readable_records(self.urls):
            try:
                return decode_record(record, **self.decode_kw)
            except SampleDecodeError:
                continue
        return None


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """An iterable of batches for one rank: wraps a DataLoader over a _ShardStream, counts skipped samples
    into ``counter[name]`` (those with a label outside the label set also per label, into
    ``dropped_labels``), the samples cropped to ``max_duration`` into ``cropped`` and, for training, tracks
    (epoch, batches handed out) for resuming.

    ``layout``: the training stream's LAYOUT_KEYS values, saved with the position and checked on load."""

    def __init__(self, stream: _ShardStream, *, num_workers: int, counter: Counter, name: str,
                 length: int | None, layout: dict[str, Any] | None = None,
                 dropped_labels: Counter | None = None, cropped: CroppedAudio | None = None,
                 failed_shards: Counter | None = None) -> None:
        self.stream, self.num_workers, self.counter, self.name = stream, num_workers, counter, name
        self.length, self.layout = length, dict(layout or {})
        self.dropped_labels = Counter() if dropped_labels is None else dropped_labels
        self.failed_shards = Counter() if failed_shards is None else failed_shards
        self.cropped = CroppedAudio() if cropped is None else cropped
        self.epoch, self.batches = 0, 0
        self._resume_skip = 0
        self._summarised_labels = False  # label drops are expected: a warning the first time, then info

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"number of batches of {self.name!r} is unknown (no index.json for its shards)")
        return self.length

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, **self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (see the module docstring); ValueError when the layout cannot reproduce it."""
        if self.stream.train:
            if int(state.get("batches", 0)) > 0 and not any(k in state for k in LAYOUT_KEYS):
                log.warning("the saved training stream position %s has no layout (an older checkpoint): assuming "
                            "the same world size, batch size, seed and data", state)
            check_resume_layout(state, self.layout)
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._resume_skip = self.batches

    def __iter__(self) -> Iterator[Batch]:
        self.stream.epoch = self.epoch
        skip, self._resume_skip = self._resume_skip, 0
        train = self.stream.train
        # Training workers skip the first batches themselves (without decoding them); evaluation
        # streams are replayed and the first batches dropped here.
        self.stream.start = skip if train else 0
        handed = skip if train else 0
        dropped = 0 if train else skip
        self.batches = handed
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            persistent_workers=False)
        skipped, summarised = 0, False
        labels: Counter[str] = Counter()  # this iteration's label drops, for its summary
        failed: Counter[str] = Counter()  # this iteration's shards given up on
        for batch, skips in loader:
            for _, label, shard in skips:
                if shard is not None:
                    failed[shard] += 1
                    self.failed_shards[shard] += 1
                    continue
                self.counter[self.name] += 1
                skipped += 1
                if label is not None:
                    labels[label] += 1
                    self.dropped_labels[label] += 1
            if batch is None:
                continue
            if dropped > 0:
                dropped -= 1
                continue
            handed += 1
            self.batches = handed
            self._count_crops(batch)
            batch["waveforms"] = [torch.from_numpy(w) for w in batch["waveforms"]]
            # Lightning stops after len() batches without exhausting this generator: what must happen at
            # the end of the epoch happens when its last batch is handed out.
            if self.length is not None and handed >= self.length and not summarised:
                self._summary(skipped, labels, failed)
                summarised = True
            if train and self.length is not None and handed >= self.length:
                # the epoch advances here, or every epoch would replay the same shuffle
                self.epoch, self.batches = self.epoch + 1, 0
                yield batch
                return
            yield batch
        if train:
            self.epoch, self.batches = self.epoch + 1, 0
        if not summarised:
            self._summary(skipped, labels, failed)

    def _count_crops(self, batch: Batch) -> None:
        limit = self.stream.decode_kw["max_duration"]
        if limit is None:
            return
        # padding rows repeat samples counted already (or stand in for undecodable ones)
        self.cropped.add([float(meta.get("seconds_cropped", 0.0)) for meta, pad in zip(batch["meta"], batch["is_pad"])
                          if not pad], limit)

    def _summary(self, skipped: int, labels: Counter[str], failed: Counter[str]) -> None:
        if failed:
            shown = [remote.display_url(u) for u in sorted(failed)]
            log.warning("%s: %d shard(s) could not be read on rank %d and were skipped (counted in the data "
                        "module's failed_shards[%r]): %s%s", self.name, len(failed), self.stream.rank, self.name,
                        shown[:5], " ..." if len(shown) > 5 else "")
        if not skipped:
            return
        outside = sum(labels.values())
        other = skipped - outside
        parts = []
        if outside:
            parts.append(f"{outside} with a label outside the label set {list(self.stream.label_set)} "
                         f"({dict(labels.most_common())})")
        if other:
            parts.append(f"{other} unreadable or invalid (see the warnings above)")
        level = logging.WARNING if other or not self._summarised_labels else logging.INFO
        self._summarised_labels = True
        log.log(level, "%s: %d sample(s) skipped on rank %d: %s", self.name, skipped, self.stream.rank,
                "; ".join(parts))



class ShardDataModule(L.LightningDataModule):
    """Train / valid / named test sets from WebDataset shard folders (see the module docstring).

    Args:
        train, valid: a split folder (``data/iemocap/train``), a glob or a brace pattern of tars, the same
            as a URL (``s3://bucket/iemocap/train``, ``https://host/train/shard-{000000..000009}.tar``,
            ``pipe:curl -s -f https://host/train/shard-{000000..000009}.tar``), or a ``.txt`` file listing
            such sources one per line (see ``find_shards``).
        test: one source, or ``{name: source}`` for several test sets (cross-corpus evaluation);
            ``test_set_names[dataloader_idx]`` gives each name.
        label_set: a label set name or list; samples whose label (alias-normalised) is outside it are
            skipped and counted (``skipped``, and per label in ``dropped_labels``).
        max_duration: longer audio is cropped to its first ``max_duration`` seconds (None: keep all),
            counted per split in ``cropped`` and warned about.
        eval_batch_size: batch size of valid/test (default: batch_size).
        shuffle_buffer: samples in the training shuffle buffer.
        epoch_length: training batches per rank per epoch (default: one pass, ceil(ceil(U / R) / batch_size)
            for U usable samples and R ranks).
        read_retries: a remote shard (or index.json) that fails with a network error is read again this many
            times at most; then the shard is skipped (logged, counted in ``failed_shards[split]``, its rows
            padded) and the index.json/list is an error naming the URL.
        read_retry_wait: seconds before the first retry, doubled before each next one.
        read_timeout: seconds without data after which an http(s) or ``pipe:`` read fails (one attempt).
        storage_options: passed to fsspec for ``s3://``, ``gs://``... (``{"anon": true}``,
            ``{"endpoint_url": ...}``); credentials belong in the backend's environment variables or
            config files, not here.
    """

    def __init__(
        self,
        train: str | None = None,
        valid: str | None = None,
        test: str | dict[str, str] | None = None,
        label_set: str | list[str] = "iemocap4",
        sample_rate: int = 16000,
        max_duration: float | None = 10.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_length: int | None = None,
        read_retries: int = 3,
        read_retry_wait: float = 1.0,
        read_timeout: float = 30.0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size/eval_batch_size must be >= 1, got {batch_size}/{eval_batch_size}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.train_source, self.valid_source = train, valid
        self.test_sources: dict[str, str] = (
            {} if test is None else {"test": test} if isinstance(test, str) else dict(test))
        self.label_set = get_label_set(label_set)
        self.sample_rate, self.max_duration = sample_rate, max_duration
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.epoch_length = epoch_length
        self.read_options = ReadOptions(retries=read_retries, retry_wait=read_retry_wait, timeout=read_timeout,
                                        storage_options=dict(storage_options or {}))
        self.skipped: Counter[str] = Counter()
        # split -> {shard: times it could not be read and was skipped} (each rank counts its own)
        self.failed_shards: dict[str, Counter[str]] = {}
        # split -> {label: samples skipped because their label is outside label_set}
        self.dropped_labels: dict[str, Counter[str]] = {}
        # split -> running totals of the samples handed out cropped to max_duration
        self.cropped: dict[str, CroppedAudio] = {}
        self._train_loader: ShardLoader | None = None
        self._pending_state: dict | None = None

    @property
    def test_set_names(self) -> list[str]:
        """dataloader_idx -> test set name (the order of ``test``)."""
        return list(self.test_sources)

    def distributed_info(self) -> tuple[int, int]:
        """(rank, world_size): from the attached trainer, else torch.distributed, else (0, 1)."""
        return rank_and_world_size(getattr(self, "trainer", None))

    def _tallies(self, name: str) -> dict[str, Any]:
        """The per-split counters a loader named ``name`` adds to (shared by its loaders over a run)."""
        cropped = self.cropped.setdefault(name, CroppedAudio(
            what="max_duration={limit:g} s of the " + name + " data",
            where=f"counted in the data module's cropped[{name!r}]; each sample's meta has seconds_cropped"))
        return {"dropped_labels": self.dropped_labels.setdefault(name, Counter()), "cropped": cropped,
                "failed_shards": self.failed_shards.setdefault(name, Counter())}

    def _source(self, kind: str, spec: str | None) -> str:
        if spec is None:
            raise ValueError(f"ShardDataModule: no {kind!r} data configured (set {kind}: <split folder or pattern>)")
        return spec

    def build_train_loader(self, rank: int | None = None, world_size: int | None = None) -> ShardLoader:
        """The training loader for one rank (explicit rank/world_size override the trainer's, for tests)."""
        r, ws = self.distributed_info()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        source = find_shards(self._source("train", self.train_source), self.read_options)
        urls = source.urls
        counts = shard_usable_counts(urls, self.label_set, source.shard_labels, self.read_options)
        total = sum(counts)
        if total == 0:
            raise ValueError(f"train source {self.train_source!r} has no sample with a label in "
                             f"{list(self.label_set)} ({len(urls)} shard(s))")
        pass_batches = batches_per_pass(total, world_size, self.batch_size)
        num_batches = self.epoch_length or pass_batches
        stream = _ShardStream(urls, train=True, batch_size=self.batch_size, rank=rank, world_size=world_size,
                              sample_rate=self.sample_rate, max_duration=self.max_duration,
                              label_set=self.label_set, seed=self.seed, num_batches=num_batches,
                              shuffle_buffer=self.shuffle_buffer, counts=counts, pass_batches=pass_batches,
                              read_options=self.read_options)
        layout = {"world_size": world_size, "batch_size": self.batch_size, "seed": self.seed, "samples": total,
                  "epoch_length": self.epoch_length}
        return ShardLoader(stream, num_workers=self.num_workers, counter=self.skipped, name="train",
                           length=num_batches, layout=layout, **self._tallies("train"))

    def build_eval_loader(self, source: str, name: str, rank: int | None = None,
                          world_size: int | None = None) -> ShardLoader:
        """An evaluation loader (each sample once across ranks) over ``source``; skips counted under ``name``."""
        r, ws = self.distributed_info()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        found = find_shards(source, self.read_options)
        usable = count_in_label_set(found.label_counts, found.num_samples, self.label_set)
        shard_counts = [None if _norm(u) not in found.shard_labels else _usable(found.shard_labels[_norm(u)], self.label_set)
                        for u in found.urls]
        # Every rank runs as many batches as the largest share (short ranks are padded, see _eval_batches).
        length = None if usable is None else math.ceil(math.ceil(usable / world_size) / self.eval_batch_size)
        stream = _ShardStream(found.urls, train=False, batch_size=self.eval_batch_size, rank=rank,
                              world_size=world_size, sample_rate=self.sample_rate,
                              max_duration=self.max_duration, label_set=self.label_set,
                              read_options=self.read_options, shard_counts=shard_counts)
        return ShardLoader(stream, num_workers=self.num_workers, counter=self.skipped, name=name, length=length,
                           **self._tallies(name))

    def train_dataloader(self) -> ShardLoader:
        # one loader object for the whole run, so its (epoch, batches) state carries over
        if self._train_loader is None:
            self._train_loader = self.build_train_loader()
            if self._pending_state is not None:
                self._train_loader.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._train_loader

    def val_dataloader(self) -> ShardLoader:
        return self.build_eval_loader(self._source("valid", self.valid_source), "valid")

    def test_dataloader(self) -> list[ShardLoader]:
        if not self.test_sources:
            raise ValueError("ShardDataModule: no 'test' data configured")
        return [self.build_eval_loader(src, f"test/{name}" if len(self.test_sources) > 1 else "test")
                for name, src in self.test_sources.items()]

    def predict_dataloader(self) -> list[ShardLoader]:
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position: ``{"epoch", "batches"}`` (batches handed out in the current
        epoch) and the layout it depends on (see the module docstring)."""
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state or {"epoch": 0, "batches": 0})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream (checked against the current layout when the loader is built)."""
        if not state_dict:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict, epoch=int(state_dict["epoch"]),
                                       batches=int(state_dict["batches"]))
