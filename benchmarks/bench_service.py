"""Submission latency of the job service: POST /v1/jobs with 1, 10 and 50 concurrent clients.

Runs the real server (uvicorn, one process, SQLite in WAL mode under a temporary data dir) in
launch mode `hold`: jobs are validated, recorded and acknowledged but stay queued, so this
measures the API and the database, not a Ray cluster. Prints p50/p99 latency and accepted
submissions per second per concurrency level, the CPU time that the server process and this
client process spent per request (the machine has few cores: a client that needs as much CPU as
the server would measure itself), then the latency of a validation error (422).

    .venv/bin/python benchmarks/bench_service.py [--requests 400] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.local_ray import free_port  # noqa: E402
from service.store import Store  # noqa: E402

SPEC = {
    "data": {"train": None, "val": None, "num_classes": 100, "image_size": 32},  # set in main
    "loss": {"name": "noised_topk", "k": 5, "epsilon": 1.0},
    "epochs": 10,
}  # fmt: skip
BAD_SPEC = {**SPEC, "loss": {"name": "noised_topk", "k": 500, "epsilon": -1}, "bogus": 1}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of process `pid` (Linux /proc), or of this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a client light enough that 50 of
    them in one process measure the server (httpx's pool added seconds of client-side queueing
    at 50 concurrent requests on 2 cores)."""

    def __init__(self, host: str, port: int, token: str):
        self.host, self.port, self.token = host, port, token
        self.reader = self.writer = None

    async def post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        await self.writer.drain()
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return int(status_line.split()[1]), body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_level(
    url: str, token: str, clients: int, total: int, body: dict, expect: int, server_pid: int
):
    """`clients` connections posting back to back, `total` requests in all; returns (latencies
    in seconds, elapsed seconds, CPU seconds of the server and of this client while timed)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connections = [RawConnection(host, int(port), token) for _ in range(clients)]
    latencies: list[float] = []

    async def one_client(connection: RawConnection, requests: int):
        for _ in range(requests):
            started = time.perf_counter()
            status, answer = await connection.post("/v1/jobs", payload)
            latencies.append(time.perf_counter() - started)
            if status != expect:
                raise RuntimeError(f"got {status}: {answer[:300]!r}")

    # Open every keep-alive connection first: this measures steady-state submissions, not TCP
    # connection set-up.
    await asyncio.gather(*(one_client(c, 1) for c in connections))
    latencies.clear()
    # The client's own garbage collection would stall all its connections at once and count as
    # server latency (a 50 ms full pass showed up in the 50-client p99): none while timing.
    gc.collect()
    gc.disable()
    try:
        server_cpu, client_cpu = cpu_seconds(server_pid), cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(c, max(1, total // clients)) for c in connections))
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, cpu_seconds() - client_cpu
    finally:
        gc.enable()
    for connection in connections:
        connection.close()
    return latencies, elapsed, server_cpu, client_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="POSTs per concurrency level")
    parser.add_argument("--database-url", help="default: SQLite under a temporary data dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="topk-bench-") as data_dir:
        # The spec's local shards must exist at submission (the server stats them): empty files
        # in the temporary folder do.
        shards = Path(data_dir) / "shards"
        shards.mkdir()
        for name in [f"train-{i:03d}.tar" for i in range(10)] + ["val-000.tar"]:
            (shards / name).touch()
        SPEC["data"]["train"] = f"{shards}/train-{{000..009}}.tar"
        SPEC["data"]["val"] = f"{shards}/val-000.tar"
        database_url = args.database_url or f"sqlite:///{data_dir}/topk.db"
        store = Store.from_url(database_url)
        store.migrate()
        token = store.create_token("bench")
        port = free_port()
        env = {**os.environ, "TOPK_DATA_DIR": data_dir, "TOPK_DATABASE_URL": database_url,
               "TOPK_LAUNCH_MODE": "hold"}  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.api:create_app",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            print(f"POST /v1/jobs, launch mode hold, {database_url.split(':')[0]}, "
                  f"{args.requests} requests per level, {os.cpu_count()} CPUs")  # fmt: skip
            print(f"{'clients':>8} {'p50 ms':>8} {'p99 ms':>8} {'accepted/s':>11} "
                  f"{'server CPU ms/req':>18} {'client CPU ms/req':>18}")  # fmt: skip
            for clients in (1, 10, 50):
                latencies, elapsed, server_cpu, client_cpu = asyncio.run(
                    run_level(url, token, clients, args.requests, SPEC, 201, server.pid)
                )
                server_cpu, client_cpu = server_cpu / len(latencies), client_cpu / len(latencies)
                print(
                    f"{clients:>8} {percentile(latencies, 50) * 1e3:>8.1f} "
                    f"{percentile(latencies, 99) * 1e3:>8.1f} {len(latencies) / elapsed:>11.0f} "
                    f"{server_cpu * 1e3:>18.2f} {client_cpu * 1e3:>18.2f}"
                )
            latencies, *_ = asyncio.run(run_level(url, token, 1, 200, BAD_SPEC, 422, server.pid))
            print(
                f"validation error (422), 1 client: p50 {statistics.median(latencies) * 1e3:.1f} ms, "
                f"p99 {percentile(latencies, 99) * 1e3:.1f} ms"
            )
            jobs = store.count_by_status()["queued"]
            print(f"jobs recorded: {jobs}")
        finally:
            server.terminate()
            server.wait(15)
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
