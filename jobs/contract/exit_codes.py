"""The exit codes of every `topk` command and of `python -m jobs`, defined once.

The service's reconciler reads the job driver's code: USAGE and INVALID_SPEC are the user's
errors (the job fails at once, another attempt would be refused the same way); FAILED and any
other code are retried as infrastructure failures unless the run recorded its own failure.
"""

from __future__ import annotations

OK = 0
"""Done: a valid spec, a run or a followed job that succeeded."""
FAILED = 1
"""The work failed: a run, or a job followed with --wait, failed or was cancelled; or the
command could not do its work on this machine (a busy port, a Ray head that did not start)."""
USAGE = 2
"""The command line is wrong: a bad argument or option (argparse's own code), a file that cannot
be read, a setting with a bad value, a name or id that does not exist."""
INVALID_SPEC = 3
"""The spec is refused: every problem is printed with its field path (`topk validate`, `train`,
`sweep`, `python -m jobs`, and the service's 422 on `topk submit`)."""
SERVICE = 4
"""The service refused the request (no token or a revoked one, no such job, a job that already
ended) or could not be reached, nor its database."""
INTERRUPTED = 130
"""Ctrl-C."""

REFUSED_BY_DRIVER = frozenset({USAGE, INVALID_SPEC})
"""Codes of `python -m jobs` that mean the job itself is wrong, not the cluster."""

TABLE = (
    (OK, "success"),
    (FAILED, "the run or the job failed, or the command could not do its work"),
    (USAGE, "bad arguments, an unreadable file, an unknown name"),
    (INVALID_SPEC, "the spec is invalid (every problem with its field path)"),
    (SERVICE, "the service refused the request or cannot be reached"),
)
"""(code, meaning) for help texts and the README."""
