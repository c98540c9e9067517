"""The `topk` command line: one argparse tree, each layer adds its own subcommands.

Each module listed in SUBCOMMAND_MODULES exposes `register(subparsers)`; heavy imports (torch,
ray, fastapi) happen inside the command handlers, never here, so `topk --help` stays fast.
A handler returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jobs.contract import exit_codes
from service import package_version

SUBCOMMAND_MODULES = (
    "jobs.data.cli",  # topk shards build|inspect
    "jobs.contract.cli",  # topk validate
    "jobs.cli",  # topk train|sweep (local runs on Ray)
    "jobs.experiment.cli",  # topk experiment
    "service.serve_cli",  # topk serve
    "service.client_cli",  # topk submit|status|logs|cancel|sweeps
    "service.token_cli",  # topk token create|list|revoke
    "service.demo",  # topk demo
)


class _PrintVersion(argparse.Action):
    """`topk --version`: the package metadata is read only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topk",
        description="Train image classifiers with stochastic top-K losses on Ray.",
        epilog="exit codes:\n"
        + "\n".join(f"  {code}  {meaning}" for code, meaning in exit_codes.TABLE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency, not an absent module
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return exit_codes.USAGE
    try:
        return int(handler(args) or exit_codes.OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
