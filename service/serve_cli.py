"""`topk serve`: the job service, with a local Ray head of its own when no cluster is named.

With no configuration: a local Ray head on free ports (adopted from the data directory when a
killed server left it running), SQLite and run storage under the data directory. The API runs in
uvicorn until SIGTERM or SIGINT; then the head is stopped too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from jobs.contract import exit_codes
from service.console import fail, redact


def register(subparsers: argparse._SubParsersAction) -> None:
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


def run_serve(args) -> int:
    from service.settings import Settings

    try:
        settings = Settings.from_env(
            data_dir=args.data_dir and Path(args.data_dir), port=args.port, host=args.host
        )
    except ValueError as exc:
        return fail(str(exc), exit_codes.USAGE)
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
        return fail(
            f"cannot serve on {settings.host}:{settings.port}: {problem} (another `topk serve`?"
            " choose another port with --port or TOPK_PORT)"
        )
    import uvicorn

    from service.api import create_app

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
                return fail(str(exc))
            except RuntimeError as exc:
                return fail(f"{exc}; see {settings.data_dir / 'ray-head.log'}")
        dashboard = settings.ray_dashboard_url or "(none: launch mode hold)"
        if head is not None:  # a browser is asked for the token once (a cookie keeps it)
            dashboard += f"  (log in with the token in {os.path.abspath(head.token_path)})"
        announce(f"Ray dashboard: {dashboard}")
        announce(f"database: {redact(settings.database_url)}; runs: {settings.storage_url}")
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
