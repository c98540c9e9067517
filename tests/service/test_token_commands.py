"""`topk token create|list|revoke` as a subprocess against the database a real server uses, on
SQLite and on PostgreSQL: a revoked token stops working within a second; each command says which
database it used and never makes one unless told to (`--create`); and the client commands say how
to get a token when they have none."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from service_harness import client_for, postgres_database, tiny_spec

from service.store import hash_token

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
    assert done.returncode == 2  # a name that does not exist: a usage error
    assert "topk: error: no owner and no token id " in done.stderr
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


def test_no_database_is_made_unless_asked_and_each_command_names_its_database(tmp_path):
    """`topk token create` from another directory made a new ./.topk/topk.db that no server
    reads, and said nothing. Now it refuses, and --create is how a database is made on purpose."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    expected = elsewhere / ".topk" / "topk.db"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(TOPK), "token", *args], env=env, cwd=elsewhere,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    for args in (["create", "alice"], ["list"], ["revoke", "alice"]):
        done = run(*args)
        assert done.returncode == 2, done
        assert f"no database at {expected}" in done.stderr
        assert "--data-dir" in done.stderr and "TOPK_DATA_DIR" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (elsewhere / ".topk").exists()
    assert "--create" in run("create", "alice").stderr

    made = run("create", "alice", "--create")
    assert made.returncode == 0, made.stderr
    assert f"topk token: database sqlite:///{expected}" in made.stderr
    token = made.stdout.split()[-1]  # the README's `awk '{print $NF}'` still gets the token
    assert expected.is_file() and len(token) > 20
    listed_here = run("list")
    assert listed_here.returncode == 0 and "alice" in listed_here.stdout
    assert f"database sqlite:///{expected}" in listed_here.stderr
    revoked = run("revoke", "alice")
    assert revoked.returncode == 0 and "revoked 1 token of alice" in revoked.stdout
    assert f"database sqlite:///{expected}" in revoked.stderr


def test_a_postgres_database_without_the_tables_is_not_set_up_unasked():
    with postgres_database("topk_token_test") as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
        env["TOPK_DATABASE_URL"] = url
        done = topk(env, "create", "alice")
        assert done.returncode == 2 and "holds no topk tables" in done.stderr, done
        assert "--create" in done.stderr
        assert topk(env, "list").returncode == 2
        made = topk(env, "create", "alice", "--create")
        assert made.returncode == 0, made.stderr
        assert f"127.0.0.1:5432/{url.rsplit('/', 1)[1]}" in made.stderr
        assert "alice" in topk(env, "list").stdout


def test_client_commands_without_a_token_say_how_to_get_one(served, tmp_path):
    server, env = served
    env = {k: v for k, v in env.items() if k != "TOPK_TOKEN"}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    commands = [
        ["status"], ["status", "job-x"], ["submit", str(spec)], ["logs", "job-x"],
        ["cancel", "job-x"], ["sweeps", "status"],
    ]  # fmt: skip
    for args in commands:
        done = subprocess.run(
            [str(TOPK), *args, "--url", server.url], env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (args, done)
        for hint in ("TOPK_TOKEN", "--token", "topk token create"):
            assert hint in done.stderr, (args, done.stderr)
    # a token the server does not know: the service refused (4), with the same hint
    done = subprocess.run(
        [str(TOPK), "status", "--url", server.url, "--token", "not-a-token"], env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 4, done
    assert "invalid or revoked token" in done.stderr and "topk token create" in done.stderr
