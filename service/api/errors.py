"""The error map: the one place where the service's errors become HTTP statuses and bodies.

Every error leaves as {"error": code, "message": text, "errors": [{"field": path, "message":
text}]}. Routes raise `ApiError(code, message)`; its status comes from `HTTP_STATUS`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorBody

log = logging.getLogger("topk.service")

HTTP_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "not_found": 404,
    "already_finished": 409,
    "idempotency_conflict": 409,
    "not_started": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_cursor": 422,
    "invalid_json": 422,
    "invalid_request": 422,
    "invalid_spec": 422,
    "internal_error": 500,
    "not_ready": 503,
    "ray_unavailable": 503,
    "storage_unavailable": 503,
}


class ApiError(Exception):
    """An error the API answers with on purpose: `code` is a key of HTTP_STATUS, `errors`
    the (field path, message) details."""

    def __init__(self, code: str, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = HTTP_STATUS[code], code, message
        self.errors = errors or []


def error_responses(*codes: str, **described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error codes (`described`: code=description)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        responses[HTTP_STATUS[code]] = {"model": ErrorBody}
    for code, description in described.items():
        responses[HTTP_STATUS[code]] = {"model": ErrorBody, "description": description}
    return responses


def error_response(
    code: str, message: str, errors=None, headers=None, *, status: int | None = None
) -> JSONResponse:
    body = {"error": code, "message": message, "errors": errors or []}
    return JSONResponse(body, status_code=status or HTTP_STATUS[code], headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.code, exc.message, exc.errors, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for error in exc.errors():
            loc = [str(part) for part in error.get("loc", ())]
            message = error.get("msg", "invalid value")
            errors.append({"field": ".".join(loc), "message": message})
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return error_response("invalid_request", text, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers: unknown routes and methods, and pages.py's unknown files.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(code, str(exc.detail), headers=exc.headers, status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response("internal_error", "internal error; see the server log")
