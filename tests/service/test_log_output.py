"""`topk logs` output: plain text when piped or redirected, Ray's colours kept on a terminal
(unless NO_COLOR), with escape sequences split across streamed chunks removed whole. Against a
real server and Ray head running tests/service/fake_job.py, which colours a line as Ray colours
its workers' prefixes. (That worker lines come before a real run's result is checked with the
real runtime in test_two_ray_clusters.py.)"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from service_harness import FAKE_JOB, client_for, tiny_spec, wait_for

from service.client_cli import AnsiStripper

TOPK = Path(sys.executable).with_name("topk")
COLOURED = "\x1b[36m(FakeWorker pid=0)\x1b[0m a line coloured as Ray colours its workers'"
PLAIN = "(FakeWorker pid=0) a line coloured as Ray colours its workers'"


def on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """What `args` writes to a terminal (a pseudo-terminal) as its stdout."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(args, env=env, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(60) == 0, process.stderr.read()
    return b"".join(chunks).decode()


def test_piped_logs_are_plain_text_and_a_terminal_keeps_the_colours(make_server, ray_head):
    server, store = make_server(
        env=ray_head.auth_env,
        ray_address=ray_head.dashboard_url,
        job_python=f"{sys.executable} {FAKE_JOB}",
    )
    server.start()
    token = store.create_token("alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_") and k != "NO_COLOR"}
    env.update(TOPK_URL=server.url, TOPK_TOKEN=token)
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()

        def finished():
            record = http.get(f"/v1/jobs/{job['id']}").json()
            return record["status"] in ("succeeded", "failed", "cancelled") and record

        assert wait_for(finished, 90, message="the job to end")["status"] == "succeeded"
        assert COLOURED in http.get(f"/v1/jobs/{job['id']}/logs").text  # the raw log

    for follow in ([], ["-f"]):
        piped = subprocess.run(
            [str(TOPK), "logs", job["id"], *follow], env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert piped.returncode == 0, piped.stderr
        assert PLAIN in piped.stdout and "\x1b" not in piped.stdout
        assert piped.stdout.index(PLAIN) < piped.stdout.index("fake job done")

    shown = on_a_terminal([str(TOPK), "logs", job["id"]], env)
    assert COLOURED in shown
    plain = on_a_terminal([str(TOPK), "logs", job["id"]], {**env, "NO_COLOR": "1"})
    assert PLAIN in plain and "\x1b" not in plain


def test_escape_sequences_split_between_chunks_are_removed_whole():
    text = f"{COLOURED}\n\x1b]8;;http://x\x07link\x1b]8;;\x07 \x1b[1;32mok\x1b[0m\n"
    expected = f"{PLAIN}\nlink ok\n"
    for cut in range(len(text) + 1):
        stripper = AnsiStripper()
        out = stripper.feed(text[:cut]) + stripper.feed(text[cut:]) + stripper.flush()
        assert out == expected, cut
    one_by_one = AnsiStripper()
    assert "".join(one_by_one.feed(c) for c in text) + one_by_one.flush() == expected
