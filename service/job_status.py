"""A job's statuses and the state machine between them, defined once for the whole service.

`queued -> launching -> running -> succeeded | failed | cancelled`, plus the moves back to
`queued` that retry an infrastructure failure. The store enforces the machine
(`Store.transition`); the API documents the statuses; the CLI waits for a terminal one.
Plain values only, so the `topk` client commands import it without the database or the API.
"""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "launching", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
QUEUED, LAUNCHING, RUNNING, SUCCEEDED, FAILED, CANCELLED = STATUSES
TERMINAL: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})
"""A job in one of these has ended: nothing moves it any more."""
LAUNCHED: tuple[JobStatus, ...] = (LAUNCHING, RUNNING)
"""Handed to Ray (or about to be): the reconciler follows these jobs, and their resources count
as taken on the cluster."""

LEGAL_TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({LAUNCHING, CANCELLED, FAILED}),
    # launching -> queued: the submission failed for an infrastructure reason, retry later;
    # launching -> succeeded/failed: adopted after a restart, the Ray job had already ended.
    LAUNCHING: frozenset({RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    # running -> queued: the attempt died for an infrastructure reason; the next attempt resumes
    # from the run's checkpoints.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

JobKind = Literal["train", "sweep"]
KINDS: tuple[JobKind, ...] = get_args(JobKind)


def noun(kind: str) -> str:
    """What users call a job of this kind: "job" (training) or "sweep"."""
    return "job" if kind == "train" else "sweep"
