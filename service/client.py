"""A small HTTP client of the job service (used by the `topk` command line and the demo)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ServiceError(Exception):
    """The service answered with an error, or could not be reached (status 0). `code` is the
    error body's `error` (e.g. "invalid_spec", "not_found") when the service sent one."""

    def __init__(
        self,
        status: int,
        message: str,
        errors: list[dict] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.errors, self.code = status, message, errors or [], code

    def __str__(self) -> str:
        if not self.errors:
            return self.message
        return "\n".join(f"{e.get('field') or '(body)'}: {e.get('message')}" for e in self.errors)


class ServiceClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("TOPK_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("TOPK_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(0, f"cannot reach the service at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ServiceError(
                    response.status_code,
                    body.get("message", response.text),
                    body.get("errors"),
                    body.get("error"),
                )
            except (ValueError, AttributeError):
                raise ServiceError(response.status_code, response.text[:500]) from None
        return response

    @staticmethod
    def _collection(kind: str) -> str:
        return "/v1/sweeps" if kind == "sweep" else "/v1/jobs"

    def submit(
        self, spec: dict[str, Any], *, kind: str = "train", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """POST a spec; a fresh Idempotency-Key per call unless given, so a retried call
        made with the same key never creates a second job."""
        key = idempotency_key or uuid.uuid4().hex
        return self._request(
            "POST", self._collection(kind), json=spec, headers={"Idempotency-Key": key}
        ).json()

    def get(self, job_id: str, *, kind: str = "train") -> dict[str, Any]:
        return self._request("GET", f"{self._collection(kind)}/{job_id}").json()

    def list(
        self,
        *,
        kind: str = "train",
        status: list[str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", self._collection(kind), params=params).json()

    def metrics(self, job_id: str, *, kind: str = "train") -> list[dict[str, Any]]:
        return self._request("GET", f"{self._collection(kind)}/{job_id}/metrics").json()["epochs"]

    def cancel(self, job_id: str, *, kind: str = "train") -> dict[str, Any]:
        return self._request("POST", f"{self._collection(kind)}/{job_id}/cancel").json()

    def logs(self, job_id: str, *, kind: str = "train", tail: int = 200) -> str:
        return self._request(
            "GET", f"{self._collection(kind)}/{job_id}/logs", params={"tail": tail}
        ).text

    def follow_logs(self, job_id: str, *, kind: str = "train", tail: int = 200) -> Iterator[str]:
        path = f"{self._collection(kind)}/{job_id}/logs"
        try:
            with self._http.stream(
                "GET", path, params={"tail": tail, "follow": "true"}, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    body = response.json()
                    raise ServiceError(
                        response.status_code, body.get("message", ""), code=body.get("error")
                    )
                yield from response.iter_text()
        except httpx.HTTPError as exc:
            raise ServiceError(0, f"log stream interrupted: {exc}") from None

    def info(self) -> dict[str, Any]:
        """The service's version and its cluster's Ray dashboard URL (GET /v1/info)."""
        return self._request("GET", "/v1/info").json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def ready(self) -> dict[str, Any]:
        return self._request("GET", "/readyz").json()
