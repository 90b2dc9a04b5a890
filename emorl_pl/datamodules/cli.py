"""``emorl-data``: convert emotion corpora to the project's shards (``<out>/<split>/shard-*.tar`` + index.json).

Subcommands: ``emobox`` (EmoBox manifests + your copy of the audio), ``iemocap``, ``meld``, ``ravdess``,
``cremad``, ``savee`` (each corpus's own release layout), ``table`` (a CSV/JSONL of path,label,...)
and ``synth`` (generated prosody-coded speech). Each plans the splits from metadata, then loads the
audio, writes the shards and prints counts per split and label and the skipped files.
Exit status: 0 done, 1 bad input or refused (e.g. existing shards without --overwrite), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from emorl_pl.datamodules.corpora.common import Plan, parse_speaker_list, resolve_label_set
from emorl_pl.emotions import LABEL_SETS


def _add_common(p: argparse.ArgumentParser, *, folds: int | None = None, valid: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, help="output root; splits go to OUT/<split>/")
    p.add_argument("--label-set", default=None,
                   help=f"keep only these labels, the rest dropped and counted: {', '.join(LABEL_SETS)} "
                        "or a comma-separated list (e.g. neutral,happy,angry,sad)")
    if folds is not None:
        p.add_argument("--fold", type=int, default=1, help="test fold (default 1)")
        p.add_argument("--num-folds", type=int, default=folds,
                       help=f"speaker-disjoint folds (contiguous blocks of sorted speakers; default {folds})")
    if valid:
        p.add_argument("--valid-fraction", type=float, default=0.1,
                       help="share of train held out as valid, speaker-disjoint when speakers are known "
                            "(default 0.1; 0 = no valid split)")
        p.add_argument("--valid-speakers", default=None, help="comma-separated speakers to hold out as valid instead")
        p.add_argument("--seed", type=int, default=0, help="seed of the deterministic held-out choice (default 0)")
    g = p.add_argument_group("writing")
    g.add_argument("--overwrite", action="store_true", help="replace existing shards in the output splits")
    g.add_argument("--strict", action="store_true", help="stop at the first missing/unreadable audio file")
    g.add_argument("--dry-run", action="store_true", help="print the planned splits and write nothing")
    g.add_argument("--sample-rate", type=int, default=16000, help="output sample rate (default 16000)")
    g.add_argument("--max-duration", type=float, default=None, help="crop or skip audio longer than this (s)")
    g.add_argument("--overlong", choices=("crop", "skip"), default="crop", help="what --max-duration does")
    g.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    g.add_argument("--max-bytes", type=int, default=200_000_000, help="bytes per shard (default 2e8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``emorl-data`` argument parser (one subcommand per corpus, plus ``synth``)."""
    parser = argparse.ArgumentParser(prog="emorl-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("emobox", help="an EmoBox corpus: manifest + label map + fold files, audio from --audio-root",
                       description="Test = fold N's test file; valid = its valid file (MELD) or held out of train; "
                                   "train = the rest. Audio at AUDIO_ROOT/<wav field>.")
    p.add_argument("--corpus-dir", type=Path, help="EmoBox data/<corpus> folder (finds manifest, label map, folds)")
    p.add_argument("--manifest", type=Path, help="<corpus>.jsonl (default: in --corpus-dir)")
    p.add_argument("--label-map", type=Path, help="label_map.json (default: beside the manifest)")
    p.add_argument("--test-file", type=Path, help="test keys (default: fold_N/<corpus>_test_fold_N.jsonl)")
    p.add_argument("--valid-file", type=Path, help="valid keys (default: fold_N/<corpus>_valid_fold_N.jsonl if present)")
    p.add_argument("--audio-root", type=Path, required=True, help="folder the manifest's wav paths are relative to")
    p.add_argument("--strip-components", type=int, default=0,
                   help="drop this many leading parts of each wav path (e.g. 2 for downloads/iemocap/...)")
    _add_common(p, folds=None)
    p.add_argument("--fold", type=int, default=1, help="EmoBox fold (default 1)")

    p = sub.add_parser("iemocap", help="IEMOCAP release folder (Session1..5); fold N = session N is test")
    p.add_argument("--root", type=Path, required=True, help="folder with Session1 ... Session5")
    p.add_argument("--fold", type=int, default=1, help="session held out as test (default 1)")
    p.add_argument("--no-text", action="store_true", help="do not read transcripts")
    _add_common(p)

    p = sub.add_parser("meld", help="MELD release folder (official train/dev/test)")
    p.add_argument("--root", type=Path, required=True, help="folder with *_sent_emo.csv and the split media folders")
    _add_common(p, valid=False)

    for name, folds, what in (("ravdess", 6, "RAVDESS .wav files (Actor_XX/...)"),
                              ("cremad", 5, "CREMA-D .wav files (AudioWAV/...)"),
                              ("savee", 4, "SAVEE .wav files (JE_sa01.wav or JE/sa01.wav)")):
        p = sub.add_parser(name, help=f"{what}; speaker-disjoint folds")
        p.add_argument("--root", type=Path, required=True, help="folder searched recursively for the .wav files")
        if name == "ravdess":
            p.add_argument("--include-song", action="store_true", help="also the sung files (vocal channel 02)")
        _add_common(p, folds=folds)

    p = sub.add_parser("table", help="a CSV/TSV/JSONL with columns path,label[,text,speaker,split,key]")
    p.add_argument("--table", type=Path, required=True, help="the table; paths are relative to its folder")
    p.add_argument("--corpus-name", default=None, help="corpus name stored per sample (default: table file stem)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="without a split column: share held out as test (default 0.1)")
    _add_common(p)

    p = sub.add_parser("synth", help="generate the synthetic prosody-coded emotional speech corpus")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="corpus seed (the corpus is a pure function of its options)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("--labels", default=None, help="label set name or comma-separated labels (default: iemocap4)")
    p.add_argument("--num-speakers", type=int, default=None, help="speakers (default: the generator's)")
    p.add_argument("--per-label", type=int, default=None, help="utterances per speaker and label (default: the generator's)")
    p.add_argument("--ambiguity", type=float, default=None,
                   help="0..1: a share ambiguity/2 of each label's utterances is spoken like a Plutchik neighbour "
                        "(S > 0.7; needs a label set with such pairs, e.g. ravdess8)")
    return parser


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Run the planning function the subcommand names."""
    from emorl_pl.datamodules import corpora

    label_set = resolve_label_set(args.label_set)
    held = {}
    if hasattr(args, "valid_fraction"):
        held = dict(valid_fraction=args.valid_fraction, valid_speakers=parse_speaker_list(args.valid_speakers),
                    seed=args.seed)
    if args.command == "emobox":
        return _plan_emobox(args, label_set, held)
    if args.command == "iemocap":
        return corpora.plan_iemocap(args.root, fold=args.fold, label_set=label_set, with_text=not args.no_text, **held)
    if args.command == "meld":
        return corpora.plan_meld(args.root, label_set=label_set)
    if args.command in ("ravdess", "cremad", "savee"):
        planner = {"ravdess": corpora.plan_ravdess, "cremad": corpora.plan_cremad, "savee": corpora.plan_savee}
        extra = {"include_song": args.include_song} if args.command == "ravdess" else {}
        return planner[args.command](args.root, fold=args.fold, num_folds=args.num_folds, label_set=label_set,
                                     **extra, **held)
    if args.command == "table":
        return corpora.plan_table(args.table, corpus=args.corpus_name, label_set=label_set,
                                  test_fraction=args.test_fraction, **held)
    raise ValueError(f"unknown command {args.command!r}")


def _plan_emobox(args: argparse.Namespace, label_set: tuple[str, ...] | None, held: dict) -> Plan:
    from emorl_pl.datamodules.corpora.emobox import find_emobox_files, plan_emobox

    if args.corpus_dir is None and args.manifest is None:
        raise ValueError("emobox needs --corpus-dir or --manifest")
    corpus_dir = args.corpus_dir or args.manifest.parent
    if args.label_map is not None and args.test_file is not None:
        manifest = args.manifest or find_emobox_files(corpus_dir, args.fold).manifest
        label_map, test, valid = args.label_map, args.test_file, args.valid_file
    else:
        found = find_emobox_files(corpus_dir, args.fold, manifest=args.manifest)
        manifest = found.manifest
        label_map = args.label_map or found.label_map
        test = args.test_file or found.test
        valid = args.valid_file or found.valid
    return plan_emobox(manifest, label_map=label_map, test_file=test, valid_file=valid, audio_root=args.audio_root,
                       fold=args.fold, label_set=label_set, strip_components=args.strip_components, **held)


def _run_synth(args: argparse.Namespace) -> int:
    try:
        from emorl_pl.datamodules.synth import write_synth_corpus
    except ImportError as exc:
        raise ValueError(f"the synthetic corpus generator is not available: {exc}") from exc
    options = {}
    if args.labels:
        options["labels"] = [x.strip() for x in args.labels.split(",")] if "," in args.labels else args.labels
    if args.num_speakers is not None:
        options["num_speakers"] = args.num_speakers
    if args.per_label is not None:
        options["utterances_per_speaker_per_label"] = args.per_label
    if args.ambiguity is not None:
        options["ambiguity"] = args.ambiguity
    result = write_synth_corpus(args.out, seed=args.seed, overwrite=args.overwrite, **options)
    print(f"synthetic corpus written to {args.out}")
    if isinstance(result, dict):
        for split, ix in result.items():
            if isinstance(ix, dict) and "num_samples" in ix:
                print(f"  {split}: {ix['num_samples']} ({ix.get('label_counts', {})})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emorl-data``; returns the exit status (argparse exits 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    from emorl_pl.datamodules.corpora.convert import (
        ConversionError,
        convert_plan,
        format_plan,
        format_summary,
    )

    try:
        if args.command == "synth":
            return _run_synth(args)
        plan = plan_from_args(args)
        if args.dry_run:
            print(format_plan(plan))
            return 0
        indexes = convert_plan(plan, args.out, sample_rate=args.sample_rate, max_count=args.max_count,
                               max_bytes=args.max_bytes, max_duration=args.max_duration, overlong=args.overlong,
                               overwrite=args.overwrite, strict=args.strict, progress=not args.no_progress)
        print(format_summary(plan, indexes))
        print(f"shards in {args.out}")
        return 0
    except FileExistsError as exc:
        print(f"emorl-data {args.command}: error: {exc} (on the command line: --overwrite)", file=sys.stderr)
        return 1
    except (ValueError, OSError, ConversionError) as exc:
        # Bad input, refused overwrite, FFmpeg needed, --strict stop: one clear line, no traceback.
        print(f"emorl-data {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
