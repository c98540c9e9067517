"""Job records as the API shows them: the database row, and for one job its history and what
its run wrote on storage (metrics.jsonl, result.json, a sweep's sweep.json)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from jobs.contract import run_files
from service.api.errors import ApiError
from service.api.schemas import JobRecord, StatusEvent
from service.job_status import FAILED
from service.store import JobRow, Store

log = logging.getLogger("topk.service")

# Tune's trial ids (`a1b2c_00000`): anything else never becomes part of a storage path.
_TRIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def job_record(job: JobRow, owner_name: str, dashboard_url: str | None) -> JobRecord:
    """The record of a listing: the row only, no storage read (`dashboard_url`: the Ray
    dashboard's, which the job's link points into)."""
    return JobRecord(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        name=job.name,
        owner=owner_name,
        status=job.status,  # type: ignore[arg-type]
        status_reason=job.status_reason,
        failure_reason=job.status_reason if job.status == FAILED else None,
        spec=job.spec,
        attempts=job.attempt,
        submission_id=job.submission_id,
        storage=run_files.run_url(job.storage_root, job.id, ""),
        created_at=_timestamp(job.created_at),
        updated_at=_timestamp(job.updated_at),
        started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at),
        dashboard_url=(
            f"{dashboard_url.rstrip('/')}/#/jobs/{job.submission_id}"
            if dashboard_url and job.submission_id
            else None
        ),
    )


def job_detail(job: JobRow, owner_name: str, dashboard_url: str | None, store: Store) -> JobRecord:
    """The record of one job: its status history, and once launched its latest metrics, its
    result and (a sweep) its trials. Storage that cannot be read leaves those out."""
    record = job_record(job, owner_name, dashboard_url)
    record.events = [
        StatusEvent(
            from_status=event.from_status,
            to_status=event.to_status,
            reason=event.reason,
            at=_timestamp(event.at),
        )
        for event in store.events_for(job.id)
    ]
    if job.attempt > 0:
        try:
            history = run_files.read_run_metrics(job.storage_root, job.id)
            record.latest_metrics = history[-1] if history else None
            record.warnings = run_files.collapse_warnings(history) or None
            record.result = run_files.read_run_json(job.storage_root, job.id, "result.json")
            if job.kind == "sweep":
                sweep = run_files.read_run_json(job.storage_root, job.id, "sweep.json") or {}
                record.trials = sweep.get("trials")
                record.best_params = sweep.get("best_params")
                record.best_config = sweep.get("best_config")
        except Exception as exc:  # storage down: the record is still worth returning
            log.warning("could not read run files of %s: %s", job.id, exc)
    return record


def read_metrics(job: JobRow, run_name: str) -> list[dict[str, Any]]:
    """The per-epoch history of one of the job's runs (the job's own, or a sweep trial's)."""
    try:
        return run_files.read_run_metrics(job.storage_root, run_name)
    except Exception as exc:  # storage unreachable: say so instead of a 500
        raise ApiError("storage_unavailable", f"could not read run metrics: {exc}") from None


def trial_ids(job: JobRow) -> set[str]:
    """The trial ids in the sweep's trial table (sweep.json, rewritten while the sweep runs)."""
    try:
        sweep = run_files.read_run_json(job.storage_root, job.id, "sweep.json") or {}
    except Exception as exc:
        raise ApiError("storage_unavailable", f"could not read sweep.json: {exc}") from None
    trials = sweep.get("trials")
    return {
        trial["trial_id"]
        for trial in (trials if isinstance(trials, list) else [])
        if isinstance(trial, dict)
        and isinstance(trial.get("trial_id"), str)
        and _TRIAL_ID.fullmatch(trial["trial_id"])
    }


def _timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)
