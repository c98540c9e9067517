"""The app factory: `create_app(settings)` builds the FastAPI app; its services are built, the
database migrated and the background threads started when the app starts (not at import or
construction), and stopped when it stops."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.api.deps import build_services
from service.api.errors import error_responses, install_error_handlers
from service.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from service.api.openapi import install_openapi_bodies
from service.api.pages import install_pages
from service.api.routes import health, info, jobs, sweeps
from service.launcher import RayLauncher
from service.local_ray import HeadSupervisor
from service.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    launcher: RayLauncher | None = None,
    run_reconciler: bool = True,
    head_supervisor: HeadSupervisor | None = None,
) -> FastAPI:
    """The API app. Settings default to the environment; `launcher` replaces the Ray client
    that settings name; `head_supervisor` (`topk serve`'s embedded Ray head) runs alongside
    the reconciler."""
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
        # /docs is served from the package (service/api/pages.py), not from a CDN; /redoc is off.
        docs_url=None,
        redoc_url=None,
        responses=error_responses(
            unauthorized="Missing or invalid token", invalid_request="Invalid input"
        ),
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    install_error_handlers(app)
    for routes in (health, info, jobs, sweeps):
        app.include_router(routes.router)
    install_openapi_bodies(app)
    install_pages(app)
    return app
