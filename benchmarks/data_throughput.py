"""Training-stream throughput (tar reading + FLAC decode + resample + collate) of ShardDataModule: the
same shards from local disk and from HTTP, with 0, 1, 2 DataLoader workers.

    python benchmarks/data_throughput.py [--root data/synth] [--batches 40] [--batch-size 8]
                                         [--sources disk http] [--workers 0 1 2] [--url URL]

Without --root a small synthetic corpus is generated in a temporary folder first. The HTTP source is a
``python -m http.server`` (a separate process on this machine) serving the corpus root, so the ratio is
the cost of the http path (request, socket, the stream reader) over reading files, not of a real
network; --url URL/train measures a real server instead (give the split's URL, with index.json next to
the shards). Every rate is printed against the disk rate with the same number of workers, measured in
the same run. With W workers each worker reads all of the rank's shards (it decodes only its own
batches), so a remote source is downloaded W times per pass.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emorl_pl.datamodules.synth import write_synth_corpus
from emorl_pl.datamodules.webdataset import ShardDataModule


def samples_per_second(train: str, workers: int, batches: int, batch_size: int, sample_rate: int) -> float:
    dm = ShardDataModule(train=train, batch_size=batch_size, num_workers=workers, epoch_length=batches,
                         sample_rate=sample_rate, shuffle_buffer=100)
    loader = dm.build_train_loader(rank=0, world_size=1)  # plans from index.json: not timed
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["keys"])
    return n / (time.perf_counter() - start)


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on a free port of 127.0.0.1 serving ``root``: (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    return proc, f"http://127.0.0.1:{int(line.split(' port ')[1].split()[0])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="corpus root with train/ (default: generate a small synth corpus)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-rate", type=int, default=16000, help="24000 also measures resampling")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", choices=["disk", "http"], default=["disk", "http"])
    parser.add_argument("--url", help="the train split's URL on a real server (default: a local http.server)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per source; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            t = time.perf_counter()
            index = write_synth_corpus(root, num_speakers=12, utterances_per_speaker_per_label=20)
            print(f"generated {sum(ix['num_samples'] for ix in index.values())} utterances "
                  f"in {time.perf_counter() - t:.1f} s")
        server, base = (None, "") if args.url or "http" not in args.sources else serve(root)
        specs = {"disk": str(root / "train"), "http": args.url or f"{base}/train"}
        try:
            rates: dict[tuple[str, int], float] = {}
            for w in args.workers:
                for _ in range(args.repeats):  # alternate the sources so that drift hits both alike
                    for source in args.sources:
                        rate = samples_per_second(specs[source], w, args.batches, args.batch_size,
                                                  args.sample_rate)
                        rates[source, w] = max(rates.get((source, w), 0.0), rate)
        finally:
            if server is not None:
                server.kill()
                server.wait()
    print(f"{'source':>7} {'workers':>8} {'samples/s':>10} {'vs disk':>8}")
    for (source, w), rate in rates.items():
        disk = rates.get(("disk", w))
        print(f"{source:>7} {w:>8} {rate:>10.1f} {f'{rate / disk:.2f}x' if disk else '-':>8}")


if __name__ == "__main__":
    main()
