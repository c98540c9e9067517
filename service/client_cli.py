"""`topk serve | submit | status | logs | cancel | sweeps | token | demo`: the service's commands.

`topk train` / `topk sweep` (jobs/cli.py) run a spec directly on Ray; the commands here talk to
the job service over HTTP. Sweeps go through the service as `topk sweeps submit|status`, and
`topk submit` also takes a sweep file (one with a `search` key).
Heavy imports happen inside the handlers so `topk --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


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
    """Handler of a command group run without its subcommand: its help, exit code 2."""

    def show(_args) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def _fail(message: str, code: int = 1) -> int:
    print(f"topk: error: {message}", file=sys.stderr)
    return code


def _kind_of(job_id: str) -> str:
    return "sweep" if job_id.startswith("sweep-") else "train"


def _client(args):
    from service.client import ServiceClient

    return ServiceClient(args.url, args.token)


# -- serve and token ---------------------------------------------------------------------------


def run_serve(args) -> int:
    from service.settings import Settings

    try:
        settings = Settings.from_env(
            data_dir=args.data_dir and _path(args.data_dir), port=args.port, host=args.host
        )
    except ValueError as exc:
        return _fail(str(exc), 2)
    return serve(settings, ray_cpus=args.ray_cpus)


def _announce(text: str) -> None:
    print(text, flush=True)


class _Terminated(Exception):
    """SIGTERM or SIGINT reached `topk serve`: shut down cleanly (the Ray head included)."""


def _terminate(signum, _frame) -> None:
    raise _Terminated(signal.Signals(signum).name)


def serve(settings, *, ray_cpus: int, announce=_announce) -> int:
    """Run the API until SIGTERM or SIGINT; with no TOPK_RAY_ADDRESS, a local Ray head runs
    with it: the one recorded in the data dir when it is still alive (a killed server left it),
    else a new one. The head is stopped when the server stops, and restarted in place if it
    dies while the server runs."""
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
                settings, head, supervisor = _embedded_head(settings, ray_cpus, announce)
            except RuntimeError as exc:
                return _fail(f"{exc}; see {settings.data_dir / 'ray-head.log'}")
        announce(f"Ray dashboard: {settings.ray_dashboard_url or '(none: launch mode hold)'}")
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
    return 0


def _embedded_head(settings, ray_cpus: int, announce):
    """(settings pointing at the head, the head, its supervisor): the recorded head when it is
    alive, else a new one. The process environment gets the head's auth token (Ray's job client
    reads it there)."""
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
    else:
        if recorded:  # its jobs died with it: they move to a new attempt on the new head
            replaced = "the local Ray head recorded in the data dir is gone"
        head = LocalRayHead(
            ray_cpus,
            log_path=log_path,
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
    from service.db import Store
    from service.settings import Settings

    try:
        settings = Settings.from_env(data_dir=args.data_dir and _path(args.data_dir))
        if settings.is_sqlite:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.from_url(settings.database_url)
        store.migrate()
        token = store.create_token(args.name)
    except ValueError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:  # database unreachable
        return _fail(f"cannot write the token to {_redact(settings.database_url)}: {exc}")
    print(f"created a token for {args.name} (store it now; it is not shown again): {token}")
    return 0


def _token_settings(args):
    """The settings of the database the server uses (environment and --data-dir); raises
    ValueError naming a bad variable."""
    from service.settings import Settings

    return Settings.from_env(data_dir=args.data_dir and _path(args.data_dir))


def _token_store(settings):
    """The migrated Store of `settings`' database (raises when it cannot be reached)."""
    from service.db import Store

    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.from_url(settings.database_url)
    store.migrate()
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
        return _fail(str(exc), 2)
    try:
        tokens = _token_store(settings).list_tokens()
    except Exception as exc:  # database unreachable
        return _fail(f"cannot read the tokens in {_redact(settings.database_url)}: {exc}")
    if not tokens:
        print("no tokens")
        return 0
    header = ("ID", "OWNER", "CREATED", "REVOKED")
    rows = [(t.id, t.owner, _utc(t.created_at), _utc(t.revoked_at)) for t in tokens]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def run_token_revoke(args) -> int:
    try:
        settings = _token_settings(args)
    except ValueError as exc:
        return _fail(str(exc), 2)
    try:
        return _revoke(_token_store(settings), args.target, args.target_kind)
    except Exception as exc:  # database unreachable
        return _fail(f"cannot revoke tokens in {_redact(settings.database_url)}: {exc}")


def _revoke(store, target: str, kind: str | None) -> int:
    """Revoke `target`: an owner (all their live tokens) or a token id (or a longer prefix of
    the token's hash); `kind` ("owner" | "id" | None) says which when it could be both."""
    import re

    tokens = store.list_tokens()
    owned = [t for t in tokens if t.owner == target] if kind != "id" else []
    by_id = []
    if kind != "owner" and re.fullmatch(r"[0-9a-fA-F]{8,64}", target):
        by_id = [t for t in tokens if t.token_hash.startswith(target.lower())]
    if owned and by_id:
        return _fail(f"{target!r} is both an owner and a token id: add --owner or --id", 2)
    if owned:
        live = [t.token_hash for t in owned if t.revoked_at is None]
        count = store.revoke_tokens(live)
        if count == 0:
            print(f"{target} has no live tokens (nothing to revoke)")
        else:
            print(f"revoked {count} token{'s' if count != 1 else ''} of {target}")
        return 0
    if len(by_id) > 1:
        return _fail(f"{len(by_id)} tokens have ids starting {target!r}: give more of it", 2)
    if by_id:
        (token,) = by_id
        if store.revoke_tokens([token.token_hash]) == 0:
            when = f" at {_utc(token.revoked_at)} UTC" if token.revoked_at is not None else ""
            print(f"token {token.id} of {token.owner} was already revoked{when}")
        else:
            print(f"revoked token {token.id} of {token.owner}")
        return 0
    what = {"owner": "no owner", "id": "no token id"}.get(kind or "", "no owner and no token id")
    return _fail(f"{what} {target!r} (see `topk token list`)")


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
    from jobs.spec.io import SpecFileError, is_sweep_document, load_spec_file
    from service.client import ServiceError

    try:
        raw = load_spec_file(args.spec)
    except SpecFileError as exc:
        return _fail(str(exc), 2)
    kind = args.kind or ("sweep" if is_sweep_document(raw) else "train")
    raw = absolutize_local_paths(raw, kind=kind)
    try:
        with _client(args) as client:
            job = client.submit(raw, kind=kind, idempotency_key=args.idempotency_key)
            print(f"submitted {job['id']} ({job['status']})")
            if not args.wait:
                return 0
            return _wait(client, job["id"], kind)
    except ServiceError as exc:
        return _fail(
            f"{args.spec}:\n{exc}" if exc.status == 422 else str(exc), 2 if exc.status == 422 else 1
        )


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
            return 0 if job["status"] == "succeeded" else 1
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
                return 0
            kinds = [args.kind] if args.kind else ["train", "sweep"]
            rows = []
            for kind in kinds:
                rows += client.list(kind=kind, status=args.statuses, limit=args.limit)["items"]
            rows.sort(key=lambda job: job["created_at"], reverse=True)
            _print_table(rows[: args.limit])
            return 0
    except ServiceError as exc:
        return _fail(str(exc), 2 if exc.status == 422 else 1)


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
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


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
    if job.get("trials"):
        print("trials:")
        for trial in job["trials"]:
            params = ", ".join(f"{k}={v}" for k, v in (trial.get("params") or {}).items())
            metrics = _metric_text(trial.get("metrics") or {})
            print(f"  {trial.get('trial_id')}  {trial.get('status')}  {params}  {metrics}")
        if job.get("best_params"):
            print(f"best:      {job['best_params']}")


def run_logs(args) -> int:
    from service.client import ServiceError

    kind = _kind_of(args.id)
    try:
        with _client(args) as client:
            if not args.follow:
                sys.stdout.write(client.logs(args.id, kind=kind, tail=args.tail))
                return 0
            for chunk in client.follow_logs(args.id, kind=kind, tail=args.tail):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return 0
    except ServiceError as exc:
        return _fail(str(exc))


def run_cancel(args) -> int:
    from service.client import ServiceError

    try:
        with _client(args) as client:
            job = client.cancel(args.id, kind=_kind_of(args.id))
    except ServiceError as exc:
        return _fail(str(exc))
    print(f"{job['id']}: {job['status']}")
    return 0


def run_demo(args) -> int:
    from service.demo import run_demo as demo

    return demo(args)
