"""What the store hands out and takes in: rows as frozen dataclasses, and its two errors."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from service.job_status import noun


class IllegalTransition(RuntimeError):
    """A status change the state machine forbids (a bug in the caller, not a user error)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used by this owner with a different body."""

    def __init__(self, job_id: str):
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different body")
        self.job_id = job_id


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    kind: str
    owner_id: int
    name: str | None
    status: str
    status_reason: str | None
    spec: dict
    spec_hash: str
    idempotency_key: str | None
    storage_root: str
    requested_cpus: float
    requested_gpus: float
    attempt: int
    submission_id: str | None
    not_before: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_mapping(cls, row: Any) -> JobRow:
        data = dict(row._mapping)
        data["spec"] = json.loads(data["spec"])
        return cls(**data)


@dataclass(frozen=True)
class EventRow:
    from_status: str | None
    to_status: str
    reason: str
    at: float


TOKEN_ID_LENGTH = 12
"""A token's public id is the start of its sha256 (hex): safe to show, since the token itself
is 256 random bits, and long enough (48 bits) that two tokens of one service never share it."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as `topk token list` shows it: never the token, only its public id."""

    id: str
    owner: str
    created_at: float
    revoked_at: float | None
    token_hash: str


@dataclass(frozen=True)
class NewJob:
    """A validated submission, to be recorded as a queued job."""

    kind: str
    owner_id: int
    spec: dict
    storage_root: str
    requested_cpus: float
    requested_gpus: float
    idempotency_key: str | None = None
    name: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_job_id(kind: str) -> str:
    """A stable, URL- and shell-safe id: the Ray Train run name and the submission id prefix."""
    return f"{noun(kind)}-{secrets.token_hex(6)}"
