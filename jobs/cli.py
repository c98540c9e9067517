"""`topk train SPEC` and `topk sweep SPEC`: run a training or sweep spec on Ray from a shell.

Without --address a local Ray cluster is started for the run (or RAY_ADDRESS is used inside a
Ray job). Progress is printed per epoch. Exit codes (jobs/contract/exit_codes.py): 0 success, 1 the run
failed, 2 bad arguments or an unreadable spec file, 3 an invalid spec (every problem printed as
"field.path: message"; local data that does not exist included).
The same handlers serve `python -m jobs train|sweep --spec URL`, the entrypoint a Ray job runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from jobs.contract import exit_codes
from jobs.contract.urls import url_limits_from_env


class UsageError(Exception):
    """Bad input from the user: printed as lines on stderr, exit code 2 (USAGE)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class InvalidSpecError(UsageError):
    """The spec cannot run, whatever the machine: `problems` holds its "field.path: message"
    lines (the exception's lines add a header naming the file). Exit code 3 (INVALID_SPEC)."""

    def __init__(self, lines: list[str], problems: list[str]) -> None:
        super().__init__(lines)
        self.problems = problems


def register(subparsers: argparse._SubParsersAction) -> None:
    for command, help_text in (
        ("train", "run a training spec on Ray (local cluster unless --address)"),
        ("sweep", "run a sweep spec (Ray Tune over dotted spec paths)"),
    ):
        parser = subparsers.add_parser(command, help=help_text, description=help_text)
        parser.add_argument("spec", metavar="SPEC", help="spec file (YAML or JSON), path or URL")
        add_run_arguments(parser)
        parser.set_defaults(handler=run_train_command if command == "train" else run_sweep_command)


def add_run_arguments(parser: argparse.ArgumentParser, *, run_name_required: bool = False) -> None:
    parser.add_argument(
        "--run-name",
        required=run_name_required,
        help="the run's folder under the storage root; reusing a name resumes that run "
        "(default: the spec's name, else <loss>-<time>)",
    )
    parser.add_argument(
        "--storage",
        help="storage root URL (default: the spec's storage, else $TOPK_STORAGE_URL, else "
        "./.topk/runs)",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to run on (its GCS host:port); default: $RAY_ADDRESS inside a Ray job, "
        "else a new local Ray sized for the spec's workers",
    )


def load_spec(url: str, kind: str) -> Any:
    """A validated TrainSpec ("train") or SweepSpec ("sweep") from a file or URL, its local
    data checked to exist, class counts filled from dataset.json: this process's one
    resolution of the spec, which run_training and run_sweep take as it is. Raises UsageError
    (the file) or InvalidSpecError (the spec) with one line per problem."""
    from pydantic import ValidationError

    from jobs.contract.spec_files import (
        SpecError,
        SpecFileError,
        format_validation_error,
        is_sweep_document,
        load_spec_file,
        parse_sweep_spec,
        parse_train_spec,
        resolve_class_counts,
    )

    context = url_limits_from_env()
    try:
        raw = load_spec_file(url, **context)
    except SpecFileError as exc:
        raise UsageError([f"error: {exc}"]) from None
    if kind == "train" and is_sweep_document(raw):
        raise UsageError([f"error: {url} is a sweep spec; run it with `sweep`"])
    if kind == "sweep" and not is_sweep_document(raw):
        raise UsageError([f"error: {url} is a training spec; run it with `train`"])
    context = {**context, "check_local_data": True}
    try:
        parse = parse_train_spec if kind == "train" else parse_sweep_spec
        return resolve_class_counts(parse(raw, context=context), context=context)
    except (ValidationError, SpecError) as exc:
        lines = format_validation_error(exc)
        return _raise_invalid(url, lines)


def check_data_sources(spec: Any) -> None:
    """Resolve the shards that the spec's data.train and data.val name (a sweep: its base
    training spec), reading their dataset.json, and check every shard URL against the process's
    URL limits, before anything is started: a dataset.json inside the allowed roots that names
    shards outside them is a refused spec. Raises InvalidSpecError naming the field."""
    from jobs.data.pipeline import DataPipelineError, resolve_shards

    data = getattr(spec, "train", spec).data
    for split in ("train", "val"):
        source = getattr(data, split)
        if source is None:
            continue
        try:
            resolve_shards(source, field=f"data.{split}", split=split, num_classes=data.num_classes)
        except (ValueError, DataPipelineError) as exc:
            raise InvalidSpecError([f"error: {exc}"], [str(exc)]) from None


def _raise_invalid(url: str, lines: list[str]) -> Any:
    raise InvalidSpecError(
        [f"{url}: invalid spec ({len(lines)} problem(s)):"] + [f"  {x}" for x in lines], lines
    )


def default_run_name(spec: Any) -> str:
    train = getattr(spec, "train", spec)
    if getattr(spec, "name", None):
        return spec.name
    prefix = "sweep-" if train is not spec else ""
    return f"{prefix}{train.loss.name.replace('_', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_epoch(record: dict[str, Any], epochs: int) -> None:
    """One progress line per finished epoch."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    for key in sorted(record):
        if key.startswith("val_"):
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"{record.get('samples_per_second', 0.0):.0f} samples/s")
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']}")
    print("  ".join(parts), flush=True)


def _run(args: argparse.Namespace, kind: str) -> int:
    try:
        spec = load_spec(args.spec, kind)
        run_name = args.run_name or default_run_name(spec)
        from jobs.contract.run_files import check_run_name, normalize_root

        check_run_name(run_name)
        storage = args.storage or (spec.storage if kind == "train" else spec.train.storage)
        if storage is not None:
            from jobs.contract.urls import check_url

            check_url(storage, **url_limits_from_env())
        root = normalize_root(storage)
        check_data_sources(spec)
    except InvalidSpecError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        if getattr(args, "record_invalid", False):
            _record_invalid_spec(args, exc)
        return exit_codes.INVALID_SPEC
    except UsageError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return exit_codes.USAGE
    except ValueError as exc:  # a bad --run-name or --storage
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE

    print(f"{kind} run {run_name!r} under {root}", flush=True)
    from jobs.training.run import settle_worker_output

    try:
        if kind == "train":
            from jobs.training.run import run_training

            result = run_training(
                spec,
                run_name,
                storage=root,
                address=args.address,
                on_epoch=lambda record: print_epoch(record, spec.epochs),
            )
        else:
            from jobs.sweep import run_sweep

            summary = run_sweep(spec, run_name, storage=root, address=args.address)
    except (RuntimeError, ValueError, OSError) as exc:
        settle_worker_output()  # the workers' last lines first, then the error
        print(f"error: {kind} run {run_name!r} failed: {exc}", file=sys.stderr)
        return exit_codes.FAILED
    settle_worker_output()  # the workers' last lines first, then the result
    if kind == "train":
        print(json.dumps({"run": run_name, **result}, indent=2, default=str))
    else:
        from jobs.sweep import format_trial_table

        print(format_trial_table(summary))
        print(f"best config: {root}/{run_name}/sweep.json (best_config)")
    return exit_codes.OK


def _record_invalid_spec(args: argparse.Namespace, error: InvalidSpecError) -> None:
    """Write ROOT/RUN/result.json with status "failed" and the spec's problems, for a run given
    --run-name and --storage (the service's entrypoint always gives both): the service reads a
    run's own failure there, and fails the job with it instead of retrying. A spec can pass the
    service and be refused here: class counts that only the worker may read (service/specs.py).
    A failure to write is printed, not raised."""
    from jobs.contract.run_files import check_run_name, join, normalize_root, write_json

    if not (args.run_name and args.storage):
        return
    result = {
        "status": "failed",
        "epochs": 0,
        "best": None,
        "best_epoch": None,
        "error": "invalid spec: " + "; ".join(error.problems),
        "time": time.time(),
    }
    try:
        run_dir = join(normalize_root(args.storage), check_run_name(args.run_name))
        write_json(join(run_dir, "result.json"), result)
    except (OSError, ValueError) as exc:
        print(f"error: could not write result.json under {args.storage}: {exc}", file=sys.stderr)


def run_train_command(args: argparse.Namespace) -> int:
    return _run(args, "train")


def run_sweep_command(args: argparse.Namespace) -> int:
    return _run(args, "sweep")
