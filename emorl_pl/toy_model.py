"""``emorl-toy-model``: build a family's toy model (random thin layers, a 1024-token BPE trained in-process, a
2 s audio window) in a folder, offline, for the quickstart, the benchmarks and tests.

    emorl-toy-model runs/tiny-qwen2-audio                      # the quickstart's model
    emorl-toy-model runs/tiny-qwen3-omni --family qwen3_omni

An existing model in the folder is kept (``--overwrite`` rebuilds it); a non-empty folder that holds no model is
refused. Prints the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from emorl_pl.modules import tiny, tiny_audioflamingo3

# family -> the toy builder; each builds in a folder that holds no model and returns an existing one unchanged
TOY_BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_audio": tiny.build_tiny_qwen2_audio,
    "audioflamingo3": tiny_audioflamingo3.build_tiny_audioflamingo3,
    "qwen2_5_omni": tiny.build_tiny_qwen2_5_omni,
    "qwen3_omni": tiny.build_tiny_qwen3_omni,
}
FAMILIES = tuple(TOY_BUILDERS)
# family -> config.json's model_type of its toy (the Omni toys are saved as whole-Omni checkpoints)
MODEL_TYPES = {"qwen2_audio": "qwen2_audio", "audioflamingo3": "audioflamingo3", "qwen2_5_omni": "qwen2_5_omni",
               "qwen3_omni": "qwen3_omni_moe"}


def build_toy(family: str, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Build ``family``'s toy model in ``out_dir`` and return the folder. A model already there is kept unless
    ``overwrite``; a non-empty folder without a model (config.json and weights) is refused, never cleared."""
    if family not in TOY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; the toys are {list(FAMILIES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder for the toy model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not tiny._has_model(out_dir):
        raise FileExistsError(f"{out_dir} is not empty and holds no model (no config.json with *.safetensors); "
                              "give an empty or new folder (nothing there is deleted)")
    if tiny._has_model(out_dir) and not overwrite:
        found = json.loads((out_dir / "config.json").read_text()).get("model_type")
        if found != MODEL_TYPES[family]:
            raise FileExistsError(f"{out_dir} holds a {found!r} model, not the {family} toy ({MODEL_TYPES[family]!r}); "
                                  "pass --overwrite (overwrite=True) to replace it, or use another folder")
    return TOY_BUILDERS[family](out_dir, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emorl-toy-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to build the model in (created if missing)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_audio", help="model family (default qwen2_audio)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a model already in the folder")
    args = parser.parse_args(argv)
    try:
        path = build_toy(args.family, args.out_dir, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"emorl-toy-model: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
