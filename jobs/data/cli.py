"""`topk shards build SOURCE OUT` and `topk shards inspect URL`.

Handlers import the writer/inspector lazily so `topk --help` stays fast. Bad input gives one
line on stderr and exit code 2 (USAGE); a failed write, and a dataset with bad samples for
`inspect`, exit 1 (FAILED; jobs/contract/exit_codes.py).
"""

from __future__ import annotations

import argparse
import sys

from jobs.contract import exit_codes
from jobs.contract.cli import whole_number


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="write and check WebDataset shards")
    verbs = shards.add_subparsers(dest="shards_command", metavar="VERB")
    shards.set_defaults(handler=lambda args: _usage(shards))

    build = verbs.add_parser(
        "build",
        help="write tar shards and dataset.json from an image folder, a zip, .npz or IDX files",
        description="Write tar shards and dataset.json with seeded train/val/test splits. "
        "SOURCE: an image folder (root/<class>/<image>, nested class folders allowed), a .zip "
        "of one, a .npz (arrays images, labels) or a folder of IDX files (Fashion-MNIST). "
        "OUT: a local folder or fsspec URL (s3://bucket/prefix, memory://name).",
    )
    build.add_argument("source", metavar="SOURCE")
    build.add_argument("out", metavar="OUT")
    build.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    build.add_argument("--val-fraction", type=float, default=0.2, help="per class (default 0.2)")
    build.add_argument("--test-fraction", type=float, default=0.0, help="per class (default 0)")
    build.add_argument("--max-per-class", type=whole_number(1), help="keep at most N per class")
    build.add_argument(
        "--imbalance-ratio",
        type=float,
        default=1.0,
        help="long-tailed train split: largest / smallest class (default 1: as the source)",
    )
    build.add_argument("--imbalance-profile", choices=("exp", "step"), default="exp")
    build.add_argument(
        "--format",
        dest="image_format",
        choices=("keep", "png", "jpeg", "webp"),
        default="keep",
        help="keep the source bytes (default) or re-encode; arrays are encoded as PNG by 'keep'",
    )
    build.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality (default 90)")
    build.add_argument("--max-size", type=whole_number(1), help="shrink images to at most S pixels")
    build.add_argument(
        "--shard-samples", type=whole_number(1), default=10_000, help="samples per shard (max)"
    )
    build.add_argument(
        "--shard-mb",
        type=whole_number(1),
        default=256,
        help="megabytes per shard (max, default 256)",
    )
    build.add_argument("--class-names", help="comma-separated class names, in label order")
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    build.set_defaults(handler=run_build)

    inspect = verbs.add_parser(
        "inspect",
        help="read every sample of a dataset; exit 1 if any is bad",
        description="Read and decode every sample of the dataset at URL (a folder, prefix or "
        "dataset.json URL), print totals per split and each bad sample; exit 1 if any is bad.",
    )
    inspect.add_argument("url", metavar="URL")
    inspect.add_argument(
        "--label-key",
        default="label",
        help="the .json field holding the label of samples without a .cls member (default: label)",
    )
    inspect.add_argument("--quiet", action="store_true", help="no progress lines")
    inspect.set_defaults(handler=run_inspect)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exit_codes.USAGE


def _fail(command: str, message: object, code: int) -> int:
    print(f"topk shards {command}: error: {message}", file=sys.stderr)
    return code


def run_build(args: argparse.Namespace) -> int:
    from jobs.data.writer import build_shards

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    try:
        summary = build_shards(
            args.source,
            args.out,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            max_per_class=args.max_per_class,
            imbalance_ratio=args.imbalance_ratio,
            imbalance_profile=args.imbalance_profile,
            image_format=args.image_format,
            quality=args.quality,
            max_size=args.max_size,
            shard_max_samples=args.shard_samples,
            shard_max_bytes=args.shard_mb << 20,
            class_names=names,
            progress=None if args.quiet else sys.stderr,
        )
    except ValueError as exc:
        return _fail("build", exc, exit_codes.USAGE)
    except Exception as exc:  # storage drivers raise their own types (credentials, network)
        return _fail("build", f"{type(exc).__name__}: {exc}", exit_codes.FAILED)
    print(summary.format())
    return exit_codes.OK


def run_inspect(args: argparse.Namespace) -> int:
    from jobs.data.inspection import inspect_dataset

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = inspect_dataset(
            args.url, progress=None if args.quiet else progress, label_key=args.label_key
        )
    except ValueError as exc:
        return _fail("inspect", exc, exit_codes.USAGE)
    except Exception as exc:  # storage drivers raise their own types (credentials, network)
        return _fail("inspect", f"{type(exc).__name__}: {exc}", exit_codes.FAILED)
    print(report.format())
    return exit_codes.OK if report.ok else exit_codes.FAILED
