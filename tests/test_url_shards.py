"""Shards from URLs (issue 19 item 4): http(s) via a local ``python -m http.server``, ``pipe:`` commands and
fsspec (``memory://``) read exactly like the same shards on disk; flaky servers are retried a bounded
number of times, then the shard is skipped, counted and logged while every rank keeps its number of
steps; an unreachable URL fails quickly with an error naming it."""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from emorl_pl.datamodules import remote
from emorl_pl.datamodules.remote import ReadOptions, SourceReadError
from emorl_pl.datamodules.shards import AudioSample, SplitWriter
from emorl_pl.datamodules.webdataset import ShardDataModule, find_shards

LABELS = ["neutral", "happy", "angry", "sad"]
N = 23  # 5 shards of 5, 5, 5, 5, 3 samples
FAST = {"read_retry_wait": 0.01, "read_timeout": 5.0}  # tests wait little between attempts


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib honours http_proxy; the test servers are on this machine
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    with SplitWriter(root, "train", max_count=5) as w:
        for i in range(N):
            audio = (0.01 * (i % 50) + 0.001 * np.sin(np.arange(800 + 37 * i))).astype(np.float32)
            w.write(AudioSample(f"k{i:03d}", audio, 16000, {"label": LABELS[i % 4], "corpus_label": LABELS[i % 4],
                                                            "corpus": "toy", "speaker": f"s{i % 3}"}))
    return root


def _tar_keys(path: Path) -> list[str]:
    """The sample keys of one shard, read with tarfile (the oracle, independent of the reader under test)."""
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


@pytest.fixture(scope="module")
def server(root):
    """``python -m http.server`` on a free port, serving ``root``; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


class _Flaky(SimpleHTTPRequestHandler):
    """Serves files, except that ``plan[path]`` lists what the next requests of ``path`` get: ``"503"``,
    ``"drop"`` (headers with the full length, half the body, connection closed) or ``"stall"``."""

    plan: dict[str, list[str]] = {}
    requests: Counter = Counter()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's name
        with self.lock:
            self.requests[self.path] += 1
            todo = self.plan.get(self.path)
            action = todo.pop(0) if todo else "ok"
        if action == "503":
            self.send_error(503, "try later")
        elif action == "stall":
            time.sleep(3)
            self.send_error(503, "too late")
        elif action == "drop":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that stopped reading (timed out, or had all it needed) is expected here


@pytest.fixture
def flaky(root):
    """An in-process server whose failures a test plans (``_Flaky.plan``); yields (base URL, handler)."""
    _Flaky.plan, _Flaky.requests = {}, Counter()
    httpd = _QuietServer(("127.0.0.1", 0), functools.partial(_Flaky, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Flaky
    finally:
        httpd.shutdown()
        httpd.server_close()


def _batches(dm: ShardDataModule, rank: int, world_size: int, train: bool = True) -> list[dict]:
    if train:
        return list(dm.build_train_loader(rank=rank, world_size=world_size))
    return list(dm.build_eval_loader(dm.valid_source, "valid", rank=rank, world_size=world_size))


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for field in g:
            if field == "waveforms":
                assert len(g[field]) == len(w[field])
                assert all(torch.equal(a, b) for a, b in zip(g[field], w[field]))
            else:
                assert g[field] == w[field], field


def _real_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, pad in zip(b["keys"], b["is_pad"]) if not pad]


def _sources(root: Path, base: str, tmp_path: Path) -> dict[str, str]:
    listing = tmp_path / "shards.txt"
    names = sorted(p.name for p in (root / "train").glob("shard-*.tar"))
    # a list in another order than the folder's, with a comment and a blank line
    listing.write_text("# the training shards\n\n" + "\n".join(f"{base}/train/{n}" for n in reversed(names)) + "\n")
    return {"folder": f"{base}/train", "braces": f"{base}/train/shard-{{000000..000004}}.tar", "list": str(listing)}


@pytest.mark.parametrize("workers", [0, 2])
def test_http_shards_give_the_batches_of_the_same_shards_on_disk(root, server, tmp_path, workers):
    disk = {r: _batches(ShardDataModule(train=str(root / "train"), valid=str(root / "train"), batch_size=3,
                                        shuffle_buffer=4, seed=7, num_workers=workers), r, 2) for r in range(2)}
    # the disk stream is a partition of the pass (tests/test_datamodule.py), so the URL one is too
    assert Counter(_real_keys(disk[0]) + _real_keys(disk[1])) == Counter(f"k{i:03d}" for i in range(N))
    for name, spec in _sources(root, server, tmp_path).items():
        dm = ShardDataModule(train=spec, valid=spec, batch_size=3, shuffle_buffer=4, seed=7, num_workers=workers,
                             **FAST)
        source = find_shards(spec)
        assert len(source.urls) == 5 and all(u.startswith(server) for u in source.urls), name
        # the counts come from the index.json served next to the shards: nothing is downloaded to plan
        assert source.num_samples == N and len(source.shard_labels) == 5
        for rank in range(2):
            if name == "list":
                # the list's own order is another shard order: another (equally valid) partition
                got = _batches(dm, rank, 2)
                assert len(got) == len(disk[rank])
                continue
            _assert_same_batches(_batches(dm, rank, 2), disk[rank])
        if name == "list":
            keys = [_real_keys(_batches(dm, r, 2)) for r in range(2)]
            assert Counter(keys[0] + keys[1]) == Counter(f"k{i:03d}" for i in range(N))
        assert dm.failed_shards["train"] == Counter() and dm.skipped["train"] == 0
    # evaluation: every sample once across ranks, in the same batches as from disk
    for rank in range(2):
        dm = ShardDataModule(valid=f"{server}/train", batch_size=3, num_workers=workers, **FAST)
        ref = ShardDataModule(valid=str(root / "train"), batch_size=3, num_workers=workers)
        _assert_same_batches(_batches(dm, rank, 2, train=False), _batches(ref, rank, 2, train=False))


class _WaveformRegression(L.LightningModule):
    """A loss that depends on every waveform value and label of the batch (and records it per step)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        feats = torch.stack([torch.stack([x.mean(), x.std(), x.abs().max(), torch.tensor(len(x) / 1e4)])
                             for x in batch["waveforms"]])
        target = torch.tensor([float(LABELS.index(lab)) for lab in batch["labels"]])
        loss = ((feats @ self.w - target) ** 2).mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_fit_on_http_shards_has_the_losses_of_a_fit_on_disk(root, server, tmp_path):
    def fit(spec: str) -> tuple[list[float], torch.Tensor]:
        L.seed_everything(0)
        dm = ShardDataModule(train=spec, batch_size=4, shuffle_buffer=8, seed=1, **FAST)
        trainer = L.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        model = _WaveformRegression()
        trainer.fit(model, datamodule=dm)  # 6 batches per epoch: the run crosses into a second pass
        return model.losses, model.w.detach().clone()

    disk_losses, disk_w = fit(str(root / "train"))
    http_losses, http_w = fit(f"{server}/train")
    assert len(disk_losses) == 9 and http_losses == disk_losses and torch.equal(http_w, disk_w)
    assert len(set(disk_losses)) > 1


def test_transient_http_errors_are_retried_and_change_nothing(root, flaky, caplog):
    base, handler = flaky
    handler.plan = {"/train/shard-000002.tar": ["503", "503"], "/train/shard-000001.tar": ["drop"],
                    "/train/index.json": ["503"]}
    want = [_batches(ShardDataModule(train=str(root / "train"), batch_size=3, shuffle_buffer=4), r, 2)
            for r in range(2)]
    dm = ShardDataModule(train=f"{base}/train", batch_size=3, shuffle_buffer=4, read_retries=2, **FAST)
    with caplog.at_level(logging.WARNING):
        got = [_batches(dm, r, 2) for r in range(2)]
    for g, w in zip(got, want):
        _assert_same_batches(g, w)  # the dropped transfer resumed without repeating or losing a record
    assert dm.failed_shards["train"] == Counter()
    assert "retrying" in caplog.text and "HTTP 503" in caplog.text and "IncompleteRead" in caplog.text
    assert handler.requests["/train/index.json"] == 3  # one 503, then the index (once per rank's loader)


def test_a_shard_that_keeps_failing_is_skipped_counted_and_logged_and_ranks_stay_in_step(root, flaky, caplog):
    base, handler = flaky
    dead = "shard-000002.tar"
    dead_keys = set(_tar_keys(root / "train" / dead))
    handler.plan = {f"/train/{dead}": ["503"] * 1000}
    kw = dict(batch_size=3, shuffle_buffer=4, seed=2)
    all_lost = []
    for rank in range(2):
        want = _batches(ShardDataModule(train=str(root / "train"), **kw), rank, 2)
        dm = ShardDataModule(train=f"{base}/train", read_retries=1, **kw, **FAST)
        before = handler.requests[f"/train/{dead}"]
        with caplog.at_level(logging.WARNING):
            got = _batches(dm, rank, 2)
        # the same number of full batches (every rank runs the same steps), the rank's other samples all
        # there, the dead shard's rows replaced by flagged padding
        assert len(got) == len(want) and all(len(b["keys"]) == 3 for b in got)
        lost = [k for k in _real_keys(want) if k in dead_keys]
        all_lost += lost
        assert Counter(_real_keys(got)) == Counter(k for k in _real_keys(want) if k not in dead_keys)
        if lost:
            assert dm.failed_shards["train"] == Counter({f"{base}/train/{dead}": 1})
            assert handler.requests[f"/train/{dead}"] - before == 2  # 1 + read_retries attempts, no more
            assert f"{base}/train/{dead}" in caplog.text and "HTTP 503" in caplog.text
            assert f"{len(lost)} sample(s) of rank {rank}'s share of the pass are replaced by padding" in caplog.text
            assert f"train: 1 shard(s) could not be read on rank {rank} and were skipped" in caplog.text
        assert dm.skipped["train"] == 0  # samples that were read and rejected: none
    assert sorted(all_lost) == sorted(dead_keys)  # the ranks' shares held the dead shard's samples once each
    # evaluation: the dead shard's samples become placeholder rows, so every rank keeps its steps
    for rank in range(2):
        want = _batches(ShardDataModule(valid=str(root / "train"), batch_size=3), rank, 2, train=False)
        dm = ShardDataModule(valid=f"{base}/train", batch_size=3, read_retries=0, **FAST)
        got = _batches(dm, rank, 2, train=False)
        assert [len(b["keys"]) for b in got] == [len(b["keys"]) for b in want]
        assert _real_keys(got) == [k for k in _real_keys(want) if k not in dead_keys]
        holes = [e for b in got for e in b["errors"]]
        assert len(holes) == len([k for k in _real_keys(want) if k in dead_keys])
        assert all(dead in e["key"] and "HTTP 503" in e["error"] for e in holes)
        assert dm.failed_shards["valid"] == Counter({f"{base}/train/{dead}": 1})


def test_an_unreachable_url_fails_at_once_with_its_name(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus/train"
    dm = ShardDataModule(train=url, read_retries=2, read_retry_wait=0.01)
    with pytest.raises(SourceReadError, match=rf"cannot read {url}/index.json: .*Connection refused.*3 attempt"):
        dm.build_train_loader()
    # a pattern's index.json is looked for next to its shards: the same error
    with pytest.raises(SourceReadError, match=rf"cannot read {url}/index.json: .*1 attempt"):
        ShardDataModule(train=f"{url}/shard-{{000000..000001}}.tar", read_retries=0).build_train_loader()
    # a signed URL has no index.json to look for: its samples are counted by reading it, which fails naming it
    with pytest.raises(SourceReadError, match=rf"cannot read {url}/shard-000000.tar\?<query hidden>: "):
        ShardDataModule(train=f"{url}/shard-000000.tar?sig=s3cr3t", read_retries=0).build_train_loader()
    # 404 is not retried
    with pytest.raises(FileNotFoundError, match="nothing"):
        remote.read_bytes(f"file://{tmp_path}/nothing.json", ReadOptions())


def test_a_server_that_never_answers_times_out(flaky):
    base, handler = flaky
    handler.plan = {"/train/index.json": ["stall", "stall"]}
    dm = ShardDataModule(train=f"{base}/train", read_retries=1, read_retry_wait=0.01, read_timeout=0.3)
    errors: list[BaseException] = []

    def build():
        try:
            dm.build_train_loader()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(60)  # far above 2 attempts x 0.3 s: only an unbounded wait gets here
    assert not thread.is_alive(), "reading a stalled server did not time out"
    assert len(errors) == 1 and isinstance(errors[0], SourceReadError)
    assert f"{base}/train/index.json" in str(errors[0]) and "timed out" in str(errors[0])


def test_pipe_commands_read_like_files_and_fail_clearly(root, tmp_path, caplog, monkeypatch):
    # the shell's ${VAR} reaches the shell (how a token stays out of the config); the braces are expanded
    monkeypatch.setenv("EMORL_TEST_SHARDS", str(root / "train"))
    spec = "pipe:cat ${EMORL_TEST_SHARDS}/shard-{000000..000004}.tar"
    kw = dict(batch_size=4, shuffle_buffer=4, seed=3)
    want = [_batches(ShardDataModule(train=str(root / "train"), **kw), r, 2) for r in range(2)]
    dm = ShardDataModule(train=spec, **kw, **FAST)
    with caplog.at_level(logging.WARNING):
        got = [_batches(dm, r, 2) for r in range(2)]
    # pipe: commands have no index.json: their samples are counted by reading them once (a warning says so)
    assert "reading them once to count their samples" in caplog.text
    for g, w in zip(got, want):
        _assert_same_batches(g, w)
    with pytest.raises(SourceReadError, match=r"pipe:exit 3.*exited with status 3.*2 attempt"):
        list(remote.shard_records("pipe:exit 3", ReadOptions(retries=1, retry_wait=0.01)))
    with pytest.raises(SourceReadError, match=r"sent no data for 0.2 s"):
        list(remote.shard_records("pipe:sleep 30", ReadOptions(retries=0, timeout=0.2)))


def test_fsspec_urls_read_like_files(root):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    for path in sorted((root / "train").iterdir()):
        mem.pipe(f"/corpus/train/{path.name}", path.read_bytes())
    kw = dict(batch_size=3, shuffle_buffer=4, seed=5)
    for spec in ("memory://corpus/train", "memory://corpus/train/shard-*.tar"):
        dm = ShardDataModule(train=spec, valid=spec, **kw)
        assert find_shards(spec).num_samples == N  # the glob matched the whole split: index.json counts
        for rank in range(2):
            _assert_same_batches(_batches(dm, rank, 2),
                                 _batches(ShardDataModule(train=str(root / "train"), **kw), rank, 2))
    mem.rm("/corpus", recursive=True)


def test_object_store_without_its_backend_says_what_to_install():
    pytest.importorskip("fsspec")
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(ImportError, match=r"s3://bucket/train/index.json.*pip install s3fs"):
        ShardDataModule(train="s3://bucket/train").build_train_loader()
    with pytest.raises(ValueError, match="nosuch://x/train/index.json.*expected a local path"):
        ShardDataModule(train="nosuch://x/train").build_train_loader()


def test_shard_lists_and_their_errors(root, tmp_path):
    local = tmp_path / "lists"
    local.mkdir()
    shutil.copytree(root / "train", local / "train")
    (local / "a.txt").write_text("train/shard-00000{0..2}.tar\n# more\ntrain/shard-000003.tar\n\n"
                                 f"{local}/train/shard-000004.tar\n")
    source = find_shards(str(local / "a.txt"))  # relative lines are relative to the list's folder
    assert [Path(u).name for u in source.urls] == [f"shard-{i:06d}.tar" for i in range(5)]
    # the whole split, named by several lines: its index.json counts (read once) apply
    assert len(source.shard_labels) == 5 and source.num_samples == N
    (local / "part.txt").write_text("train/shard-000001.tar\ntrain\n")  # a folder and one of its shards
    with pytest.raises(ValueError, match=r"more than once.*shard-000001.tar"):
        find_shards(str(local / "part.txt"))
    (local / "part.txt").write_text("train/shard-000001.tar\n")
    assert find_shards(str(local / "part.txt")).num_samples is None  # a subset: the index cannot tell
    dm = ShardDataModule(train=str(local / "a.txt"), batch_size=5)
    assert Counter(_real_keys(list(dm.build_train_loader()))) == Counter(f"k{i:03d}" for i in range(N))
    (local / "twice.txt").write_text("train/shard-000000.tar\ntrain/shard-00000{0..1}.tar\n")
    with pytest.raises(ValueError, match=r"twice.txt.*more than once.*shard-000000.tar"):
        find_shards(str(local / "twice.txt"))
    (local / "nested.txt").write_text("a.txt\n")
    with pytest.raises(ValueError, match="cannot be nested"):
        find_shards(str(local / "nested.txt"))
    (local / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no shard"):
        find_shards(str(local / "empty.txt"))
    (local / "missing.txt").write_text("train/shard-000009.tar\n")
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        find_shards(str(local / "missing.txt"))


def test_urls_in_messages_hide_credentials():
    assert remote.display_url("https://user:secret@host/a/s.tar?X-Amz-Signature=abc") == \
        "https://host/a/s.tar?<query hidden>"
    assert remote.display_url("/data/s.tar") == "/data/s.tar"
    err = SourceReadError("https://h/s.tar?sig=abc", 2, ConnectionError("reset"), 4)
    assert "sig=abc" not in str(err) and "after 4 record(s)" in str(err)
    assert remote.parent("https://h/a/s.tar?sig=1") is None  # a signed URL has no index.json to look for
    assert remote.parent("s3://b/a/s.tar") == "s3://b/a" and remote.join("s3://b/a/", "index.json") == \
        "s3://b/a/index.json"
    with pytest.raises(ValueError, match="retries >= 0"):
        ReadOptions(retries=-1)


def test_a_truncated_local_shard_is_skipped_once_without_retries(root, tmp_path, caplog):
    shutil.copytree(root / "train", tmp_path / "train")
    bad = tmp_path / "train" / "shard-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # cut inside a member: a local file does not heal, no retry
    dm = ShardDataModule(train=str(tmp_path / "train"), batch_size=4, shuffle_buffer=0, read_retries=5,
                         read_retry_wait=0.01)  # retries apply to remote sources only (none logged below)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.build_train_loader(rank=0, world_size=1))
    assert len(batches) == -(-N // 4) and all(len(b["keys"]) == 4 for b in batches)
    assert dm.failed_shards["train"] == Counter({str(bad): 1}) and "retrying" not in caplog.text
    read_before_the_cut = set(_real_keys(batches)) & set(_tar_keys(root / "train" / "shard-000001.tar"))
    others = {f"k{i:03d}" for i in range(N)} - set(_tar_keys(root / "train" / "shard-000001.tar"))
    assert others <= set(_real_keys(batches)) and len(read_before_the_cut) < 5
