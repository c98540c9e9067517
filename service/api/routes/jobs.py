"""/v1/jobs: training jobs. `JobRoutes` is the implementation that sweeps share (sweeps.py):
submit, list, get, metrics, logs and cancel (and a sweep's trial metrics), each route a method
declared with `@route`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from jobs.contract import run_files
from service.api.deps import (
    LauncherDep,
    Owner,
    OwnerDep,
    ReconcilerDep,
    SettingsDep,
    StoreDep,
    WriterDep,
)
from service.api.errors import ApiError, error_responses
from service.api.records import job_detail, job_record, read_metrics, trial_ids
from service.api.schemas import JobPage, JobRecord, MetricsHistory, TrialMetricsHistory
from service.job_status import CANCELLED, KINDS, TERMINAL, JobKind, JobStatus, noun
from service.launcher import LaunchError
from service.settings import crash_point
from service.specs import InvalidSpec, parse_json_document, validate_spec
from service.store import IdempotencyConflict, JobRow, NewJob, Store

_NOT_FOUND = error_responses("not_found")


@dataclass(frozen=True)
class _Route:
    method: str
    path: str
    name: str  # may hold {noun}: "job" or "sweep"
    kinds: tuple[str, ...]
    spec_body: bool  # the body is the kind's spec, parsed by the route itself
    options: dict[str, Any]  # APIRouter.add_api_route's


def route(
    method: str,
    path: str,
    *,
    name: str,
    kinds: tuple[str, ...] = KINDS,
    spec_body: bool = False,
    **options: Any,
):
    """Declare a JobRoutes method as the route `method path` of the collections of `kinds`."""

    def declare(handler):
        handler.route = _Route(method, path, name, kinds, spec_body, options)
        return handler

    return declare


class JobRoutes:
    """The routes of one collection of jobs, all of one kind; another owner's job, or one of
    the other kind, is absent (404)."""

    def __init__(self, kind: JobKind, prefix: str):
        self.kind, self.noun, self.prefix = kind, noun(kind), prefix

    def router(self) -> APIRouter:
        """The collection's router: the methods declared with `@route`, in their order here."""
        router = APIRouter(prefix=self.prefix, tags=[f"{self.noun}s"])
        for handler in vars(JobRoutes).values():
            declared: _Route | None = getattr(handler, "route", None)
            if declared is None or self.kind not in declared.kinds:
                continue
            options = dict(declared.options, name=declared.name.format(noun=self.noun))
            if declared.spec_body:  # service/api/openapi.py documents it
                options["openapi_extra"] = {"x-topk-body": self.kind}
            endpoint = getattr(self, handler.__name__)
            router.add_api_route(declared.path, endpoint, methods=[declared.method], **options)
        return router

    def load(self, store: Store, owner: Owner, job_id: str) -> JobRow:
        job = store.get_job(job_id, owner_id=owner.id)
        if job is None or job.kind != self.kind:  # another owner's job is just as absent
            raise ApiError("not_found", f"no {self.noun} {job_id!r}")
        return job

    # -- the routes ---------------------------------------------------------------------------

    @route(
        "POST",
        "",
        name="submit_{noun}",
        spec_body=True,
        status_code=201,
        response_model=JobRecord,
        responses={
            200: {"model": JobRecord, "description": "Same Idempotency-Key and body: the job"},
            **error_responses(
                "idempotency_conflict",
                "body_too_large",
                unsupported_media_type="The body is not application/json",
            ),
        },
    )
    async def submit(
        self,
        request: Request,
        settings: SettingsDep,
        writer: WriterDep,
        reconciler: ReconcilerDep,
        owner: OwnerDep,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        body = await self._json_body(request)
        try:
            # Off the event loop: validation touches the file system (local paths are resolved,
            # the storage root is checked, a dataset.json may be read), and a slow or hung
            # mount must not stop /healthz. Its work is bounded: the body is at most
            # TOPK_MAX_BODY_BYTES, brace patterns are counted before anything is expanded.
            validated = await run_in_threadpool(validate_spec, self.kind, body, settings)
        except InvalidSpec as exc:
            errors = [{"field": path, "message": message} for path, message in exc.problems]
            raise ApiError("invalid_spec", f"invalid {self.noun} spec: {exc}", errors) from None
        new_job = NewJob(
            kind=self.kind,
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
            job, created = await writer.create(new_job)
        except IdempotencyConflict as exc:
            raise ApiError("idempotency_conflict", str(exc)) from None
        crash_point(settings, "after_insert")
        if created:
            reconciler.wake()
        record = job_record(job, owner.name, settings.ray_dashboard_url)
        # pydantic writes the JSON itself (no dict of JSON-ready values, then json.dumps).
        return Response(
            record.model_dump_json(),
            status_code=201 if created else 200,
            media_type="application/json",
        )

    async def _json_body(self, request: Request) -> Any:
        """The request's body as strict JSON: 415 for another media type, 422 for bad JSON or
        none."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(
                "unsupported_media_type", f"send the spec as application/json, not {media_type}"
            )
        raw = await request.body()
        try:
            # Duplicate keys, 5,000-digit integers and 100,000-deep nesting are errors here,
            # not a silently kept last value or a 500.
            body = parse_json_document(raw) if raw else None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None
        if body is None:
            raise ApiError("invalid_spec", f"the body must be a {self.noun} spec (JSON object)")
        return body

    @route("GET", "", name="list_{noun}s", response_model=JobPage)
    def list_jobs(
        self,
        store: StoreDep,
        settings: SettingsDep,
        owner: OwnerDep,
        status: Annotated[
            list[JobStatus] | None,
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
                    "invalid_cursor",
                    "cursor must be a next_cursor value from a previous page",
                    [{"field": "query.cursor", "message": "not a cursor from this API"}],
                )
            before = int(cursor)
        rows = store.list_jobs(
            kind=self.kind, owner_id=owner.id, statuses=status, before_seq=before, limit=limit + 1
        )
        page, more = rows[:limit], len(rows) > limit
        return JobPage(
            items=[job_record(job, owner.name, settings.ray_dashboard_url) for job in page],
            next_cursor=str(page[-1].seq) if more else None,
        )

    @route("GET", "/{job_id}", name="get_{noun}", response_model=JobRecord, responses=_NOT_FOUND)
    def get(
        self, job_id: str, store: StoreDep, settings: SettingsDep, owner: OwnerDep
    ) -> JobRecord:
        """Status, spec, attempts, timestamps, latest metrics, history and the dashboard link."""
        job = self.load(store, owner, job_id)
        return job_detail(job, owner.name, settings.ray_dashboard_url, store)

    @route(
        "GET",
        "/{job_id}/metrics",
        name="{noun}_metrics",
        response_model=MetricsHistory,
        responses=_NOT_FOUND,
    )
    def metrics(self, job_id: str, store: StoreDep, owner: OwnerDep) -> MetricsHistory:
        """Per-epoch metrics, one entry per finished epoch (from the run's metrics.jsonl)."""
        job = self.load(store, owner, job_id)
        return MetricsHistory(job_id=job.id, epochs=read_metrics(job, job.id))

    @route(
        "GET",
        "/{job_id}/trials/{trial_id}/metrics",
        name="sweep_trial_metrics",
        kinds=("sweep",),
        response_model=TrialMetricsHistory,
        responses=error_responses("not_found", "storage_unavailable"),
    )
    def trial_metrics(
        self, job_id: str, trial_id: str, store: StoreDep, owner: OwnerDep
    ) -> TrialMetricsHistory:
        """Per-epoch metrics of one trial of the sweep's trial table (`trials[].trial_id`),
        from the trial's own run (ROOT/RUN/trials/trial-<trial_id>/metrics.jsonl)."""
        job = self.load(store, owner, job_id)
        if trial_id not in trial_ids(job):
            raise ApiError("not_found", f"no trial {trial_id!r} in sweep {job_id!r}")
        trial_run = run_files.trial_run_name(job.id, trial_id)
        return TrialMetricsHistory(
            job_id=job.id, trial_id=trial_id, epochs=read_metrics(job, trial_run)
        )

    @route(
        "GET",
        "/{job_id}/logs",
        name="{noun}_logs",
        response_class=PlainTextResponse,
        responses=error_responses("not_found", "not_started", "ray_unavailable"),
    )
    async def logs(
        self,
        job_id: str,
        store: StoreDep,
        launcher: LauncherDep,
        owner: OwnerDep,
        tail: Annotated[int, Query(ge=0, le=100_000, description="Last lines; 0 = all")] = 200,
        follow: bool = False,
    ) -> Response:
        """The driver logs of the latest attempt; `follow=true` streams until the job ends."""
        job = await run_in_threadpool(self.load, store, owner, job_id)
        if job.submission_id is None or launcher is None:
            raise ApiError("not_started", f"{self.noun} {job_id} has not been launched yet")
        submission_id = job.submission_id
        try:
            full = await run_in_threadpool(launcher.logs, submission_id)
        except LaunchError as exc:
            raise ApiError("ray_unavailable", f"could not read logs from Ray: {exc}") from None
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

    @route(
        "POST",
        "/{job_id}/cancel",
        name="cancel_{noun}",
        response_model=JobRecord,
        responses=error_responses("not_found", "already_finished"),
    )
    def cancel(
        self,
        job_id: str,
        store: StoreDep,
        launcher: LauncherDep,
        settings: SettingsDep,
        owner: OwnerDep,
    ) -> JobRecord:
        """Cancel (idempotent): a queued job never starts; a running one is stopped on Ray and
        keeps its checkpoints."""
        job = self.load(store, owner, job_id)
        while job.status not in TERMINAL:
            moved = store.transition(
                job.id, CANCELLED, f"cancelled by {owner.name}", expect=job.status
            )
            if moved is not None:
                if job.submission_id and launcher is not None:
                    # If Ray does not answer, the reconciler stops the job once it does.
                    with contextlib.suppress(LaunchError):
                        launcher.stop(job.submission_id)
                job = moved
                break
            job = self.load(store, owner, job_id)  # moved under us: look again
        if job.status != CANCELLED:
            raise ApiError("already_finished", f"{self.noun} {job_id} already {job.status}")
        return job_detail(job, owner.name, settings.ray_dashboard_url, store)


router = JobRoutes("train", "/v1/jobs").router()
