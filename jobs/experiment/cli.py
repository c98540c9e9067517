"""`topk experiment CONFIG`: run an experiment grid on this machine (a process per run, on the
GPU when there is one) and write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.contract import exit_codes
from jobs.contract.cli import whole_number


def register(subparsers: argparse._SubParsersAction) -> None:
    help_text = "run a grid of training runs (datasets x losses x seeds) and report the results"
    parser = subparsers.add_parser("experiment", help=help_text, description=help_text)
    parser.add_argument("config", metavar="CONFIG", help="experiment file (YAML)")
    parser.add_argument(
        "--out",
        help="where datasets, runs and records go (default: runs/experiments/<name>); "
        "running again resumes: runs with a record are not redone",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="write the Markdown report here, with its CSV and plots in PATH's folder "
        "under <stem>/ (e.g. docs/results.md -> docs/results/)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing; report the existing records"
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="run again the runs whose record says failed"
    )
    parser.add_argument(
        "--concurrency",
        type=whole_number(1, 64),
        metavar="N",
        help="runs trained at the same time, each in its own process, sharing the GPU when there "
        "is one (default: the config's `concurrency`, else 2 on the CPU and 4 on a GPU); "
        "runs use the GPU when torch finds one, unless TOPK_DEVICE=cpu",
    )
    parser.set_defaults(handler=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    from jobs.experiment.config import load_config
    from jobs.experiment.runner import default_concurrency
    from jobs.training.device import resolve_device

    try:
        config = load_config(args.config)
        device = resolve_device().type  # TOPK_DEVICE, else the GPU when there is one
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    concurrency = args.concurrency or config.concurrency or default_concurrency(device)
    config = config.model_copy(update={"concurrency": concurrency})
    out = Path(args.out or Path("runs") / "experiments" / config.name)
    # The command that trains and reports from scratch (--report-only would need the records).
    command = " ".join(
        ["topk experiment", args.config]
        + (["--out", args.out] if args.out else [])
        + (["--report", args.report] if args.report else [])
        + (["--concurrency", str(args.concurrency)] if args.concurrency else [])
    )
    try:
        if args.report_only:
            from jobs.experiment.runner import collect

            plan, records = collect(config, out)
        else:
            from jobs.experiment.runner import run_experiment

            plan, records = run_experiment(
                config, out, retry_failed=args.retry_failed, device=device
            )
    except ValueError as exc:  # a bad config value, a missing source, a refused path
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    failed = [r for r in records.values() if r.get("status") != "succeeded"]
    missing = [r for r in plan.runs if r not in records]
    print(f"{len(records)} of {len(plan.runs)} runs have records, {len(failed)} failed")
    if args.report:
        from jobs.experiment.report import write_report

        written = write_report(
            config, plan, records, Path(args.report), out, command=command, config_path=args.config
        )
        print(f"report: {written}")
    return exit_codes.FAILED if failed or missing else exit_codes.OK
