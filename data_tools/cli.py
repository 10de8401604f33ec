"""``vitscale shards {write,merge,index,verify,stats,dedup,synth}``: offline work on WebDataset shard sets.

``main(argv) -> int`` is called by the top-level ``vitscale`` dispatcher, which turns a
:class:`~pretrain.core.errors.UserError` into a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.parallel import default_workers
from pretrain.data.shards import SKIPPED_FILE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitscale shards",
                                     description="write, verify and describe WebDataset shard folders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{write,merge,index,verify,stats,dedup,synth}")

    write = sub.add_parser("write", help="write an ImageFolder tree or CSV/JSONL manifest as shards")
    write.add_argument("src", type=Path, help="ImageFolder directory, or manifest .csv / .jsonl")
    write.add_argument("out", type=Path, help="output folder (created; re-running resumes)")
    write.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    write.add_argument("--max-shard-bytes", type=int, default=None, metavar="B",
                       help="also close a shard before it would exceed B bytes")
    write.add_argument("--workers", type=int, default=default_workers(), metavar="W",
                       help="encoding processes (default: all CPUs of this process)")
    write.add_argument("--resize-max", type=int, default=None, metavar="SIDE",
                       help="re-encode as JPEG with the long side capped at SIDE (never upscaled)")
    write.add_argument("--quality", type=int, default=None, metavar="Q",
                       help="re-encode as JPEG at quality Q (default 90 when re-encoding)")
    write.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="fraction of samples (by key hash) written as val-*.tar")
    write.add_argument("--split", default="train", metavar="NAME",
                       help="name of the split the samples go to (default train; e.g. --split val for "
                            "ImageNet's val/ folder); files are NAME-000000.tar ...")
    write.add_argument("--classes", type=Path, default=None, metavar="FROM",
                       help="index classes by the table of another shard set (its folder or classes.json), "
                            "e.g. --classes OUT/train when writing ImageNet's val/ folder on its own")
    write.add_argument("--force", action="store_true",
                       help="write into OUT even if it holds another dataset (its shards are replaced)")
    write.add_argument("--seed", type=int, default=0, help="seed for the split and the sample order")
    write.add_argument("--part", default=None, metavar="I/N",
                       help="write only part I (0..N-1) of N: every part plans the whole set the same way and "
                            "writes its own shards, so N machines (a SLURM array) write one set; the last part to "
                            "finish merges (else `vitscale shards merge OUT`); the result is byte-identical to "
                            "one machine's")
    write.add_argument("--no-progress", action="store_true", help="no progress bar")

    merge = sub.add_parser("merge", help="join the parts written with `shards write --part I/N` into index.json")
    merge.add_argument("out", type=Path, help="the OUT folder every part wrote into")

    index = sub.add_parser("index", help="write index.json for shards you already have (the shards are not changed)")
    index.add_argument("out", metavar="SET", help="folder, brace pattern or glob of local .tar shards")
    index.add_argument("--split", default="train", metavar="NAME",
                       help="split the shards form (default train; run again with --split val for a val set)")
    index.add_argument("--label-key", default=None, metavar="FIELD", help="the .json field holding the label")
    index.add_argument("--force", action="store_true", help="re-index a split the index already has")
    index.add_argument("--workers", type=int, default=default_workers(), metavar="W")
    index.add_argument("--no-progress", action="store_true")

    set_help = "shard folder (indexed or not), brace pattern, glob, URLs or a comma list of them"
    verify = sub.add_parser("verify", help="decode every sample and check it (against index.json when there is one)")
    verify.add_argument("out", metavar="SET", help=set_help)
    verify.add_argument("--label-key", default=None, metavar="FIELD", help="the .json field holding the label")
    verify.add_argument("--workers", type=int, default=default_workers(), metavar="W")
    verify.add_argument("--no-progress", action="store_true")

    stats = sub.add_parser("stats", help="samples, class histogram, image sizes")
    stats.add_argument("out", metavar="SET", help=set_help)
    stats.add_argument("--label-key", default=None, metavar="FIELD", help="the .json field holding the label")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--workers", type=int, default=default_workers(), metavar="W")
    stats.add_argument("--no-progress", action="store_true")
    dedup = sub.add_parser("dedup", help="find training images that are near-copies of evaluation images (perceptual "
                                          "hash) and write TRAIN/dedup.json, the keys the training loader skips")
    dedup.add_argument("train", metavar="TRAIN", help="the training set: " + set_help)
    dedup.add_argument("--against", action="append", required=True, metavar="VAL",
                       help="an evaluation set (" + set_help + "); repeat for several")
    dedup.add_argument("--threshold", type=int, default=None, metavar="D",
                       help="near-duplicate when the Hamming distance of the 64-bit pHashes is <= D (default 10)")
    dedup.add_argument("--train-split", default="train", metavar="NAME", help="split of TRAIN to check (default train; "
                       "a set with one split uses it)")
    dedup.add_argument("--against-split", default="val", metavar="NAME", help="split of each VAL (default val; a set "
                       "with one split uses it)")
    dedup.add_argument("--output", type=Path, default=None, metavar="FILE",
                       help="where the list goes (default TRAIN/dedup.json, where the loader reads it)")
    dedup.add_argument("--examples", type=int, default=10, metavar="K", help="example pairs printed (default 10)")
    dedup.add_argument("--workers", type=int, default=default_workers(), metavar="W")
    dedup.add_argument("--no-progress", action="store_true")

    synth = sub.add_parser("synth", help="write the built-in synthetic task as an ImageFolder of JPEGs")
    synth.add_argument("out", type=Path)
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--per-class", type=int, default=100)
    synth.add_argument("--img-size", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--start", type=int, default=0, help="first sample index (held-out sets use another range)")
    return parser


def check_write_args(argv: list[str]) -> None:
    """Parse ``SRC OUT [options]`` as ``shards write`` would (argparse exits 2 naming a wrong
    option) and build its options, so a generated job script cannot fail on them later."""
    from data_tools.shard_writer import WriteOptions

    args = _parser().parse_args(["write", *argv])
    WriteOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes, workers=1,
                 resize_max=args.resize_max, quality=args.quality, val_fraction=args.val_fraction, seed=args.seed,
                 split=args.split)


def _synth(args: argparse.Namespace) -> int:
    from data_tools.synth import write_synthetic_folder

    n = write_synthetic_folder(args.out, args.classes, args.per_class, args.img_size, args.seed, args.start)
    print(f"wrote {n} synthetic images ({args.classes} classes, {args.img_size}px) to {args.out}")
    return 0


def _index_line(out: Path, index: dict) -> str:
    parts = [f"{split} {info['samples']} samples in {len(info['shards'])} shards "
             f"({info['bytes'] / 1e6:.1f} MB)" for split, info in index["splits"].items()]
    kind = "multi-label" if index["multi_label"] else "single-label"
    return f"{out}: {'; '.join(parts)}; {index['num_classes']} classes ({kind})"


def _write(args: argparse.Namespace) -> int:
    from data_tools.parts import parse_part, record_path
    from data_tools.shard_writer import WriteOptions, write_shards

    part = parse_part(args.part) if args.part is not None else None
    options = WriteOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                           workers=args.workers, resize_max=args.resize_max, quality=args.quality,
                           val_fraction=args.val_fraction, seed=args.seed, split=args.split, force=args.force,
                           progress=not args.no_progress, classes_from=args.classes, part=part)
    summary = write_shards(args.src, args.out, options)
    if part is not None:
        files = summary.shards
        what = f"{files[0]} .. {files[-1]}" if files else "no shards (more parts than shards)"
        print(f"part {part[0]}/{part[1]} of {args.out}: {what}; written {summary.shards_written}, reused "
              f"{summary.shards_reused}; recorded in {record_path(args.out, *part)}")
    if summary.index is not None:
        print(("all parts done, merged: " if part is not None else "wrote ") + _index_line(args.out, summary.index))
    else:
        print(f"not merged yet: {summary.not_merged}")
    if part is None:
        print(f"shards written {summary.shards_written}, reused from an earlier run {summary.shards_reused}")
    if summary.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in summary.skip_reasons().most_common())
        where = args.out / SKIPPED_FILE if summary.index is not None else record_path(args.out, *part)
        print(f"skipped {len(summary.skipped)} images ({reasons}); list in {where}")
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from data_tools.dedup import dedup, format_report

    report = dedup(args.train, args.against, args.threshold, args.workers, args.train_split, args.against_split,
                   args.output, not args.no_progress)
    print(format_report(report, args.examples))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_tools.shard_writer import merge_parts

    print("merged " + _index_line(args.out, merge_parts(args.out)))
    return 0


def _index(args: argparse.Namespace) -> int:
    import time

    from data_tools.catalog import format_index, write_index

    t0 = time.perf_counter()
    index = write_index(args.out, args.split, args.label_key, args.workers, args.force, not args.no_progress)
    folder = Path(args.out) if Path(args.out).is_dir() else Path(args.out).parent
    print(format_index(index, args.split, folder, time.perf_counter() - t0))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_tools.catalog import open_catalog
    from data_tools.verify import format_reports, verify

    catalog = open_catalog(args.out, args.label_key)
    reports, good = verify(args.out, workers=args.workers, progress=not args.no_progress, label_key=args.label_key,
                           catalog=catalog)
    print(format_reports(reports, good, catalog))
    return 1 if any(r.problems for r in reports) else 0


def _stats(args: argparse.Namespace) -> int:
    from data_tools.stats import collect_stats, format_stats

    stats = collect_stats(args.out, workers=args.workers, progress=not args.no_progress, label_key=args.label_key)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (without the leading ``shards``) and run the subcommand; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"write": _write, "merge": _merge, "index": _index, "verify": _verify, "stats": _stats,
                "dedup": _dedup, "synth": _synth}
    return commands[args.command](args)

