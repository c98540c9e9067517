"""Print the requirements of one optional-dependency extra of pyproject.toml, one per line.

The API image installs the project itself with `--no-deps` (the core dependencies include torch)
and then exactly these requirements, so pyproject.toml stays the one place that says what the
service needs. Standard library only: it runs in a bare python:3.11 build stage.

    python docker/extra_requirements.py service [--pyproject PATH]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def read_extra(pyproject: Path, extra: str) -> list[str]:
    """Requirement strings of `extra`; raises ValueError naming the valid extras if it is unknown."""
    with pyproject.open("rb") as handle:
        extras = tomllib.load(handle)["project"].get("optional-dependencies", {})
    if extra not in extras:
        raise ValueError(f"no extra {extra!r} in {pyproject}; extras: {', '.join(sorted(extras))}")
    return list(extras[extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    try:
        requirements = read_extra(args.pyproject, args.extra)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
