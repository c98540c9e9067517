"""What the `topk` service commands share on the terminal: error lines with their exit code,
the help of a command group run bare, aligned columns, UTC times, redacted database URLs."""

from __future__ import annotations

import argparse
import sys

from jobs.contract import exit_codes


def fail(message: str, code: int = exit_codes.FAILED) -> int:
    """Print `topk: error: message` on stderr; returns `code`, the command's exit code."""
    print(f"topk: error: {message}", file=sys.stderr)
    return code


def usage(parser: argparse.ArgumentParser):
    """Handler of a command group run without its subcommand: its help, exit code USAGE."""

    def show(_args) -> int:
        parser.print_help(sys.stderr)
        return exit_codes.USAGE

    return show


def print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> None:
    """Aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print(indent + "  ".join(cell.ljust(width) for cell, width in cells).rstrip())


def utc(timestamp: float | None) -> str:
    """A Unix time as `YYYY-MM-DD HH:MM:SS` in UTC; `-` for none."""
    from datetime import UTC, datetime

    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def redact(url: str) -> str:
    """A database URL without its credentials."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
