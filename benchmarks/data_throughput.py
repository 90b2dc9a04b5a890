"""Training-stream throughput (FLAC decode + resample + collate) of ShardDataModule with 0, 1, 2 workers.

    python benchmarks/data_throughput.py [--root data/synth] [--batches 40] [--batch-size 8]

Without --root a small synthetic corpus is generated in a temporary folder first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from emorl_pl.datamodules.synth import write_synth_corpus
from emorl_pl.datamodules.webdataset import ShardDataModule


def samples_per_second(train: str, workers: int, batches: int, batch_size: int, sample_rate: int) -> float:
    dm = ShardDataModule(train=train, batch_size=batch_size, num_workers=workers, epoch_length=batches,
                         sample_rate=sample_rate, shuffle_buffer=100)
    start, n = time.perf_counter(), 0
    for batch in dm.build_train_loader(rank=0, world_size=1):
        n += len(batch["keys"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="corpus root with train/ (default: generate a small synth corpus)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-rate", type=int, default=16000, help="24000 also measures resampling")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            t = time.perf_counter()
            index = write_synth_corpus(root, num_speakers=12, utterances_per_speaker_per_label=20)
            print(f"generated {sum(ix['num_samples'] for ix in index.values())} utterances "
                  f"in {time.perf_counter() - t:.1f} s")
        rates = {w: samples_per_second(str(root / "train"), w, args.batches, args.batch_size, args.sample_rate)
                 for w in args.workers}
    base = rates.get(0) or next(iter(rates.values()))
    print(f"{'workers':>8} {'samples/s':>10} {'vs first':>9}")
    for w, r in rates.items():
        print(f"{w:>8} {r:>10.1f} {r / base:>8.2f}x")


if __name__ == "__main__":
    main()
