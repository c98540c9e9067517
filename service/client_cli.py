"""`topk submit | status | logs | cancel | sweeps`: the commands that talk to the job service
over HTTP (service/client.py), with the token of --token or TOPK_TOKEN.

`topk train` / `topk sweep` (jobs/cli.py) run a spec directly on Ray; sweeps go through the
service as `topk sweeps submit|status`, and `topk submit` also takes a sweep file (one with a
`search` key). The server's own commands are elsewhere: `topk serve` (serve_cli.py), `topk token`
(token_cli.py), `topk demo` (demo.py). Heavy imports happen inside the handlers so `topk --help`
stays fast. Exit codes: jobs/contract/exit_codes.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from jobs.contract import exit_codes
from service.console import fail, usage
from service.job_status import TERMINAL
from service.job_tables import metric_text, print_job, print_table

NO_TOKEN = (
    "no API token: pass --token TOKEN or set TOPK_TOKEN (an admin makes one with "
    "`topk token create NAME`, run with the server's --data-dir or TOPK_DATA_DIR)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help="service URL (default: $TOPK_URL or http://127.0.0.1:8000)")
    client.add_argument("--token", help="bearer token (default: $TOPK_TOKEN)")
    _add_job_commands(subparsers, client)
    _add_sweep_commands(subparsers, client)


def _add_job_commands(subparsers: argparse._SubParsersAction, client) -> None:
    submit = subparsers.add_parser(
        "submit", parents=[client], help="submit a training (or sweep) spec to the service"
    )
    submit.add_argument("spec", metavar="SPEC", help="spec file (YAML or JSON)")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--idempotency-key", help="retrying with the same key never duplicates")
    submit.set_defaults(handler=run_submit, kind=None)

    status = subparsers.add_parser("status", parents=[client], help="list jobs, or show one")
    status.add_argument("id", nargs="?", metavar="ID")
    status.add_argument("--status", action="append", dest="statuses", help="filter by status")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(handler=run_status, kind=None)

    logs = subparsers.add_parser("logs", parents=[client], help="print a job's logs")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--tail", type=int, default=200, help="last lines (0 = all)")
    logs.set_defaults(handler=run_logs)

    cancel = subparsers.add_parser("cancel", parents=[client], help="cancel a job or sweep")
    cancel.add_argument("id", metavar="ID")
    cancel.set_defaults(handler=run_cancel)


def _add_sweep_commands(subparsers: argparse._SubParsersAction, client) -> None:
    sweeps = subparsers.add_parser("sweeps", help="sweeps on the service (submit, status)")
    sweeps.set_defaults(handler=usage(sweeps))
    commands = sweeps.add_subparsers(dest="sweeps_command", metavar="COMMAND")
    submit = commands.add_parser("submit", parents=[client], help="submit a sweep")
    submit.add_argument("spec", metavar="SPEC")
    submit.add_argument("--wait", action="store_true")
    submit.add_argument("--idempotency-key")
    submit.set_defaults(handler=run_submit, kind="sweep")
    status = commands.add_parser("status", parents=[client], help="list or show")
    status.add_argument("id", nargs="?", metavar="ID")
    status.add_argument("--status", action="append", dest="statuses")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(handler=run_status, kind="sweep")


def _kind_of(job_id: str) -> str:
    return "sweep" if job_id.startswith("sweep-") else "train"


class _NoToken(Exception):
    """A client command was run without --token and without TOPK_TOKEN."""


def _client(args):
    """The service client of a client command; raises _NoToken before any request when there
    is no token to send (the server could only answer 401)."""
    from service.client import ServiceClient

    token = args.token or os.environ.get("TOPK_TOKEN")
    if not token:
        raise _NoToken
    return ServiceClient(args.url, token)


def _service_error(exc, *, spec: str | None = None) -> int:
    """Print a ServiceError and return its exit code: an invalid spec (`spec`: the file
    submitted) is INVALID_SPEC, another refused argument USAGE, anything else the service
    refused or could not be reached SERVICE."""
    if exc.status == 401:
        return fail(f"{exc}: {NO_TOKEN.removeprefix('no API token: ')}", exit_codes.SERVICE)
    if exc.status == 422 and spec is not None and exc.code in ("invalid_spec", "invalid_json"):
        return fail(f"{spec}:\n{exc}", exit_codes.INVALID_SPEC)
    if exc.status == 422:
        return fail(str(exc), exit_codes.USAGE)
    return fail(str(exc), exit_codes.SERVICE)


# -- the commands ------------------------------------------------------------------------------


def run_submit(args) -> int:
    from jobs.contract.spec_files import SpecFileError, is_sweep_document, load_spec_file
    from service.client import ServiceError

    try:
        raw = load_spec_file(args.spec)
    except SpecFileError as exc:
        return fail(str(exc), exit_codes.USAGE)
    kind = args.kind or ("sweep" if is_sweep_document(raw) else "train")
    raw = absolutize_local_paths(raw, kind=kind)
    try:
        with _client(args) as client:
            job = client.submit(raw, kind=kind, idempotency_key=args.idempotency_key)
            print(f"submitted {job['id']} ({job['status']})")
            if not args.wait:
                return exit_codes.OK
            return _wait(client, job["id"], kind)
    except _NoToken:
        return fail(NO_TOKEN, exit_codes.USAGE)
    except ServiceError as exc:
        return _service_error(exc, spec=args.spec)


def absolutize_local_paths(raw: object, *, kind: str, cwd: str | None = None) -> object:
    """The spec with its relative local paths (data.train, data.val, model.pretrained, storage)
    made absolute against the client's working directory: the server and the Ray workers run
    elsewhere, so `runs/data/x/dataset.json` must mean what it means where the user typed it.
    URLs (`s3://...`, `file://...`) and absolute paths are left alone; anything that is not the
    expected shape is passed through for the server to reject with a field path."""
    import copy
    import os

    if not isinstance(raw, dict):
        return raw
    base = cwd or os.getcwd()

    def fix(value: object) -> object:
        if isinstance(value, str) and value and "://" not in value and not value.startswith("/"):
            return os.path.normpath(os.path.join(base, value))
        if isinstance(value, list):
            return [fix(item) for item in value]
        return value

    spec = copy.deepcopy(raw)
    train = spec.get("train") if kind == "sweep" else spec
    if not isinstance(train, dict):
        return spec
    data = train.get("data")
    if isinstance(data, dict):
        for key in ("train", "val"):
            if key in data:
                data[key] = fix(data[key])
    model = train.get("model")
    if isinstance(model, dict) and "pretrained" in model:
        model["pretrained"] = fix(model["pretrained"])
    if "storage" in train:
        train["storage"] = fix(train["storage"])
    return spec


def _wait(client, job_id: str, kind: str, *, poll_s: float = 2.0, quiet: bool = False) -> int:
    """Poll until the job ends, printing a line when its status or epoch changes."""
    last = None
    while True:
        job = client.get(job_id, kind=kind)
        metrics = job.get("latest_metrics") or {}
        line = f"{job_id}  {job['status']:<9}"
        if metrics:
            line += f"  epoch {metrics.get('epoch')}  " + metric_text(metrics)
        elif job.get("status_reason"):
            line += f"  {job['status_reason']}"
        if line != last and not quiet:
            print(line, flush=True)
            last = line
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded" and job.get("status_reason"):
                print(f"{job_id}: {job['status_reason']}", file=sys.stderr)
            return exit_codes.OK if job["status"] == "succeeded" else exit_codes.FAILED
        time.sleep(poll_s)


def run_status(args) -> int:
    from service.client import ServiceError

    try:
        with _client(args) as client:
            if args.id:
                kind = args.kind or _kind_of(args.id)
                print_job(client.get(args.id, kind=kind))
                return exit_codes.OK
            kinds = [args.kind] if args.kind else ["train", "sweep"]
            rows = []
            for kind in kinds:
                rows += client.list(kind=kind, status=args.statuses, limit=args.limit)["items"]
            rows.sort(key=lambda job: job["created_at"], reverse=True)
            print_table(rows[: args.limit])
            dashboard = _cluster_dashboard(client)
            if dashboard:
                print(f"Ray dashboard: {dashboard}")
            return exit_codes.OK
    except _NoToken:
        return fail(NO_TOKEN, exit_codes.USAGE)
    except ServiceError as exc:
        return _service_error(exc)


def _cluster_dashboard(client) -> str | None:
    """The Ray dashboard URL of the service's cluster (GET /v1/info); None when the service
    has none (launch mode hold) or predates /v1/info."""
    from service.client import ServiceError

    try:
        return client.info().get("ray_dashboard_url")
    except ServiceError as exc:
        if exc.status == 404:
            return None
        raise


# CSI (colours, cursor moves), OSC (titles, links, ended by BEL or ESC \) and two-byte escapes.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# The start of an escape sequence that a chunk ends in the middle of.
_ANSI_UNFINISHED = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?)?\Z")


class AnsiStripper:
    """Removes ANSI escape sequences from text that arrives in chunks: a sequence split between
    two chunks is held back until the rest of it arrives."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, chunk: str) -> str:
        text, self._held = self._held + chunk, ""
        unfinished = _ANSI_UNFINISHED.search(text)
        if unfinished is not None and len(text) - unfinished.start() <= 256:
            text, self._held = text[: unfinished.start()], text[unfinished.start() :]
        return _ANSI_ESCAPE.sub("", text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return _ANSI_ESCAPE.sub("", held).replace("\x1b", "")


def _keeps_colour(stream) -> bool:
    """Colours go to a terminal only (and not even there with NO_COLOR set): piped or
    redirected output gets plain text."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def run_logs(args) -> int:
    from service.client import ServiceError

    kind = _kind_of(args.id)
    stripper = None if _keeps_colour(sys.stdout) else AnsiStripper()

    def write(text: str) -> None:
        sys.stdout.write(stripper.feed(text) if stripper else text)
        sys.stdout.flush()

    try:
        with _client(args) as client:
            if not args.follow:
                write(client.logs(args.id, kind=kind, tail=args.tail))
            else:
                for chunk in client.follow_logs(args.id, kind=kind, tail=args.tail):
                    write(chunk)
    except _NoToken:
        return fail(NO_TOKEN, exit_codes.USAGE)
    except ServiceError as exc:
        return _service_error(exc)
    finally:
        if stripper is not None:
            sys.stdout.write(stripper.flush())
            sys.stdout.flush()
    return exit_codes.OK


def run_cancel(args) -> int:
    from service.client import ServiceError

    try:
        with _client(args) as client:
            job = client.cancel(args.id, kind=_kind_of(args.id))
    except _NoToken:
        return fail(NO_TOKEN, exit_codes.USAGE)
    except ServiceError as exc:
        return _service_error(exc)
    print(f"{job['id']}: {job['status']}")
    return exit_codes.OK
