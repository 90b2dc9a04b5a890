"""Which run ``emorl fit --ckpt_path last`` resumes, and where its logs and checkpoints go.

Lightning alone looks for ``last.ckpt`` in the *new* run's folder: the logger opens ``version_N+1``, finds
nothing there, warns "No checkpoint will be loaded" and trains from step 0 with exit code 0. The rule here:

- ``--ckpt_path last`` resumes the newest run of the config's logger folder (``<save_dir>/<name>``, newest
  ``version_N``; or the version the config pins) from its ``checkpoints/last.ckpt``, and logging goes on in
  that run's folder. When the checkpoint callback has its own ``dirpath``, ``last.ckpt`` is taken from
  there (and logging goes on in the newest run, if there is one).
- ``--ckpt_path PATH`` inside ``<save_dir>/<name>/<version>/checkpoints/`` logs into that version too.
- No checkpoint where one was asked for stops the run, saying where it looked; it never starts over.

Pure path logic, no Lightning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")
VERSION_DIR = re.compile(r"^version_(\d+)$")


class ResumeError(FileNotFoundError):
    """A resume that cannot find what it was asked to resume."""


@dataclass(frozen=True)
class ResumeTarget:
    """The checkpoint to load and, when the run has a versioned log folder, the version to log into."""

    ckpt_path: Path
    version: int | str | None  # the logger's ``version`` argument (int for ``version_N`` folders)


def _version_key(path: Path) -> tuple[int, float]:
    m = VERSION_DIR.match(path.name)
    return (int(m.group(1)) if m else -1, path.stat().st_mtime)


def _version_arg(folder: Path) -> int | str:
    m = VERSION_DIR.match(folder.name)
    return int(m.group(1)) if m else folder.name


def find_last(ckpt_dir: Path) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``; a file or a sharded folder) in ``ckpt_dir``."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.iterdir() if LAST_NAME.match(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_folders(log_root: Path) -> list[Path]:
    """The run folders under ``<save_dir>/<name>``, oldest first (``version_N`` by N, then others by time)."""
    if not log_root.is_dir():
        return []
    return sorted((p for p in log_root.iterdir() if p.is_dir()), key=_version_key)


def resolve_last(log_root: Path | None, version: int | str | None, ckpt_dirpath: Path | None,
                 default_ckpt_dir: Path) -> ResumeTarget:
    """The ``last.ckpt`` that ``--ckpt_path last`` means; raise ``ResumeError`` saying where it looked.

    ``log_root``: ``<save_dir>/<name>`` of a versioned logger (None: no such logger); ``version``: the
    config's pinned logger version, if any; ``ckpt_dirpath``: the checkpoint callback's ``dirpath`` if set;
    ``default_ckpt_dir``: where checkpoints go with no logger (``<default_root_dir>/checkpoints``).
    """
    if log_root is None or ckpt_dirpath is not None:
        # The checkpoints have a folder of their own: last.ckpt is there; logs go on in the newest run, if any.
        where = ckpt_dirpath or default_ckpt_dir
        last = find_last(where)
        if last is None:
            raise ResumeError(f"--ckpt_path last: no last.ckpt in {where}. Give --ckpt_path PATH, or run without "
                              "--ckpt_path to start a new run.")
        runs = run_folders(log_root) if log_root is not None and version is None else []
        return ResumeTarget(last, _version_arg(runs[-1]) if runs else None)
    if version is not None:
        run = log_root / (f"version_{version}" if isinstance(version, int) else str(version))
        if not run.is_dir():
            raise ResumeError(f"--ckpt_path last: the config's logger version {version!r} has no folder {run}")
    else:
        runs = run_folders(log_root)
        if not runs:
            raise ResumeError(f"--ckpt_path last: no run in {log_root} (the config's logger save_dir/name) to "
                              "resume. Check the config and the working folder, or run without --ckpt_path to "
                              "start a new run.")
        run = runs[-1]
    where = run / "checkpoints"
    last = find_last(where)
    if last is None:
        others = [r.name for r in run_folders(log_root) if r != run and find_last(r / "checkpoints")]
        hint = (f" Runs of {log_root} with a last.ckpt: {', '.join(others)}; pick one with "
                "--trainer.logger.init_args.version NAME." if others else "")
        raise ResumeError(f"--ckpt_path last: no last.ckpt in {where} (the newest run of {log_root} is {run.name})."
                          f"{hint} Give --ckpt_path PATH, or run without --ckpt_path to start a new run.")
    return ResumeTarget(last, _version_arg(run))


def version_of(ckpt_path: Path, log_root: Path | None) -> int | str | None:
    """The log version a checkpoint under ``<log_root>/<version>/checkpoints/`` belongs to (None otherwise)."""
    if log_root is None:
        return None
    try:
        rel = ckpt_path.resolve().relative_to(log_root.resolve())
    except ValueError:
        return None
    if len(rel.parts) >= 3 and rel.parts[1] == "checkpoints":
        return _version_arg(log_root / rel.parts[0])
    return None


def next_config_name(run_dir: Path, base: str = "config.yaml") -> str:
    """``config.yaml`` if free, else ``config.resume-K.yaml`` with the first free K: a resumed run records its
    config next to the first one's and overwrites none."""
    if not (run_dir / base).exists():
        return base
    stem, suffix = base.rsplit(".", 1)
    k = 1
    while (run_dir / f"{stem}.resume-{k}.{suffix}").exists():
        k += 1
    return f"{stem}.resume-{k}.{suffix}"
