"""`topk token create|list|revoke` as a subprocess against the database a real server uses, on
SQLite and on PostgreSQL: a revoked token stops working within a second."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_harness import client_for

from service.db import hash_token

TOPK = Path(sys.executable).with_name("topk")


@pytest.fixture(params=["sqlite", "postgres"])
def served(request, make_server):
    """(server, environment for the CLI) for one database backend, launch mode hold."""
    database_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    server, _ = make_server(database_url, launch_mode="hold")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    env["TOPK_DATA_DIR"] = server.env["TOPK_DATA_DIR"]
    env["TOPK_DATABASE_URL"] = database_url or f"sqlite:///{server.env['TOPK_DATA_DIR']}/topk.db"
    return server, env


def topk(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TOPK), "token", *args], env=env, capture_output=True, text=True, timeout=120
    )


def create(env: dict[str, str], name: str) -> str:
    done = topk(env, "create", name)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"  # the PostgreSQL database is shared by the session


def listed(env: dict[str, str]) -> dict[str, list[str]]:
    """`topk token list` as {token id: [owner, created, revoked]}."""
    done = topk(env, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "CREATED", "REVOKED"]
    rows = {}
    for line in lines[1:]:
        token_id, owner, rest = line.split(maxsplit=2)
        rows[token_id] = [owner, *re.split(r"\s{2,}", rest.strip())]
    return rows


def status_with(server, token: str) -> int:
    with client_for(server, token) as http:
        return http.get("/v1/jobs").status_code


def test_a_revoked_token_stops_working_within_a_second(served):
    server, env = served
    name = unique("alice")
    token = create(env, name)
    with client_for(server, token) as http:
        assert http.get("/v1/jobs").status_code == 200
        revoke = subprocess.Popen(
            [str(TOPK), "token", "revoke", name],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # keep the token in the server's cache until the revocation has committed
        while revoke.poll() is None:
            assert http.get("/v1/jobs").status_code in (200, 401)
            time.sleep(0.02)
        revoked_at = time.monotonic()
        out, err = revoke.communicate()
        assert revoke.returncode == 0, err
        assert f"revoked 1 token of {name}" in out
        while (status := http.get("/v1/jobs").status_code) == 200:
            assert time.monotonic() - revoked_at < 1.0, "the revoked token still works"
            time.sleep(0.02)
        assert status == 401
        assert time.monotonic() - revoked_at < 1.0


def test_list_shows_ids_owners_and_times_but_never_a_secret(served):
    _, env = served
    alice, bob = unique("alice"), unique("bob")
    first, second, third = create(env, alice), create(env, alice), create(env, bob)
    rows = listed(env)
    ids = {token: hash_token(token)[:12] for token in (first, second, third)}
    assert {ids[first], ids[second], ids[third]} <= set(rows)
    assert rows[ids[first]][0] == rows[ids[second]][0] == alice and rows[ids[third]][0] == bob
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[ids[first]][1])
    assert rows[ids[first]][2] == "-"
    text = topk(env, "list").stdout
    for token in (first, second, third):
        assert token not in text and hash_token(token) not in text

    done = topk(env, "revoke", ids[second])
    assert done.returncode == 0 and f"revoked token {ids[second]} of {alice}" in done.stdout
    rows = listed(env)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[ids[second]][2])
    assert rows[ids[first]][2] == "-" and rows[ids[third]][2] == "-"


def test_revoking_by_name_revokes_every_live_token_of_the_owner(served):
    server, env = served
    alice, bob = unique("alice"), unique("bob")
    tokens = [create(env, alice), create(env, alice)]
    other = create(env, bob)
    done = topk(env, "revoke", alice)
    assert done.returncode == 0 and f"revoked 2 tokens of {alice}" in done.stdout
    assert [status_with(server, token) for token in tokens] == [401, 401]
    assert status_with(server, other) == 200
    again = topk(env, "revoke", alice)  # nothing left to revoke: said, not an error
    assert again.returncode == 0 and "no live tokens" in again.stdout
    done = topk(env, "revoke", hash_token(tokens[0])[:12])
    assert done.returncode == 0 and "already revoked" in done.stdout


def test_unknown_and_ambiguous_targets_are_clear_errors(served):
    _, env = served
    for target in (unique("nobody"), "0123456789ab", "--"):
        done = topk(env, "revoke", target)
        assert done.returncode in (1, 2), done
        assert "Traceback" not in done.stderr
    done = topk(env, "revoke", unique("nobody"))
    assert done.returncode == 1
    assert done.stderr.startswith("topk: error: no owner and no token id ")
    assert topk(env, "revoke").returncode == 2  # the target is required

    # an owner whose name is another token's id: the command asks which one is meant
    token = create(env, unique("carol"))
    token_id = hash_token(token)[:12]
    create(env, token_id)
    done = topk(env, "revoke", token_id)
    assert done.returncode == 2 and "--id" in done.stderr and "--owner" in done.stderr
    assert listed(env)[token_id][2] == "-"
    done = topk(env, "revoke", "--id", token_id)
    assert done.returncode == 0 and f"revoked token {token_id}" in done.stdout
    done = topk(env, "revoke", "--owner", token_id)
    assert done.returncode == 0 and f"revoked 1 token of {token_id}" in done.stdout
