"""The shapes of the API's answers (the request bodies are the spec models of jobs/contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.job_status import JobKind, JobStatus


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    errors: list[ErrorDetail] = Field(default_factory=list)


class StatusEvent(BaseModel):
    from_status: str | None
    to_status: str
    reason: str
    at: datetime


class JobRecord(BaseModel):
    id: str
    kind: JobKind
    name: str | None
    owner: str
    status: JobStatus
    status_reason: str | None
    failure_reason: str | None = None
    spec: dict[str, Any]
    attempts: int
    submission_id: str | None
    storage: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    dashboard_url: str | None
    latest_metrics: dict[str, Any] | None = None
    # Live warnings from the run's epochs so far (a rank-1 collapse: one class is the top-1
    # prediction for more than metrics.collapse_share of the validation images)
    warnings: list[str] | None = None
    result: dict[str, Any] | None = None
    events: list[StatusEvent] | None = None
    # sweeps only
    trials: list[dict[str, Any]] | None = None
    best_params: dict[str, Any] | None = None
    best_config: dict[str, Any] | None = None


class JobPage(BaseModel):
    items: list[JobRecord]
    next_cursor: str | None


class MetricsHistory(BaseModel):
    job_id: str
    epochs: list[dict[str, Any]]


class TrialMetricsHistory(MetricsHistory):
    trial_id: str


class ServiceInfo(BaseModel):
    version: str
    ray_dashboard_url: str | None
