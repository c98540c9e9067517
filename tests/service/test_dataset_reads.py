"""What the server reads while it answers a submission: class counts come from a dataset.json
that is local (inside the allowed roots), in memory, or on a host in TOPK_ALLOWED_HOSTS; any
other remote dataset is left to the worker, so a POST never makes the server connect to a host
that a token holder chose (a blind SSRF: the answer time told an open port from a closed one)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from service_harness import client_for, tiny_data, tiny_spec

from service.settings import Settings
from service.specs import check_spec, needs_dataset_read


class ConnectionRecorder:
    """A plain TCP listener on 127.0.0.1 that accepts, records and closes every connection
    (it speaks no TLS, so an https client that reaches it fails at once)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.port = self._socket.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._accept, name="recorder", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, peer = self._socket.accept()
            except OSError:  # closed
                return
            self.connections.append(peer)
            connection.close()

    def close(self) -> None:
        self._socket.close()
        self._thread.join(5)


@pytest.fixture
def recorder() -> Iterator[ConnectionRecorder]:
    listener = ConnectionRecorder()
    yield listener
    listener.close()


def counts_spec(train_url: str, loss: str = "ldam") -> dict:
    spec = tiny_spec(loss={"name": loss})
    spec["data"] = {**spec["data"], "train": train_url}
    return spec


def start_server(make_server, **settings: str):
    server, store = make_server(
        launch_mode="hold", allowed_protocols="file,https,s3,memory", **settings
    )
    server.start()
    return server, store, store.create_token("alice")


def test_a_remote_dataset_on_a_host_not_allowed_is_not_read_at_submission(make_server, recorder):
    server, store, token = start_server(make_server)
    train = f"https://127.0.0.1:{recorder.port}/d/train-{{000..001}}.tar"
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=counts_spec(train))
        sweep = http.post(
            "/v1/sweeps",
            json={
                "train": counts_spec(train, "noised_topk_imbalanced"),
                "search": {"optim.lr": {"grid": [0.1, 0.01]}},
            },
        )
    assert job.status_code == 201, job.text
    assert sweep.status_code == 201, sweep.text
    assert recorder.connections == []
    assert job.json()["spec"]["loss"]["class_counts"] is None
    assert sweep.json()["spec"]["train"]["loss"]["class_counts"] is None
    # the worker resolves the counts at start-up from the spec as stored
    stored = store.get_job(job.json()["id"])
    assert stored.status == "queued" and stored.spec["loss"]["class_counts"] is None
    assert stored.spec["data"]["train"] == train


def test_a_remote_dataset_on_an_allowed_host_is_read_at_submission(make_server, recorder):
    server, _, token = start_server(make_server, allowed_hosts="example.org, 127.0.0.1")
    train = f"https://127.0.0.1:{recorder.port}/d/train-{{000..001}}.tar"
    started = time.monotonic()
    with client_for(server, token) as http:
        response = http.post("/v1/jobs", json=counts_spec(train))
    assert time.monotonic() - started < 30
    assert recorder.connections, "the server did not try to read the allowed host"
    # the listener is no https server: the counts cannot be read, and the answer says which field
    assert response.status_code == 422, response.text
    assert "loss.class_counts" in [error["field"] for error in response.json()["errors"]]


@pytest.mark.parametrize(
    ("train", "read"),
    [
        ("TINY/train-{000..001}.tar", True),  # local data must exist at submission
        ("file://TINY/described/dataset.json", True),
        ("memory://datasets/d/dataset.json", True),
        ("https://data.example.org/d/train-{000..001}.tar", True),
        ("https://DATA.example.org:8443/d/dataset.json", True),
        ("https://data.example.org./d/dataset.json", True),
        ("s3://allowed-bucket/d/dataset.json", True),
        ("https://127.0.0.1/d/dataset.json", False),
        ("https://example.org/d/dataset.json", False),
        ("https://data.example.org.evil.test/d/dataset.json", False),
        ("s3://other-bucket/d/dataset.json", False),
        # the host a client connects to is the one after '@': never trust the part before it
        ("https://data.example.org@127.0.0.1/d/dataset.json", False),
        ("https://data.example.org%2f@127.0.0.1/d/dataset.json", False),
        ("https://{data.example.org,127.0.0.1}/d/train.tar", False),
    ],
)
def test_which_datasets_are_read_at_submission(train, read):
    described = tiny_data() / "described"
    described.mkdir(exist_ok=True)
    (described / "dataset.json").touch()  # only its existence is checked here
    train = train.replace("TINY", str(tiny_data()))
    settings = Settings(
        allowed_protocols=("file", "https", "s3", "memory"),
        allowed_hosts=("data.example.org", "allowed-bucket"),
    )
    model = check_spec("train", counts_spec(train), settings)
    assert needs_dataset_read(model, settings) is read
    given = tiny_spec(loss={"name": "ldam", "class_counts": [1] * 10})
    assert needs_dataset_read(check_spec("train", given, settings), settings) is False


def test_allowed_hosts_come_from_the_environment():
    assert Settings.from_env({}).allowed_hosts == ()
    settings = Settings.from_env({"TOPK_ALLOWED_HOSTS": " Data.Example.org, 10.0.0.5 ,,"})
    assert settings.allowed_hosts == ("data.example.org", "10.0.0.5")
