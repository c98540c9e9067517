"""Probes and metrics, without a token: /healthz, /readyz and /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from service.api.deps import LauncherDep, MetricsDep, ReconcilerDep, StoreDep
from service.api.errors import ApiError, error_responses
from service.launcher import LaunchError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses("not_ready"))
def readyz(store: StoreDep, launcher: LauncherDep, reconciler: ReconcilerDep) -> dict[str, Any]:
    """The database and Ray are reachable, and the reconciler completes its passes (503 after
    3 failed passes in a row). While its latest pass failed, `reconciler_last_error` says why."""
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    if launcher is None:
        checks["ray"] = "not used (launch mode 'hold')"
    else:
        try:
            launcher.ping()
            checks["ray"] = "ok"
        except LaunchError as exc:
            checks["ray"] = f"unreachable: {exc}"
        checks["reconciler"] = reconciler.health_problem() or "ok"
    if not all(value == "ok" or value.startswith("not used") for value in checks.values()):
        raise ApiError("not_ready", "; ".join(f"{k}: {v}" for k, v in checks.items()))
    ready: dict[str, Any] = {"status": "ready", **checks}
    if reconciler.last_error is not None:
        # The latest pass failed, not yet often enough to make the server unready.
        ready["reconciler_last_error"] = reconciler.last_error
    return ready


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests, jobs by status, launches, reconciler lag."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
