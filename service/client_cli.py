"""`topk serve | submit | status | logs | cancel | sweeps | token | demo`: the service's commands.

`topk train` / `topk sweep` (jobs/cli.py) run a spec directly on Ray; the commands here talk to
the job service over HTTP. Sweeps go through the service as `topk sweeps submit|status`, and
`topk submit` also takes a sweep file (one with a `search` key).
Heavy imports happen inside the handlers so `topk --help` stays fast. Exit codes:
jobs/contract/exit_codes.py.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from typing import Any

from jobs.contract import exit_codes

TERMINAL = ("succeeded", "failed", "cancelled")
NO_TOKEN = (
    "no API token: pass --token TOKEN or set TOPK_TOKEN (an admin makes one with "
    "`topk token create NAME`, run with the server's --data-dir or TOPK_DATA_DIR)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help="service URL (default: $TOPK_URL or http://127.0.0.1:8000)")
    client.add_argument("--token", help="bearer token (default: $TOPK_TOKEN)")

    serve = subparsers.add_parser(
        "serve",
        help="run the job service (starts a local Ray head when TOPK_RAY_ADDRESS is unset)",
        description="Run the job service. With no configuration: a local Ray head on free "
        "ports, SQLite and run storage under the data directory.",
    )
    serve.add_argument("--host", help="bind address (default: $TOPK_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $TOPK_PORT or 8000)")
    serve.add_argument(
        "--data-dir", help="database and runs folder (default: $TOPK_DATA_DIR or .topk)"
    )
    serve.add_argument(
        "--ray-cpus",
        type=int,
        default=max(4, 2 * (os.cpu_count() or 1)),
        help="logical CPUs of the local Ray head (default: %(default)s)",
    )
    serve.add_argument(
        "--dashboard-port",
        type=int,
        help="port of the local Ray head's dashboard on 127.0.0.1 (default: a free one; its "
        "URL is printed at start-up, log in with the token in DATA_DIR/ray-auth-token)",
    )
    serve.set_defaults(handler=run_serve)

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

    sweeps = subparsers.add_parser("sweeps", help="sweeps on the service (submit, status)")
    sweeps.set_defaults(handler=_usage(sweeps))
    sweep_commands = sweeps.add_subparsers(dest="sweeps_command", metavar="COMMAND")
    sweep_submit = sweep_commands.add_parser("submit", parents=[client], help="submit a sweep")
    sweep_submit.add_argument("spec", metavar="SPEC")
    sweep_submit.add_argument("--wait", action="store_true")
    sweep_submit.add_argument("--idempotency-key")
    sweep_submit.set_defaults(handler=run_submit, kind="sweep")
    sweep_status = sweep_commands.add_parser("status", parents=[client], help="list or show")
    sweep_status.add_argument("id", nargs="?", metavar="ID")
    sweep_status.add_argument("--status", action="append", dest="statuses")
    sweep_status.add_argument("--limit", type=int, default=20)
    sweep_status.set_defaults(handler=run_status, kind="sweep")

    token = subparsers.add_parser("token", help="admin: manage API tokens (writes the database)")
    token.set_defaults(handler=_usage(token))
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND")
    token_create = token_commands.add_parser(
        "create", help="create a token for NAME; the token is the last word printed"
    )
    token_create.add_argument("name", metavar="NAME")
    token_create.add_argument("--data-dir", help="default: $TOPK_DATA_DIR or .topk")
    token_create.add_argument(
        "--create",
        action="store_true",
        help="make the database when it does not exist yet (`topk serve` makes it otherwise)",
    )
    token_create.set_defaults(handler=run_token_create)
    token_list = token_commands.add_parser(
        "list", help="every token: its id, owner, created and revoked times (UTC), never a secret"
    )
    token_list.add_argument("--data-dir", help="default: $TOPK_DATA_DIR or .topk")
    token_list.set_defaults(handler=run_token_list)
    token_revoke = token_commands.add_parser(
        "revoke",
        help="revoke every live token of an owner, or one token by its id (`topk token list`); "
        "the API refuses it within a second",
    )
    token_revoke.add_argument("target", metavar="NAME|ID", help="an owner name or a token id")
    which = token_revoke.add_mutually_exclusive_group()
    which.add_argument(
        "--owner", dest="target_kind", action="store_const", const="owner", help="NAME is an owner"
    )
    which.add_argument(
        "--id", dest="target_kind", action="store_const", const="id", help="ID is a token id"
    )
    token_revoke.add_argument("--data-dir", help="default: $TOPK_DATA_DIR or .topk")
    token_revoke.set_defaults(handler=run_token_revoke)

    demo = subparsers.add_parser(
        "demo",
        help="long-tailed Fashion-MNIST: cross-entropy vs noised_topk_imbalanced, end to end",
    )
    demo.add_argument("--data-dir", default=".topk-demo", help="default: %(default)s")
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    demo.set_defaults(handler=run_demo)


def _usage(parser: argparse.ArgumentParser):
    """Handler of a command group run without its subcommand: its help, exit code USAGE."""

    def show(_args) -> int:
        parser.print_help(sys.stderr)
        return exit_codes.USAGE

    return show


def _fail(message: str, code: int = exit_codes.FAILED) -> int:
    print(f"topk: error: {message}", file=sys.stderr)
    return code


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
        return _fail(f"{exc}: {NO_TOKEN.removeprefix('no API token: ')}", exit_codes.SERVICE)
    if exc.status == 422 and spec is not None and exc.code in ("invalid_spec", "invalid_json"):
        return _fail(f"{spec}:\n{exc}", exit_codes.INVALID_SPEC)
    if exc.status == 422:
        return _fail(str(exc), exit_codes.USAGE)
    return _fail(str(exc), exit_codes.SERVICE)


# -- serve and token ---------------------------------------------------------------------------


def run_serve(args) -> int:
    from service.settings import Settings

    try:
        settings = Settings.from_env(
            data_dir=args.data_dir and _path(args.data_dir), port=args.port, host=args.host
        )
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    return serve(settings, ray_cpus=args.ray_cpus, dashboard_port=args.dashboard_port)


def port_problem(host: str, port: int) -> str | None:
    """Why nothing can listen on host:port, found by binding it the way uvicorn does
    (SO_REUSEADDR, so a closed server's lingering connections do not count); None when it is
    free. The socket is closed at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _announce(text: str) -> None:
    print(text, flush=True)


class _Terminated(Exception):
    """SIGTERM or SIGINT reached `topk serve`: shut down cleanly (the Ray head included)."""


def _terminate(signum, _frame) -> None:
    raise _Terminated(signal.Signals(signum).name)


def serve(settings, *, ray_cpus: int, dashboard_port: int | None = None, announce=_announce) -> int:
    """Run the API until SIGTERM or SIGINT; with no TOPK_RAY_ADDRESS, a local Ray head runs
    with it: the one recorded in the data dir when it is still alive (a killed server left it),
    else a new one (its dashboard on `dashboard_port` when given). The head is stopped when the
    server stops, and restarted in place if it dies while the server runs.

    A port that is taken (another `topk serve`) fails at once with exit code FAILED, before
    any Ray head is started or adopted: adopting the other server's head would have stopped
    it on the way out."""
    # Checked first: a second server on a busy port used to start (or adopt) a whole Ray head
    # and print its API address before uvicorn found the port taken.
    if problem := port_problem(settings.host, settings.port):
        return _fail(
            f"cannot serve on {settings.host}:{settings.port}: {problem} (another `topk serve`?"
            " choose another port with --port or TOPK_PORT)"
        )
    import uvicorn

    from service.app import create_app

    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers
    # that ends in `_Terminated` here, so the `finally` below stops the head (with the default
    # SIGTERM handler the process died on the spot and left the head running).
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    head = supervisor = None
    try:
        if settings.launch_mode == "ray" and not settings.ray_address:
            try:
                settings, head, supervisor = _embedded_head(
                    settings, ray_cpus, announce, dashboard_port=dashboard_port
                )
            except _PortTaken as exc:
                return _fail(str(exc))
            except RuntimeError as exc:
                return _fail(f"{exc}; see {settings.data_dir / 'ray-head.log'}")
        dashboard = settings.ray_dashboard_url or "(none: launch mode hold)"
        if head is not None:  # a browser is asked for the token once (a cookie keeps it)
            dashboard += f"  (log in with the token in {os.path.abspath(head.token_path)})"
        announce(f"Ray dashboard: {dashboard}")
        announce(f"database: {_redact(settings.database_url)}; runs: {settings.storage_url}")
        announce(f"API: http://{settings.host}:{settings.port}  (docs at /docs)")
        uvicorn.run(
            create_app(settings, head_supervisor=supervisor),
            host=settings.host,
            port=settings.port,
            log_level="warning",
        )
    except _Terminated:
        pass
    finally:
        for sig in previous:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if head is not None:
            announce("stopping the local Ray head ...")
            head.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_codes.OK


class _PortTaken(RuntimeError):
    """The pinned dashboard port is taken: nothing was started."""


def _embedded_head(settings, ray_cpus: int, announce, *, dashboard_port: int | None = None):
    """(settings pointing at the head, the head, its supervisor): the recorded head when it is
    alive, else a new one (its dashboard on `dashboard_port` when given; _PortTaken when that
    port is taken). The process environment gets the head's auth token (Ray's job client reads
    it there)."""
    import dataclasses

    from service.local_ray import HeadSupervisor, LocalRayHead

    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    state_file, log_path = data_dir / "ray-head.json", data_dir / "ray-head.log"
    replaced = None
    recorded = state_file.exists()
    head = LocalRayHead.adopt(state_file, log_path=log_path)
    if head is not None:
        announce(f"adopting the local Ray head left running (pid {head.pid}) with its jobs")
        if dashboard_port and head.requested_ports[1] != dashboard_port:
            announce(
                f"note: its dashboard stays on port {head.requested_ports[1]}; "
                f"--dashboard-port {dashboard_port} applies to a new head"
            )
    else:
        if dashboard_port and (problem := port_problem("127.0.0.1", dashboard_port)):
            raise _PortTaken(
                f"cannot put the Ray dashboard on 127.0.0.1:{dashboard_port}: {problem} "
                "(choose another --dashboard-port, or leave it out for a free one)"
            )
        if recorded:  # its jobs died with it: they move to a new attempt on the new head
            replaced = "the local Ray head recorded in the data dir is gone"
        head = LocalRayHead(
            ray_cpus,
            log_path=log_path,
            dashboard_port=dashboard_port,
            state_file=state_file,
            token_path=data_dir / "ray-auth-token",
        )
        announce(f"starting a local Ray head ({ray_cpus} logical CPUs) ...")
        head.start()
    os.environ.update(head.auth_env)
    settings = dataclasses.replace(
        settings,
        ray_address=head.dashboard_url,
        ray_dashboard_url=head.dashboard_url,
        # The jobs run this interpreter's `-m jobs` unless TOPK_JOB_PYTHON names another.
        job_python=settings.job_python if os.environ.get("TOPK_JOB_PYTHON") else sys.executable,
        # Jobs larger than this head are refused at submission, not queued forever.
        cluster_max_cpus=settings.cluster_max_cpus or float(head.num_cpus),
        cluster_max_gpus=settings.cluster_max_gpus or 0.0,
    )
    return settings, head, HeadSupervisor(head, replaced_reason=replaced, announce=announce)


def run_token_create(args) -> int:
    try:
        settings = _token_settings(args)
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    try:
        store = _token_store(settings, create=args.create)
        token = store.create_token(args.name)
    except _NoDatabase as exc:
        return _fail(f"{exc}, or pass --create to make a new one there", exit_codes.USAGE)
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    except Exception as exc:  # database unreachable
        return _fail(
            f"cannot write the token to {_redact(settings.database_url)}: {exc}",
            exit_codes.SERVICE,
        )
    print(f"created a token for {args.name} (store it now; it is not shown again): {token}")
    return exit_codes.OK


def _token_settings(args):
    """The settings of the database the server uses (environment and --data-dir); raises
    ValueError naming a bad variable."""
    from service.settings import Settings

    return Settings.from_env(data_dir=args.data_dir and _path(args.data_dir))


class _NoDatabase(Exception):
    """The token commands found no service database where the settings point."""


def _token_store(settings, *, create: bool = False):
    """The migrated Store of `settings`' database; says on stderr which database it is. A
    database that does not exist (no SQLite file, no schema in PostgreSQL) is _NoDatabase
    unless `create`: `topk token create` run from another directory used to make a new
    ./.topk/topk.db that no server reads. Raises when the database cannot be reached."""
    import sqlalchemy as sa

    from service.db import Store

    where = _redact(settings.database_url)
    if settings.is_sqlite:
        path = sa.engine.make_url(settings.database_url).database or ""
        if not create and not os.path.isfile(path):
            raise _NoDatabase(
                f"no database at {path}: run this command with the server's --data-dir or "
                "TOPK_DATA_DIR (or TOPK_DATABASE_URL); `topk serve` makes the database"
            )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.from_url(settings.database_url)
    if not create and not sa.inspect(store.engine).has_table("schema_migrations"):
        store.close()
        raise _NoDatabase(
            f"{where} holds no topk tables: run this command with the server's "
            "TOPK_DATABASE_URL; `topk serve` makes the tables"
        )
    store.migrate()
    print(f"topk token: database {where}", file=sys.stderr)
    return store


def _utc(timestamp: float | None) -> str:
    from datetime import UTC, datetime

    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def run_token_list(args) -> int:
    try:
        settings = _token_settings(args)
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    try:
        tokens = _token_store(settings).list_tokens()
    except _NoDatabase as exc:
        return _fail(str(exc), exit_codes.USAGE)
    except Exception as exc:  # database unreachable
        return _fail(
            f"cannot read the tokens in {_redact(settings.database_url)}: {exc}",
            exit_codes.SERVICE,
        )
    if not tokens:
        print("no tokens")
        return exit_codes.OK
    header = ("ID", "OWNER", "CREATED", "REVOKED")
    rows = [(t.id, t.owner, _utc(t.created_at), _utc(t.revoked_at)) for t in tokens]
    _print_rows(header, rows)
    return exit_codes.OK


def run_token_revoke(args) -> int:
    try:
        settings = _token_settings(args)
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    try:
        return _revoke(_token_store(settings), args.target, args.target_kind)
    except _NoDatabase as exc:
        return _fail(str(exc), exit_codes.USAGE)
    except Exception as exc:  # database unreachable
        return _fail(
            f"cannot revoke tokens in {_redact(settings.database_url)}: {exc}", exit_codes.SERVICE
        )


def _revoke(store, target: str, kind: str | None) -> int:
    """Revoke `target`: an owner (all their live tokens) or a token id (or a longer prefix of
    the token's hash); `kind` ("owner" | "id" | None) says which when it could be both."""
    tokens = store.list_tokens()
    owned = [t for t in tokens if t.owner == target] if kind != "id" else []
    by_id = []
    if kind != "owner" and re.fullmatch(r"[0-9a-fA-F]{8,64}", target):
        by_id = [t for t in tokens if t.token_hash.startswith(target.lower())]
    if owned and by_id:
        return _fail(
            f"{target!r} is both an owner and a token id: add --owner or --id", exit_codes.USAGE
        )
    if owned:
        live = [t.token_hash for t in owned if t.revoked_at is None]
        count = store.revoke_tokens(live)
        if count == 0:
            print(f"{target} has no live tokens (nothing to revoke)")
        else:
            print(f"revoked {count} token{'s' if count != 1 else ''} of {target}")
        return exit_codes.OK
    if len(by_id) > 1:
        return _fail(
            f"{len(by_id)} tokens have ids starting {target!r}: give more of it", exit_codes.USAGE
        )
    if by_id:
        (token,) = by_id
        if store.revoke_tokens([token.token_hash]) == 0:
            when = f" at {_utc(token.revoked_at)} UTC" if token.revoked_at is not None else ""
            print(f"token {token.id} of {token.owner} was already revoked{when}")
        else:
            print(f"revoked token {token.id} of {token.owner}")
        return exit_codes.OK
    what = {"owner": "no owner", "id": "no token id"}.get(kind or "", "no owner and no token id")
    return _fail(f"{what} {target!r} (see `topk token list`)", exit_codes.USAGE)


def _path(text: str):
    from pathlib import Path

    return Path(text)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# -- client commands ---------------------------------------------------------------------------


def run_submit(args) -> int:
    from jobs.contract.spec_files import SpecFileError, is_sweep_document, load_spec_file
    from service.client import ServiceError

    try:
        raw = load_spec_file(args.spec)
    except SpecFileError as exc:
        return _fail(str(exc), exit_codes.USAGE)
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
        return _fail(NO_TOKEN, exit_codes.USAGE)
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
            line += f"  epoch {metrics.get('epoch')}  " + _metric_text(metrics)
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


def _metric_text(metrics: dict[str, Any]) -> str:
    keys = [k for k in metrics if k.startswith(("val_top", "val_macro_top", "train_loss"))]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], int | float))


def run_status(args) -> int:
    from service.client import ServiceError

    try:
        with _client(args) as client:
            if args.id:
                kind = args.kind or _kind_of(args.id)
                _print_job(client.get(args.id, kind=kind))
                return exit_codes.OK
            kinds = [args.kind] if args.kind else ["train", "sweep"]
            rows = []
            for kind in kinds:
                rows += client.list(kind=kind, status=args.statuses, limit=args.limit)["items"]
            rows.sort(key=lambda job: job["created_at"], reverse=True)
            _print_table(rows[: args.limit])
            dashboard = _cluster_dashboard(client)
            if dashboard:
                print(f"Ray dashboard: {dashboard}")
            return exit_codes.OK
    except _NoToken:
        return _fail(NO_TOKEN, exit_codes.USAGE)
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


def _print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> None:
    """Aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print(indent + "  ".join(cell.ljust(width) for cell, width in cells).rstrip())


def _print_table(jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        print("no jobs")
        return
    header = ("ID", "KIND", "STATUS", "ATTEMPTS", "CREATED", "NAME", "REASON")
    rows = [
        (
            job["id"], job["kind"], job["status"], str(job["attempts"]),
            job["created_at"][:19].replace("T", " "), job.get("name") or "-",
            (job.get("status_reason") or "")[:60],
        )
        for job in jobs
    ]  # fmt: skip
    _print_rows(header, rows)


def _print_job(job: dict[str, Any]) -> None:
    fields = [
        ("id", job["id"]), ("kind", job["kind"]), ("status", job["status"]),
        ("reason", job.get("status_reason")), ("attempts", job["attempts"]),
        ("created", job["created_at"]), ("started", job.get("started_at")),
        ("finished", job.get("finished_at")), ("storage", job.get("storage")),
        ("dashboard", job.get("dashboard_url")),
    ]  # fmt: skip
    for label, value in fields:
        if value not in (None, ""):
            print(f"{label + ':':<11}{value}")
    if job.get("latest_metrics"):
        print(
            f"{'metrics:':<11}epoch {job['latest_metrics'].get('epoch')}  "
            + _metric_text(job["latest_metrics"])
        )
    if job["kind"] == "sweep":
        _print_trials(job)


def _print_trials(job: dict[str, Any]) -> None:
    """A sweep's trial table (live while the sweep runs: jobs/sweep.py rewrites sweep.json as
    trials report) and its best trial as one line."""
    from jobs.contract.sweep import describe_best

    spec = job.get("spec") or {}
    metric, mode = spec.get("metric", "val_top5"), spec.get("mode", "max")
    trials = [t for t in job.get("trials") or [] if isinstance(t, dict)]
    if not trials:
        if job["status"] not in TERMINAL:
            print(f"{'trials:':<11}none reported yet")
        return
    paths = sorted({path for t in trials for path in (t.get("params") or {})})
    header = ("TRIAL", "STATUS", "EPOCH", *paths, metric)
    rows = []
    for trial in trials:
        params, metrics = trial.get("params") or {}, trial.get("metrics") or {}
        value = metrics.get(metric)
        rows.append(
            (
                str(trial.get("trial_id", "-")), str(trial.get("status", "-")),
                str(metrics.get("epoch", "-")),
                *[_value_text(params.get(path)) for path in paths],
                f"{value:.4f}" if isinstance(value, int | float) else "-",
            )
        )  # fmt: skip
    print("trials:")
    _print_rows(header, rows, indent="  ")
    best_params = job.get("best_params")
    if best_params is not None:
        best = _best_trial(trials, metric, mode, params=best_params)
        label = "best:"
    else:  # still running: the best trial so far
        best = _best_trial(trials, metric, mode)
        best_params = best.get("params") if best else None
        label = "best so far:"
    if best_params is not None:
        value = (best or {}).get("metrics", {}).get(metric)
        trial_id = (best or {}).get("trial_id")
        print(f"{label} {describe_best(best_params, metric=metric, value=value, trial=trial_id)}")


def _best_trial(
    trials: list[dict[str, Any]], metric: str, mode: str, *, params: dict | None = None
) -> dict[str, Any] | None:
    """The trial with the best `metric` (among those with `params` when given)."""
    scored = [
        t
        for t in trials
        if isinstance((t.get("metrics") or {}).get(metric), int | float)
        and (params is None or t.get("params") == params)
    ]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t["metrics"][metric])


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


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
        return _fail(NO_TOKEN, exit_codes.USAGE)
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
        return _fail(NO_TOKEN, exit_codes.USAGE)
    except ServiceError as exc:
        return _service_error(exc)
    print(f"{job['id']}: {job['status']}")
    return exit_codes.OK


def run_demo(args) -> int:
    from service.demo import run_demo as demo

    return demo(args)
