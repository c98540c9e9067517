"""The entrypoint a Ray job runs (built by the service from a validated spec):

    python -m jobs train --spec URL --run-name RUN [--storage ROOT] [--address ADDR]
    python -m jobs sweep --spec URL --run-name RUN [--storage ROOT] [--address ADDR]

Exit codes (jobs/contract/exit_codes.py): 0 success, 1 the run failed, 2 invalid arguments or an
unreadable spec file, 3 an invalid spec (one line per problem on stderr, never a traceback). An
invalid spec is also recorded as a failed run in ROOT/RUN/result.json; the service fails the job
at once on 2 or 3 instead of retrying it.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_run_arguments, run_sweep_command, run_train_command
from jobs.contract import exit_codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, handler in (("train", run_train_command), ("sweep", run_sweep_command)):
        sub = commands.add_parser(command, help=f"run a {command} spec")
        sub.add_argument("--spec", required=True, help="spec file path or fsspec URL")
        add_run_arguments(sub, run_name_required=True)
        sub.set_defaults(handler=handler, record_invalid=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
