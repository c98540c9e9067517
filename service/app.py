"""The HTTP API: `create_app(settings)` builds the FastAPI app and its dependencies once.

Routes under /v1 (jobs and sweeps share one implementation), /healthz, /readyz and /metrics
(Prometheus). Errors leave in one JSON shape, mapped in one place (`_install_error_handlers`):
{"error": code, "message": text, "errors": [{"field": path, "message": text}]}.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import db, package_version, run_storage
from service.job_writer import JobWriter
from service.launcher import LaunchError, RayLauncher
from service.local_ray import HeadSupervisor
from service.observability import ServiceMetrics
from service.reconciler import Reconciler, crash_point
from service.settings import Settings
from service.specs import (
    InvalidSpec,
    parse_json_document,
    spec_model,
    validate_spec,
)
from service.web import install_pages

log = logging.getLogger("topk.service")


class ApiError(Exception):
    """An error with its HTTP status; the only exception routes raise on purpose."""

    def __init__(
        self, status: int, code: str, message: str, errors: list[dict[str, str]] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors or []


# -- response models ---------------------------------------------------------------------------


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
    kind: Literal["train", "sweep"]
    name: str | None
    owner: str
    status: Literal["queued", "launching", "running", "succeeded", "failed", "cancelled"]
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


class ServiceInfo(BaseModel):
    version: str
    ray_dashboard_url: str | None


class TrialMetricsHistory(MetricsHistory):
    trial_id: str


# -- dependencies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    id: int
    name: str


class TokenCache:
    """Valid tokens -> owner, remembered for `ttl_s` (a token lookup per request was a third
    of the submit path's database time).

    A revoked token (`topk token revoke`) stops working within `ttl_s` of the revocation's
    commit: an entry expires `ttl_s` after the lookup that made it began. Half a second keeps
    that under a second while a busy token still costs at most two primary-key reads a second
    (an entry per token, so the saving under load is kept)."""

    def __init__(self, store: db.Store, ttl_s: float = 0.5, max_entries: int = 10_000):
        self.store, self.ttl_s, self.max_entries = store, ttl_s, max_entries
        self._entries: dict[str, tuple[Owner, float]] = {}

    def cached(self, token: str) -> Owner | None:
        hit = self._entries.get(db.hash_token(token))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def lookup(self, token: str) -> Owner | None:
        key = db.hash_token(token)
        now = time.monotonic()
        found = self.store.owner_for_token(token)
        if found is None:
            self._entries.pop(key, None)
            return None
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        owner = Owner(*found)
        self._entries[key] = (owner, now + self.ttl_s)
        return owner


@dataclass
class Services:
    settings: Settings
    store: db.Store
    launcher: RayLauncher | None
    reconciler: Reconciler
    metrics: ServiceMetrics
    tokens: TokenCache
    writer: JobWriter


async def get_services(request: Request) -> Services:
    # async: a sync dependency would cost a thread-pool hop on every request
    return request.app.state.services


_bearer = HTTPBearer(auto_error=False, description="A token from `topk token create NAME`.")


async def current_owner(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    services: Annotated[Services, Depends(get_services)],
) -> Owner:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    owner = services.tokens.cached(credentials.credentials)
    if owner is None:
        owner = await run_in_threadpool(services.tokens.lookup, credentials.credentials)
    if owner is None:
        raise ApiError(401, "unauthorized", "invalid or revoked token")
    return owner


ServicesDep = Annotated[Services, Depends(get_services)]
OwnerDep = Annotated[Owner, Depends(current_owner)]


# -- app ---------------------------------------------------------------------------------------


def build_services(settings: Settings, launcher: RayLauncher | None = None) -> Services:
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = db.Store.from_url(settings.database_url)
    if launcher is None and settings.launch_mode == "ray":
        if not settings.ray_address:
            raise ValueError("TOPK_RAY_ADDRESS is not set (or run `topk serve`, which starts Ray)")
        launcher = RayLauncher(settings.ray_address)
    metrics = ServiceMetrics()
    reconciler = Reconciler(store, launcher, settings, on_launch=metrics.launches.inc)
    return Services(
        settings, store, launcher, reconciler, metrics, TokenCache(store), JobWriter(store)
    )


def create_app(
    settings: Settings | None = None,
    *,
    launcher: RayLauncher | None = None,
    run_reconciler: bool = True,
    head_supervisor: HeadSupervisor | None = None,
) -> FastAPI:
    """The API app. Settings default to the environment; the database is migrated and the
    reconciler started when the app starts (not at import or construction). `head_supervisor`
    (`topk serve`'s embedded Ray head) runs alongside the reconciler."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A few threads serve the blocking work (DB, Ray, storage): dozens of threads fighting
        # over the GIL made the 50-client latency tail ten times longer than queueing does.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
        services = await run_in_threadpool(build_services, settings, launcher)
        await run_in_threadpool(services.store.migrate)
        services.store.start_checkpointer()
        services.metrics.bind(services.store, services.reconciler)
        app.state.services = services
        services.writer.start()
        if head_supervisor is not None:
            head_supervisor.attach(services.reconciler)
        if run_reconciler:
            services.reconciler.start()
        # What exists now (modules, the app, its models) lives as long as the process: keep it
        # out of the garbage collector's full passes, which walked all of it and paused the
        # event loop for 25-110 ms under load (the submission benchmark's p99).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if head_supervisor is not None:
                head_supervisor.stop()
            services.reconciler.stop()
            await run_in_threadpool(services.writer.stop)
            services.store.close()

    app = FastAPI(
        title="topk job service",
        version="1",
        description="Train image classifiers with stochastic top-K losses on Ray.",
        lifespan=lifespan,
        # /docs is served from the package (service/web.py), not from a CDN; /redoc is off.
        docs_url=None,
        redoc_url=None,
        responses={
            401: {"model": ErrorBody, "description": "Missing or invalid token"},
            422: {"model": ErrorBody, "description": "Invalid input"},
        },
    )
    app.add_middleware(_BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(_RequestMetricsMiddleware)
    _install_error_handlers(app)
    app.include_router(_health_router())
    app.include_router(_info_router())
    app.include_router(_jobs_router("train", "/v1/jobs"))
    app.include_router(_jobs_router("sweep", "/v1/sweeps"))
    _install_openapi_bodies(app)
    install_pages(app)
    return app


def _info_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["service"])

    @router.get("/info", response_model=ServiceInfo, name="service_info")
    def info(services: ServicesDep, _owner: OwnerDep) -> ServiceInfo:
        """The service's version and the Ray dashboard of the cluster its jobs run on (each job
        record's `dashboard_url` points into it). Behind the token, unlike /readyz: probes need
        no addresses."""
        return ServiceInfo(
            version=package_version(), ray_dashboard_url=services.settings.ray_dashboard_url
        )

    return router


def _health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"model": ErrorBody}})
    def readyz(services: ServicesDep) -> dict[str, Any]:
        """The database and Ray are reachable, and the reconciler completes its passes."""
        checks: dict[str, str] = {}
        try:
            services.store.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if services.launcher is None:
            checks["ray"] = "not used (launch mode 'hold')"
        else:
            try:
                services.launcher.ping()
                checks["ray"] = "ok"
            except LaunchError as exc:
                checks["ray"] = f"unreachable: {exc}"
            checks["reconciler"] = services.reconciler.health_problem() or "ok"
        if not all(value == "ok" or value.startswith("not used") for value in checks.values()):
            raise ApiError(503, "not_ready", "; ".join(f"{k}: {v}" for k, v in checks.items()))
        return {"status": "ready", **checks}

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics(services: ServicesDep) -> Response:
        """Prometheus metrics: requests, jobs by status, launches, reconciler lag."""
        body, content_type = services.metrics.render()
        return Response(body, media_type=content_type)

    return router


def _jobs_router(kind: str, prefix: str) -> APIRouter:
    noun = "job" if kind == "train" else "sweep"
    router = APIRouter(prefix=prefix, tags=[f"{noun}s"])

    def load(services: Services, owner: Owner, job_id: str) -> db.JobRow:
        job = services.store.get_job(job_id, owner_id=owner.id)
        if job is None or job.kind != kind:  # another owner's job is just as absent
            raise ApiError(404, "not_found", f"no {noun} {job_id!r}")
        return job

    @router.post(
        "",
        status_code=201,
        response_model=JobRecord,
        responses={
            200: {"model": JobRecord, "description": "Same Idempotency-Key and body: the job"},
            409: {"model": ErrorBody},
            413: {"model": ErrorBody},
            415: {"model": ErrorBody, "description": "The body is not application/json"},
        },
        openapi_extra={"x-topk-body": kind},
        name=f"submit_{noun}",
    )
    async def submit(
        request: Request,
        services: ServicesDep,
        owner: OwnerDep,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the spec as application/json, not {media_type}",
            )
        raw = await request.body()
        try:
            # Duplicate keys, 5,000-digit integers and 100,000-deep nesting are errors here,
            # not a silently kept last value or a 500.
            body = parse_json_document(raw) if raw else None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(422, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if body is None:
            raise ApiError(422, "invalid_spec", f"the body must be a {noun} spec (JSON object)")

        settings = services.settings
        try:
            # Off the event loop: validation touches the file system (local paths are resolved,
            # the storage root is checked, a dataset.json may be read), and a slow or hung
            # mount must not stop /healthz. Its work is bounded: the body is at most
            # TOPK_MAX_BODY_BYTES, brace patterns are counted before anything is expanded.
            validated = await run_in_threadpool(validate_spec, kind, body, settings)
        except InvalidSpec as exc:
            errors = [{"field": path, "message": message} for path, message in exc.problems]
            raise ApiError(422, "invalid_spec", f"invalid {noun} spec: {exc}", errors) from None
        new_job = db.NewJob(
            kind=kind,
            owner_id=owner.id,
            spec=validated.spec,
            storage_root=validated.storage_root,
            requested_cpus=validated.requested_cpus,
            requested_gpus=validated.requested_gpus,
            idempotency_key=idempotency_key,
            name=validated.name,
        )
        try:
            # Returns once the job's transaction has committed (group commit, job_writer.py).
            job, created = await services.writer.create(new_job)
        except db.IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc)) from None
        crash_point(settings, "after_insert")
        if created:
            services.reconciler.wake()
        record = _record(services, job, owner.name, detail=False)
        # pydantic writes the JSON itself (no dict of JSON-ready values, then json.dumps).
        return Response(
            record.model_dump_json(),
            status_code=201 if created else 200,
            media_type="application/json",
        )

    @router.get("", response_model=JobPage, name=f"list_{noun}s")
    def list_jobs(
        services: ServicesDep,
        owner: OwnerDep,
        status: Annotated[
            list[Literal["queued", "launching", "running", "succeeded", "failed", "cancelled"]]
            | None,
            Query(description="Only these statuses (repeat the parameter for several)."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> JobPage:
        """The caller's jobs, newest first."""
        before = None
        if cursor is not None:
            if not cursor.isdigit() or len(cursor) > 18:
                raise ApiError(
                    422,
                    "invalid_cursor",
                    "cursor must be a next_cursor value from a previous page",
                    [{"field": "query.cursor", "message": "not a cursor from this API"}],
                )
            before = int(cursor)
        rows = services.store.list_jobs(
            kind=kind, owner_id=owner.id, statuses=status, before_seq=before, limit=limit + 1
        )
        page, more = rows[:limit], len(rows) > limit
        return JobPage(
            items=[_record(services, job, owner.name, detail=False) for job in page],
            next_cursor=str(page[-1].seq) if more else None,
        )

    @router.get(
        "/{job_id}",
        response_model=JobRecord,
        responses={404: {"model": ErrorBody}},
        name=f"get_{noun}",
    )
    def get_job(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobRecord:
        """Status, spec, attempts, timestamps, latest metrics, history and the dashboard link."""
        return _record(services, load(services, owner, job_id), owner.name, detail=True)

    @router.get(
        "/{job_id}/metrics",
        response_model=MetricsHistory,
        responses={404: {"model": ErrorBody}},
        name=f"{noun}_metrics",
    )
    def job_metrics(job_id: str, services: ServicesDep, owner: OwnerDep) -> MetricsHistory:
        """Per-epoch metrics, one entry per finished epoch (from the run's metrics.jsonl)."""
        job = load(services, owner, job_id)
        return MetricsHistory(job_id=job.id, epochs=_read_metrics(job, job.id))

    if kind == "sweep":

        @router.get(
            "/{job_id}/trials/{trial_id}/metrics",
            response_model=TrialMetricsHistory,
            responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}},
            name="sweep_trial_metrics",
        )
        def trial_metrics(
            job_id: str, trial_id: str, services: ServicesDep, owner: OwnerDep
        ) -> TrialMetricsHistory:
            """Per-epoch metrics of one trial of the sweep's trial table (`trials[].trial_id`),
            from the trial's own run (ROOT/RUN/trials/trial-<trial_id>/metrics.jsonl)."""
            job = load(services, owner, job_id)
            if trial_id not in _trial_ids(job):
                raise ApiError(404, "not_found", f"no trial {trial_id!r} in sweep {job_id!r}")
            trial_run = run_storage.trial_run_name(job.id, trial_id)
            return TrialMetricsHistory(
                job_id=job.id, trial_id=trial_id, epochs=_read_metrics(job, trial_run)
            )

    @router.get(
        "/{job_id}/logs",
        response_class=PlainTextResponse,
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 503: {"model": ErrorBody}},
        name=f"{noun}_logs",
    )
    async def job_logs(
        job_id: str,
        services: ServicesDep,
        owner: OwnerDep,
        tail: Annotated[int, Query(ge=0, le=100_000, description="Last lines; 0 = all")] = 200,
        follow: bool = False,
    ) -> Response:
        """The driver logs of the latest attempt; `follow=true` streams until the job ends."""
        job = await run_in_threadpool(load, services, owner, job_id)
        if job.submission_id is None or services.launcher is None:
            raise ApiError(409, "not_started", f"{noun} {job_id} has not been launched yet")
        launcher, submission_id = services.launcher, job.submission_id
        try:
            full = await run_in_threadpool(launcher.logs, submission_id)
        except LaunchError as exc:
            raise ApiError(503, "ray_unavailable", f"could not read logs from Ray: {exc}") from None
        text = "".join(full.splitlines(keepends=True)[-tail:]) if tail else full
        if not follow:
            return PlainTextResponse(text)

        async def stream():
            yield text
            # Ray's tail replays the log from its start: skip the part already sent.
            to_skip = len(full)
            try:
                async for chunk in launcher.follow_logs(submission_id):
                    if to_skip:
                        dropped = min(len(chunk), to_skip)
                        chunk, to_skip = chunk[dropped:], to_skip - dropped
                    if chunk:
                        yield chunk
            except LaunchError as exc:
                yield f"\n[topk: log stream ended: {exc}]\n"

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @router.post(
        "/{job_id}/cancel",
        response_model=JobRecord,
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
        name=f"cancel_{noun}",
    )
    def cancel(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobRecord:
        """Cancel (idempotent): a queued job never starts; a running one is stopped on Ray and
        keeps its checkpoints."""
        job = load(services, owner, job_id)
        while job.status not in db.TERMINAL:
            moved = services.store.transition(
                job.id, db.CANCELLED, f"cancelled by {owner.name}", expect=job.status
            )
            if moved is not None:
                if job.submission_id and services.launcher is not None:
                    # If Ray does not answer, the reconciler stops the job once it does.
                    with contextlib.suppress(LaunchError):
                        services.launcher.stop(job.submission_id)
                job = moved
                break
            job = load(services, owner, job_id)  # moved under us: look again
        if job.status != db.CANCELLED:
            raise ApiError(409, "already_finished", f"{noun} {job_id} already {job.status}")
        return _record(services, job, owner.name, detail=True)

    return router


def _read_metrics(job: db.JobRow, run_name: str) -> list[dict[str, Any]]:
    try:
        return run_storage.read_metrics(job.storage_root, run_name)
    except Exception as exc:  # storage unreachable: say so instead of a 500
        raise ApiError(503, "storage_unavailable", f"could not read run metrics: {exc}") from None


# Tune's trial ids (`a1b2c_00000`): anything else never becomes part of a storage path.
_TRIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _trial_ids(job: db.JobRow) -> set[str]:
    """The trial ids in the sweep's trial table (sweep.json, rewritten while the sweep runs)."""
    try:
        sweep = run_storage.read_json(job.storage_root, job.id, "sweep.json") or {}
    except Exception as exc:
        raise ApiError(503, "storage_unavailable", f"could not read sweep.json: {exc}") from None
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


def _record(services: Services, job: db.JobRow, owner_name: str, *, detail: bool) -> JobRecord:
    dashboard = services.settings.ray_dashboard_url
    record = JobRecord(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        name=job.name,
        owner=owner_name,
        status=job.status,  # type: ignore[arg-type]
        status_reason=job.status_reason,
        failure_reason=job.status_reason if job.status == db.FAILED else None,
        spec=job.spec,
        attempts=job.attempt,
        submission_id=job.submission_id,
        storage=run_storage.run_url(job.storage_root, job.id, ""),
        created_at=_timestamp(job.created_at),
        updated_at=_timestamp(job.updated_at),
        started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at),
        dashboard_url=(
            f"{dashboard.rstrip('/')}/#/jobs/{job.submission_id}"
            if dashboard and job.submission_id
            else None
        ),
    )
    if not detail:
        return record
    record.events = [
        StatusEvent(
            from_status=event.from_status,
            to_status=event.to_status,
            reason=event.reason,
            at=_timestamp(event.at),
        )
        for event in services.store.events_for(job.id)
    ]
    if job.attempt > 0:
        try:
            history = run_storage.read_metrics(job.storage_root, job.id)
            record.latest_metrics = history[-1] if history else None
            record.result = run_storage.read_json(job.storage_root, job.id, "result.json")
            if job.kind == "sweep":
                sweep = run_storage.read_json(job.storage_root, job.id, "sweep.json") or {}
                record.trials = sweep.get("trials")
                record.best_params = sweep.get("best_params")
                record.best_config = sweep.get("best_config")
        except Exception as exc:  # storage down: the record is still worth returning
            log.warning("could not read run files of %s: %s", job.id, exc)
    return record


# -- errors: the one place that maps exceptions to HTTP ------------------------------------------


def _error_response(
    status: int, code: str, message: str, errors=None, headers=None
) -> JSONResponse:
    body = {"error": code, "message": message, "errors": errors or []}
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error_response(exc.status, exc.code, exc.message, exc.errors, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for error in exc.errors():
            loc = [str(part) for part in error.get("loc", ())]
            message = error.get("msg", "invalid value")
            errors.append({"field": ".".join(loc), "message": message})
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return _error_response(422, "invalid_request", text, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error_response(500, "internal_error", "internal error; see the server log")


def _install_openapi_bodies(app: FastAPI) -> None:
    """Document the spec bodies that POST routes parse themselves (they validate with the
    service's URL limits as context, which a declared body parameter cannot pass)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operation in _operations(schema):
            kind = operation.pop("x-topk-body", None)
            if kind is None:
                continue
            model_schema = spec_model(kind).model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(model_schema.pop("$defs", {}))
            components[model_schema["title"]] = model_schema
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model_schema['title']}"}
                    }
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(schema: dict[str, Any]):
    for path_item in schema.get("paths", {}).values():
        yield from (op for op in path_item.values() if isinstance(op, dict))


# -- middleware --------------------------------------------------------------------------------


class _BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big(scope, receive, send)
        received = 0
        response_started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._too_big(scope, receive, send)

    async def _too_big(self, scope, receive, send):
        # Built only when needed: making it for every request cost 3% of the submit path.
        response = _error_response(
            413, "body_too_large", f"request body exceeds {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _RequestMetricsMiddleware:
    """Count requests by method, route template and status; time them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            services = (
                getattr(scope.get("app").state, "services", None) if scope.get("app") else None
            )
            if services is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                services.metrics.observe_request(
                    scope["method"],
                    template,
                    status_holder["status"],
                    time.perf_counter() - started,
                )
