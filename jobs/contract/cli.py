"""`topk validate SPEC`: check a training or sweep spec file (YAML or JSON, path or URL).

Prints every problem as "field.path: message" on stderr and exits 3 when the spec is invalid,
2 when the file cannot be read; prints a one-paragraph summary and exits 0 when it is valid
(jobs/contract/exit_codes.py). Local data that does not exist is a problem of its field; remote data is
not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from jobs.contract import exit_codes
from jobs.contract.urls import url_limits_from_env


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for a whole number in [low, high] (no upper bound when `high` is
    None), refused with one line that says the range and echoes what was typed."""
    expected = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number {expected}, got {text!r}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a training or sweep spec file",
        description=(
            "Check a training or sweep spec (YAML or JSON, a path or URL) and print every "
            "problem with its field path. Local data paths must exist, and losses that need "
            "class counts read them from the training data's dataset.json, unless --no-resolve "
            f"is given. Exit codes: {exit_codes.OK} valid, {exit_codes.INVALID_SPEC} invalid, "
            f"{exit_codes.USAGE} unreadable file."
        ),
    )
    parser.add_argument("spec", metavar="SPEC", help="spec file path or URL")
    parser.add_argument(
        "--no-resolve",
        action="store_true",
        help="check the structure only: do not look for local data, nor read dataset.json "
        "for class counts",
    )
    parser.add_argument(
        "--print",
        dest="print_spec",
        action="store_true",
        help="print the complete validated spec (defaults filled in) as JSON",
    )
    parser.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from jobs.contract.spec_files import (
        SpecFileError,
        check_decode_format,
        format_validation_error,
        load_spec_file,
        parse_spec,
        resolve_class_counts,
    )
    from jobs.contract.train import SpecError

    context = url_limits_from_env()
    try:
        raw = load_spec_file(args.spec, **context)
    except SpecFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    if not args.no_resolve:
        context["check_local_data"] = True
    try:
        spec = parse_spec(raw, context=context)
        if not args.no_resolve:
            spec = resolve_class_counts(spec, context=context)
            check_decode_format(spec, context=context)
    except (ValidationError, SpecError) as exc:
        lines = format_validation_error(exc)
        print(f"{args.spec}: invalid spec ({len(lines)} problem(s)):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        if not args.no_resolve and any(_names_missing_data(line) for line in lines):
            print(
                "hint: make the dataset first (`topk shards build ...`; each example's header "
                "gives its command), or check the structure only with --no-resolve",
                file=sys.stderr,
            )
        return exit_codes.INVALID_SPEC
    if args.print_spec:
        print(json.dumps(spec.model_dump(mode="json"), indent=2))
    else:
        print(f"{args.spec}: {describe_spec(spec)}")
    return exit_codes.OK


def _names_missing_data(problem: str) -> bool:
    """Whether a "field: message" line says the data is not there (yet)."""
    if problem.startswith("loss.class_counts: "):
        return True
    return problem.startswith(("data.", "model.pretrained")) and (
        "does not exist" in problem or "holds no" in problem
    )


def describe_spec(spec: Any) -> str:
    """A short human summary of a valid TrainSpec or SweepSpec."""
    from jobs.contract.sweep import SweepSpec

    if isinstance(spec, SweepSpec):
        searched = ", ".join(
            f"{path} ({domain.kind} {_domain_text(domain)})" for path, domain in spec.search.items()
        )
        return (
            f"valid sweep spec: {searched}; {spec.num_samples} sample(s) per grid point, "
            f"{spec.scheduler.name} on {spec.metric} ({spec.mode}); "
            f"each trial: {_describe_train(spec.train)}"
        )
    return f"valid training spec: {_describe_train(spec)}"


def _domain_text(domain: Any) -> str:
    values = domain.grid or domain.choice or domain.uniform or domain.loguniform
    return json.dumps(list(values))


def _describe_train(train: Any) -> str:
    params = {k: v for k, v in train.loss.to_kwargs().items() if k != "class_counts"}
    loss = f"{train.loss.name}({', '.join(f'{k}={v}' for k, v in params.items())})"
    counts = getattr(train.loss, "class_counts", None)
    if counts is not None:
        loss += f" with class counts {min(counts)}..{max(counts)}"
    head = "cosine head" if train.model.cosine_head else "linear head"
    workers = train.scaling.num_workers
    device = "GPU" if train.scaling.use_gpu else "CPU"
    return (
        f"{loss} on {train.data.num_classes} classes, {train.model.arch} with a {head}, "
        f"{train.epochs} epoch(s) of batch {train.batch_size} x {workers} {device} worker(s)"
    )
