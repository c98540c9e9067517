"""The `topk` command line: one argparse tree, each layer adds its own subcommands.

The service's commands are its own modules (SERVICE_COMMANDS). The runtime's commands (shards,
validate, train, sweep, experiment) are found through the package's entry points in the group
`topk.commands` (pyproject.toml), so the service names no module of the runtime. Each exposes
`register(subparsers)`; heavy imports (torch, ray, fastapi) happen inside the command handlers,
never here, so `topk --help` stays fast. A handler returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from jobs.contract import exit_codes
from service import package_version

COMMAND_GROUP = "topk.commands"
RUNTIME_ORDER = ("shards", "validate", "train", "experiment")
"""The order of the runtime's entry points in `topk --help`; others follow by name."""


def _service_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from service import client_cli, demo, serve_cli, token_cli

    return [
        serve_cli.register,  # topk serve
        client_cli.register,  # topk submit|status|logs|cancel|sweeps
        token_cli.register,  # topk token create|list|revoke
        demo.register,  # topk demo
    ]


def _runtime_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """The `register` functions the installed package declares in COMMAND_GROUP."""
    found = {point.name: point for point in entry_points(group=COMMAND_GROUP)}
    order = [n for n in RUNTIME_ORDER if n in found] + sorted(set(found) - set(RUNTIME_ORDER))
    return [found[name].load() for name in order]


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
    for register in _runtime_commands() + _service_commands():
        register(subparsers)
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
