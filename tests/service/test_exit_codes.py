"""One set of exit codes for every `topk` command (jobs/contract/exit_codes.py), as the README documents
them: 0 ok, 1 the run or followed job failed, 2 usage, 3 an invalid spec, 4 the service refused
or is unreachable; and `topk --version`. The commands run as subprocesses against a real server
(launch mode hold: jobs stay queued)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from service_harness import REPO, tiny_spec

from jobs.contract import exit_codes
from service.local_ray import free_port

TOPK = Path(sys.executable).with_name("topk")


def topk(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TOPK), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def client_env(make_server, tmp_path) -> tuple[dict[str, str], str]:
    """(environment with TOPK_URL and TOPK_TOKEN of a real server in launch mode hold, a folder
    with spec files: ok.yaml, invalid.yaml, broken.yaml)."""
    server, store = make_server(launch_mode="hold")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    env.update(TOPK_URL=server.url, TOPK_TOKEN=store.create_token("alice"))
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "ok.yaml").write_text(yaml.safe_dump(tiny_spec("ok")))
    (specs / "invalid.yaml").write_text(
        yaml.safe_dump(tiny_spec(loss={"name": "noised_topk", "k": 10}))
    )
    (specs / "broken.yaml").write_text("data: [1,\n")
    return env, str(specs)


def test_the_codes_are_defined_once_and_the_readme_lists_them():
    assert [code for code, _ in exit_codes.TABLE] == [0, 1, 2, 3, 4]
    assert (exit_codes.OK, exit_codes.FAILED, exit_codes.USAGE) == (0, 1, 2)
    assert (exit_codes.INVALID_SPEC, exit_codes.SERVICE) == (3, 4)
    readme = (REPO / "README.md").read_text()
    documented = dict(re.findall(r"^\| `(\d)` \| (.+?) \|$", readme, re.MULTILINE))
    assert sorted(int(code) for code in documented) == [0, 1, 2, 3, 4]
    help_text = topk("--help").stdout
    for code, meaning in exit_codes.TABLE:
        assert f"{code}  {meaning}" in help_text


def test_version_is_the_installed_package_version():
    done = topk("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"topk {version('topk-service')}"


def test_validate_and_submit_give_the_same_codes_for_the_same_faults(client_env):
    env, specs = client_env
    for command in (["validate"], ["submit"]):
        assert topk(*command, f"{specs}/ok.yaml", env=env).returncode == 0, command
        invalid = topk(*command, f"{specs}/invalid.yaml", env=env)
        assert invalid.returncode == exit_codes.INVALID_SPEC, (command, invalid.stderr)
        assert "loss.k" in invalid.stderr
        for unreadable in (f"{specs}/broken.yaml", f"{specs}/absent.yaml"):
            done = topk(*command, unreadable, env=env)
            assert done.returncode == exit_codes.USAGE, (command, done.stderr)
            assert "Traceback" not in done.stderr
    # `topk train` refuses the invalid spec before it starts anything, with the same code
    assert topk("train", f"{specs}/invalid.yaml", env=env).returncode == exit_codes.INVALID_SPEC


def test_usage_errors_exit_2(client_env):
    env, specs = client_env
    assert topk(env=env).returncode == exit_codes.USAGE  # no command
    assert topk("status", "--limit", "many", env=env).returncode == exit_codes.USAGE
    assert topk("token", env=env).returncode == exit_codes.USAGE  # a group without its verb
    without_token = {k: v for k, v in env.items() if k != "TOPK_TOKEN"}
    assert topk("submit", f"{specs}/ok.yaml", env=without_token).returncode == exit_codes.USAGE
    # a filter value the service refuses (422) is a bad argument too
    assert topk("status", "--status", "sleeping", env=env).returncode == exit_codes.USAGE


def test_the_service_refusing_or_unreachable_exits_4(client_env):
    env, specs = client_env
    assert topk("status", "job-nope", env=env).returncode == exit_codes.SERVICE
    assert topk("cancel", "job-nope", env=env).returncode == exit_codes.SERVICE
    submitted = topk("submit", f"{specs}/ok.yaml", env=env)
    job_id = submitted.stdout.split()[1]
    logs = topk("logs", job_id, env=env)  # queued, never launched: 409
    assert logs.returncode == exit_codes.SERVICE and "not been launched" in logs.stderr
    assert topk("status", "--token", "wrong", env=env).returncode == exit_codes.SERVICE
    nobody = {**env, "TOPK_URL": f"http://127.0.0.1:{free_port()}"}
    unreachable = topk("status", env=nobody)
    assert unreachable.returncode == exit_codes.SERVICE
    assert "cannot reach the service" in unreachable.stderr
    assert topk("submit", f"{specs}/ok.yaml", env=nobody).returncode == exit_codes.SERVICE


def test_a_followed_job_that_does_not_succeed_exits_1(client_env):
    env, specs = client_env
    waiting = subprocess.Popen(
        [str(TOPK), "submit", f"{specs}/ok.yaml", "--wait"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = waiting.stdout.readline()
    assert first.startswith("submitted "), first
    job_id = first.split()[1]
    assert topk("cancel", job_id, env=env).returncode == exit_codes.OK
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == exit_codes.FAILED, out + err
    assert "cancelled" in out + err
