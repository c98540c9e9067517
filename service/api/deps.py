"""The API's dependencies: what the routes use, built once per app when it starts
(`build_services`), and handed to each route through FastAPI dependencies (`SettingsDep`,
`StoreDep`, `LauncherDep`, ...), so a test can swap one with `app.dependency_overrides`.
`OwnerDep` is the bearer-token check: the owner a valid token belongs to, 401 otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ApiError
from service.job_writer import JobWriter
from service.launcher import RayLauncher
from service.observability import ServiceMetrics
from service.reconciler import Reconciler
from service.settings import Settings
from service.store import Store, hash_token


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

    def __init__(self, store: Store, ttl_s: float = 0.5, max_entries: int = 10_000):
        self.store, self.ttl_s, self.max_entries = store, ttl_s, max_entries
        self._entries: dict[str, tuple[Owner, float]] = {}

    def cached(self, token: str) -> Owner | None:
        hit = self._entries.get(hash_token(token))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def lookup(self, token: str) -> Owner | None:
        key = hash_token(token)
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
    """Everything the app's routes and background threads share; one per app."""

    settings: Settings
    store: Store
    launcher: RayLauncher | None
    reconciler: Reconciler
    metrics: ServiceMetrics
    tokens: TokenCache
    writer: JobWriter


def build_services(settings: Settings, launcher: RayLauncher | None = None) -> Services:
    """The app's services for `settings` (connects nothing yet: the store's engine and Ray's
    client connect on first use). Launch mode `ray` needs a Ray address or a `launcher`."""
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.from_url(settings.database_url)
    if launcher is None and settings.launch_mode == "ray":
        if not settings.ray_address:
            raise ValueError("TOPK_RAY_ADDRESS is not set (or run `topk serve`, which starts Ray)")
        launcher = RayLauncher(settings.ray_address)
    metrics = ServiceMetrics()
    reconciler = Reconciler(store, launcher, settings, on_launch=metrics.launches.inc)
    return Services(
        settings, store, launcher, reconciler, metrics, TokenCache(store), JobWriter(store)
    )


# The dependencies are async: a sync one would cost a thread-pool hop on every request.


def _services(request: Request) -> Services:
    return request.app.state.services


async def get_settings(request: Request) -> Settings:
    return _services(request).settings


async def get_store(request: Request) -> Store:
    return _services(request).store


async def get_launcher(request: Request) -> RayLauncher | None:
    """Ray's job client; None in launch mode `hold`."""
    return _services(request).launcher


async def get_reconciler(request: Request) -> Reconciler:
    return _services(request).reconciler


async def get_writer(request: Request) -> JobWriter:
    return _services(request).writer


async def get_metrics(request: Request) -> ServiceMetrics:
    return _services(request).metrics


async def get_tokens(request: Request) -> TokenCache:
    return _services(request).tokens


_bearer = HTTPBearer(auto_error=False, description="A token from `topk token create NAME`.")


async def current_owner(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    tokens: Annotated[TokenCache, Depends(get_tokens)],
) -> Owner:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError("unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    owner = tokens.cached(credentials.credentials)
    if owner is None:
        owner = await run_in_threadpool(tokens.lookup, credentials.credentials)
    if owner is None:
        raise ApiError("unauthorized", "invalid or revoked token")
    return owner


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
LauncherDep = Annotated[RayLauncher | None, Depends(get_launcher)]
ReconcilerDep = Annotated[Reconciler, Depends(get_reconciler)]
WriterDep = Annotated[JobWriter, Depends(get_writer)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
OwnerDep = Annotated[Owner, Depends(current_owner)]
