"""The pages a person opens in a browser, served by the API process from files in this package:
the job UI at /ui/ (service/ui/) and the OpenAPI docs at /docs (Swagger UI, vendored in
service/swagger_ui/). Nothing is fetched from anywhere else, so both work with no internet.

The UI is static: it reads the same JSON API as the CLI with the bearer token the person types
in once (kept in the tab's sessionStorage, sent as `Authorization: Bearer`, never in a URL).
Every response here carries a Content-Security-Policy that lets a page load from and talk to
this origin only: it cannot send anything elsewhere, and markup smuggled into a job name could
not run a script even if it reached the DOM.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

_PACKAGE = Path(__file__).resolve().parents[1]  # service/
UI_DIR = _PACKAGE / "ui"
SWAGGER_DIR = _PACKAGE / "swagger_ui"

# Only these files are served, by name: no directory listing, no path taken from the URL.
_UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# Swagger UI starts from one inline script (allowed by its hash, not by 'unsafe-inline'), sets
# style attributes, and its stylesheet draws icons from data: URLs.
_DOCS_POLICY = (
    "default-src 'none'; script-src 'self' {script_hashes}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def security_headers(policy: str, *, cache: str = "no-cache") -> dict[str, str]:
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        # no-cache: revalidated on every load, so a new release's UI is picked up at once
        "Cache-Control": cache,
    }


def _file(directory: Path, files: dict[str, str], name: str, policy: str, cache: str):
    media_type = files.get(name)
    if media_type is None:
        raise HTTPException(404, f"no file {name!r} here")
    return FileResponse(
        directory / name, media_type=media_type, headers=security_headers(policy, cache=cache)
    )


def docs_page(app: FastAPI) -> tuple[bytes, str]:
    """Swagger UI's page for `app` with local asset URLs, and the policy that allows its inline
    start-up script by hash. URLs are relative to /docs, so the page also works behind a path
    prefix."""
    page = get_swagger_ui_html(
        openapi_url=(app.openapi_url or "/openapi.json").lstrip("/"),
        title=f"{app.title} - API docs",
        swagger_js_url="docs/assets/swagger-ui-bundle.js",
        swagger_css_url="docs/assets/swagger-ui.css",
        swagger_favicon_url="docs/assets/favicon-32x32.png",
        # No calls to swagger.io's online validator: the page talks to this server only.
        swagger_ui_parameters={"validatorUrl": None},
    )
    body = bytes(page.body)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(body)
    )
    return body, _DOCS_POLICY.format(script_hashes=hashes)


def install_pages(app: FastAPI) -> None:
    """Add the UI (/ui/) and the offline docs (/docs) to `app`, which must be built with
    `docs_url=None` (FastAPI's own /docs loads Swagger UI from a CDN)."""
    router = APIRouter(include_in_schema=False)
    built: list[tuple[bytes, str]] = []  # the docs page, made on its first request

    @router.get("/ui")
    def ui_root() -> Response:
        # Relative: the page's relative URLs (app.js, ../v1/...) resolve under /ui/, also
        # behind a path prefix.
        return RedirectResponse("ui/", status_code=307)

    @router.get("/ui/")
    def ui_index() -> Response:
        return _file(UI_DIR, _UI_FILES, "index.html", UI_POLICY, "no-cache")

    @router.get("/ui/{name}")
    def ui_file(name: str) -> Response:
        return _file(UI_DIR, _UI_FILES, name, UI_POLICY, "no-cache")

    @router.get("/docs")
    def docs() -> Response:
        if not built:
            built.append(docs_page(app))
        body, policy = built[0]
        return HTMLResponse(body, headers=security_headers(policy))

    @router.get("/docs/assets/{name}")
    def docs_asset(name: str) -> Response:
        return _file(SWAGGER_DIR, _SWAGGER_FILES, name, UI_POLICY, "public, max-age=3600")

    app.include_router(router)
