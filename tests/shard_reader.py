"""Read a split of WebDataset shards with tarfile + soundfile, independently of the project's reader code
(the oracle of the shard-writer and synth-corpus tests)."""

from __future__ import annotations

import io
import json
import tarfile

import soundfile as sf

from emorl_pl.datamodules.shards import split_shards


def read_split(split_dir) -> dict[str, dict]:
    """key -> {"audio" (float32), "sr", "subtype", "meta"} for every sample of the split's shards."""
    out: dict[str, dict] = {}
    for path in split_shards(split_dir):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = out.setdefault(key, {})
                if ext == "flac":
                    entry["audio"], entry["sr"] = sf.read(io.BytesIO(data), dtype="float32")
                    entry["subtype"] = sf.info(io.BytesIO(data)).subtype
                else:
                    entry["meta"] = json.loads(data)
    return out
