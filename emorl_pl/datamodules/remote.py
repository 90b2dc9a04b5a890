"""Reading shards and index files from local paths or URLs, with bounded timeouts and retries.

A source is a local path, a ``file://`` URL, an ``http(s)://`` URL (read with the standard library), a
``pipe:COMMAND`` (the command writes the shard to stdout, as in WebDataset) or any other fsspec URL
(``s3://`` needs ``pip install s3fs``, ``gs://`` ``pip install gcsfs``; they take their credentials from
their usual environment variables and config files, and ``storage_options`` go to fsspec unchanged).

Why not WebDataset's ``gopen``: its http(s) handler runs ``curl --retry 30 --connect-timeout 30`` and its
pipes have no read timeout, so a dead server stalls a rank for many minutes (and every other rank at its
next collective). Here every http read and every pipe read has a timeout (``ReadOptions.timeout``), and
a failed shard is retried ``ReadOptions.retries`` times at most.

Retries: only remote sources are retried (a local file that cannot be read will not become readable),
and only after transient errors (connection refused/reset, timeouts, HTTP 408/425/429/5xx, a transfer that
ends early, a pipe command that fails). HTTP 401/403/404, a missing fsspec backend or an unknown protocol
fail at once. A shard that breaks in the middle is read again from its start and the records already
handed out are skipped, so its records come out once each, in order.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import select
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from webdataset.tariterators import group_by_keys

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# WebDataset's tar_file_iterator skips these member names (webdataset 1.0.2, tariterators.py)
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "hf": "huggingface_hub"}


@dataclass(frozen=True)
class ReadOptions:
    """How remote sources are read: ``retries`` after the first attempt (remote sources only), waiting
    ``retry_wait`` seconds before the first retry and twice as long before each next one; ``timeout``
    seconds without data fail an http or pipe attempt; ``storage_options`` go to fsspec (not credentials:
    those come from the backend's environment variables / config files)."""

    retries: int = 3
    retry_wait: float = 1.0
    timeout: float = 30.0
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_wait < 0 or not self.timeout > 0:
            raise ValueError(f"read options must have retries >= 0, retry_wait >= 0 and timeout > 0, got "
                             f"retries={self.retries}, retry_wait={self.retry_wait}, timeout={self.timeout}")


class SourceReadError(OSError):
    """A shard or file that could not be read after ``attempts`` attempts; ``records``: records of the
    shard handed out before it broke; ``cause``: the last error."""

    def __init__(self, url: str, attempts: int, cause: BaseException, records: int = 0) -> None:
        self.url, self.attempts, self.cause, self.records = url, attempts, cause, records
        after = f" after {records} record(s)" if records else ""
        super().__init__(f"cannot read {display_url(url)}{after}: {type(cause).__name__}: {cause} "
                         f"({attempts} attempt(s))")

    def __reduce__(self) -> tuple:  # picklable (DataLoader workers send errors to the main process)
        return (type(self), (self.url, self.attempts, self.cause, self.records))


def is_pipe(spec: str) -> bool:
    return spec.startswith(PIPE_PREFIX)


def scheme(spec: str) -> str:
    """The URL scheme of ``spec``, lower-cased; '' for a local path."""
    scheme = urlsplit(spec).scheme if "://" in spec else ""
    return "" if len(scheme) == 1 else scheme.lower()  # "C://..." is a Windows drive, not a scheme


def is_remote(spec: str) -> bool:
    """A ``pipe:`` command or a URL other than ``file://`` (a local path is not remote)."""
    return is_pipe(spec) or scheme(spec) not in ("", "file")


def local_path(spec: str) -> str | None:
    """The file system path of a local path or ``file://`` URL, else None."""
    if is_pipe(spec):
        return None
    protocol = scheme(spec)
    if protocol == "":
        return spec
    if protocol == "file":
        return urllib.request.url2pathname(urlsplit(spec).path)
    return None


def display_url(url: str) -> str:
    """``url`` for messages and logs: user:password and the query string (signed URLs carry credentials
    there) are left out."""
    if is_pipe(url) or scheme(url) in ("", "file"):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "<query hidden>" if parts.query else "", ""))


def looks_like_shard(spec: str) -> bool:
    """A URL naming one tar file (``.tar``, ``.tar.gz``, ``.tgz``), as opposed to a split folder."""
    path = urlsplit(spec).path if scheme(spec) else spec
    return path.lower().endswith(SHARD_SUFFIXES)


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URL prefix (``s3://b/train`` + ``shard-000000.tar``)."""
    if scheme(folder) in ("", "file"):
        return os.path.join(folder, name)
    return folder.rstrip("/") + "/" + name


def parent(url: str) -> str | None:
    """The folder of a shard (where its split's index.json would be), or None when there is none to look
    in: a ``pipe:`` command, or a URL with a query string (a signed URL signs that one object only)."""
    if is_pipe(url):
        return None
    if scheme(url) == "":
        return os.path.dirname(url) or "."
    if urlsplit(url).query:
        return None
    head, _, path = url.partition("://")
    folder = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else None
    return None if not folder else f"{head}://{folder}"


class _PipeReader(io.RawIOBase):
    """stdout of a shell command, each read bounded by ``timeout`` seconds; a non-zero exit status is an
    OSError with the end of the command's stderr."""

    def __init__(self, command: str, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                     start_new_session=True)  # its own process group: killed with its children
        self._fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read()[-500:].decode("utf-8", "replace").strip()
        return f": {text}" if text else ""

    def readinto(self, buf: Any) -> int:
        ready, _, _ = select.select([self._fd], [], [], self.timeout)
        if not ready:
            self._kill()
            raise TimeoutError(f"{self.url}: the command sent no data for {self.timeout:g} s")
        data = os.read(self._fd, len(buf))
        if not data:
            try:
                status = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise TimeoutError(f"{self.url}: the command closed its output but did not exit within "
                                   f"{self.timeout:g} s") from None
            if status != 0:
                raise OSError(f"{self.url}: the command exited with status {status}{self._stderr_tail()}")
            return 0
        buf[: len(data)] = data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.proc.stdout.close()
            self._stderr.close()
        super().close()


class _HTTPBody(io.RawIOBase):
    """An http response body that raises IncompleteRead when the connection ends before Content-Length:
    ``HTTPResponse.read(n)`` returns short instead, and a tar cut at a member boundary would look complete."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self.response.readinto(buf)
        if n == 0 and len(buf) and self.response.length:
            raise http.client.IncompleteRead(b"", self.response.length)
        return n

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()


def _http_error(url: str, exc: urllib.error.HTTPError) -> OSError:
    what = f"{display_url(url)}: HTTP {exc.code} {exc.reason}"
    exc.close()
    if exc.code in (404, 410):
        return FileNotFoundError(what)
    if exc.code in (401, 403):
        return PermissionError(f"{what} (credentials: see the README, 'Shards from object storage')")
    if exc.code in (408, 425, 429) or exc.code >= 500:
        return ConnectionError(what)
    return _PermanentError(what)


class _PermanentError(OSError):
    """An error that another attempt will not fix (an HTTP 4xx other than 408/425/429)."""


def open_source(url: str, options: ReadOptions) -> BinaryIO:
    """One attempt at opening ``url`` for reading (see the module docstring for what a source can be)."""
    if is_pipe(url):
        return io.BufferedReader(_PipeReader(url[len(PIPE_PREFIX):], url, options.timeout), 1 << 16)
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    protocol = scheme(url)
    if protocol in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "emorl_pl"})
        try:
            return io.BufferedReader(_HTTPBody(urllib.request.urlopen(request, timeout=options.timeout)), 1 << 16)
        except urllib.error.HTTPError as exc:
            raise _http_error(url, exc) from None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **options.storage_options)
    except ImportError as exc:
        package = _BACKENDS.get(protocol, f"the fsspec backend of {protocol}://")
        raise ImportError(f"{display_url(url)}: {exc}. Install it with `pip install {package}` (credentials: "
                          "its usual environment variables or config files, see the README)") from exc
    except ValueError as exc:
        raise ValueError(f"{display_url(url)}: {exc} (expected a local path, http(s)://, pipe:COMMAND or an "
                         "fsspec URL such as s3://, gs://)") from exc
    return fs.open(path, "rb")


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed (see the module docstring)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        _PermanentError)):
        return False
    return isinstance(exc, (OSError, http.client.HTTPException, tarfile.TarError, EOFError))


def _wait(url: str, attempt: int, attempts: int, exc: BaseException, options: ReadOptions) -> None:
    wait = options.retry_wait * 2 ** (attempt - 1)
    log.warning("reading %s failed (%s: %s); attempt %d of %d, retrying in %.3g s", display_url(url),
                type(exc).__name__, exc, attempt, attempts, wait)
    time.sleep(wait)


def read_bytes(url: str, options: ReadOptions) -> bytes:
    """The whole content of ``url`` (an index.json, a list of shards), retried like a shard. A source
    that does not exist raises FileNotFoundError naming it, one refused PermissionError; other failures
    SourceReadError."""
    attempts = 1 + (options.retries if is_remote(url) else 0)
    for attempt in range(1, attempts + 1):
        try:
            with open_source(url, options) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{display_url(url)} does not exist ({exc})") from exc
        except PermissionError as exc:
            raise PermissionError(f"{display_url(url)}: access refused ({exc})") from exc
        except (ImportError, ValueError):
            raise  # a missing fsspec backend or an unknown protocol: the message says what to install
        except Exception as exc:  # noqa: BLE001 - classified below: retried or reported with the URL
            if not is_transient(exc) or attempt == attempts:
                raise SourceReadError(url, attempt, exc) from exc
            _wait(url, attempt, attempts, exc, options)
    raise AssertionError("unreachable")


def _tar_members(stream: BinaryIO, url: str) -> Iterator[dict]:
    # webdataset 1.0.2 tariterators.tar_file_iterator, without its per-member exception handler: a read
    # error must end the attempt (and be retried), not be passed over as bad data.
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        name = info.name
        if not info.isreg() or name is None:
            continue
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        if _META_MEMBER.match(name):
            continue
        data = tar.extractfile(info).read()
        tar.members = []  # stream mode: do not keep every header of the shard
        yield {"fname": name, "data": data, "__url__": url}


def _reraise(exc: Exception) -> bool:
    raise exc


def shard_records(url: str, options: ReadOptions,
                  handler: Callable[[Exception], bool] = _reraise) -> Iterator[dict]:
    """The records ``{"__key__", "__url__", ext: bytes...}`` of one tar shard, grouped like WebDataset's
    ``tarfile_samples`` (``handler`` gets bad-data errors such as a duplicate member, as there).

    A remote shard that fails is read again, up to ``options.retries`` times, from its start, skipping
    the records already yielded. When it cannot be read (or a local one fails once), SourceReadError."""
    attempts = 1 + (options.retries if is_remote(url) else 0)
    done = 0  # records handed out so far
    for attempt in range(1, attempts + 1):
        error: BaseException | None = None
        try:
            stream = open_source(url, options)
        except (ImportError, ValueError):
            raise  # a missing fsspec backend or an unknown protocol: a setup error, not a bad shard
        except Exception as exc:  # noqa: BLE001 - classified below
            error = exc
        else:
            with closing(stream):
                records = group_by_keys(_tar_members(stream, url), handler=handler)
                seen = 0
                while True:
                    try:
                        record = next(records)
                    except StopIteration:
                        return
                    except Exception as exc:  # noqa: BLE001 - classified below
                        error = exc
                        break
                    seen += 1
                    if seen > done:
                        done = seen
                        yield record
        if not is_transient(error) or attempt == attempts:
            raise SourceReadError(url, attempt, error, done) from error
        _wait(url, attempt, attempts, error, options)
