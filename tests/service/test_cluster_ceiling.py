"""A job that asks for more than the cluster can ever have (TOPK_CLUSTER_MAX_CPUS/GPUS) is
refused at submission with a 422 naming the field and the ceiling, over real HTTP; without a
ceiling it is accepted and waits for the cluster to grow, as before."""

from __future__ import annotations

import pytest
from service_harness import client_for, tiny_spec


@pytest.fixture(scope="module")
def ceiling(tmp_path_factory):
    """(server, token) of a hold-mode server whose cluster can grow to 8 CPUs and 2 GPUs."""
    from service_harness import ServerProcess

    from service.store import Store

    data_dir = tmp_path_factory.mktemp("ceiling")
    env = {
        "TOPK_DATA_DIR": str(data_dir),
        "TOPK_LAUNCH_MODE": "hold",
        "TOPK_CLUSTER_MAX_CPUS": "8",
        "TOPK_CLUSTER_MAX_GPUS": "2",
    }
    store = Store.from_url(f"sqlite:///{data_dir / 'topk.db'}")
    store.migrate()
    server = ServerProcess(env, data_dir / "server.log").start()
    yield server, store.create_token("alice")
    server.stop()
    store.close()


def sweep_of(train: dict, **fields) -> dict:
    return {"train": train, "search": {"optim.lr": {"grid": [0.1, 0.01]}}, **fields}


def refused(response, field: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    errors = {error["field"]: error["message"] for error in response.json()["errors"]}
    assert field in errors, errors
    for word in words:
        assert word in errors[field], errors[field]


@pytest.mark.parametrize(
    ("scaling", "field", "words"),
    [
        ({"num_workers": 1, "cpus_per_worker": 9}, "scaling.cpus_per_worker", ["9 CPUs", "8"]),
        ({"num_workers": 3, "cpus_per_worker": 3}, "scaling.num_workers", ["9 CPUs", "8"]),
        (
            {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 3},
            "scaling.gpus_per_worker",
            ["3 GPUs", "2"],
        ),
        (
            {"num_workers": 3, "use_gpu": True, "gpus_per_worker": 1},
            "scaling.num_workers",
            ["3 GPUs", "2"],
        ),
        (
            {"num_workers": 1000, "use_gpu": True, "gpus_per_worker": 10},
            "scaling.gpus_per_worker",
            ["10000 GPUs", "TOPK_CLUSTER_MAX_GPUS"],
        ),
    ],
)
def test_a_training_job_beyond_the_ceiling_is_refused(ceiling, scaling, field, words):
    server, token = ceiling
    with client_for(server, token) as http:
        before = len(http.get("/v1/jobs", params={"limit": 200}).json()["items"])
        refused(http.post("/v1/jobs", json=tiny_spec(scaling=scaling)), field, *words)
        assert len(http.get("/v1/jobs", params={"limit": 200}).json()["items"]) == before


def test_a_training_job_at_the_ceiling_is_accepted(ceiling):
    server, token = ceiling
    at_ceiling = {"num_workers": 2, "cpus_per_worker": 4, "use_gpu": True, "gpus_per_worker": 1}
    with client_for(server, token) as http:
        response = http.post("/v1/jobs", json=tiny_spec(scaling=at_ceiling))
    assert response.status_code == 201, response.text


def test_a_sweep_beyond_the_ceiling_is_refused(ceiling):
    server, token = ceiling
    with client_for(server, token) as http:
        # one trial alone is too big: 8 CPUs for its worker + 1 for its driver
        one = tiny_spec(scaling={"num_workers": 1, "cpus_per_worker": 8})
        refused(http.post("/v1/sweeps", json=sweep_of(one)), "train.scaling.cpus_per_worker")
        # each trial fits, three at once do not: 3 x (2 + 1) = 9 CPUs
        two = tiny_spec(scaling={"num_workers": 1, "cpus_per_worker": 2})
        refused(
            http.post("/v1/sweeps", json=sweep_of(two, max_concurrent_trials=3)),
            "max_concurrent_trials",
            "9 CPUs",
            "8",
        )
        gpus = tiny_spec(scaling={"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1})
        refused(
            http.post("/v1/sweeps", json=sweep_of(gpus, max_concurrent_trials=10**30)),
            "max_concurrent_trials",
            "TOPK_CLUSTER_MAX_GPUS",
        )


def test_a_sweep_at_the_ceiling_is_accepted(ceiling):
    server, token = ceiling
    train = tiny_spec(scaling={"num_workers": 1, "cpus_per_worker": 3})
    with client_for(server, token) as http:
        response = http.post("/v1/sweeps", json=sweep_of(train, max_concurrent_trials=2))
    assert response.status_code == 201, response.text  # 2 x (3 + 1) = 8 CPUs


def test_without_a_ceiling_a_large_job_is_accepted_and_waits(make_server):
    server, store = make_server(launch_mode="hold")
    server.start()
    huge = {"num_workers": 1024, "use_gpu": True, "gpus_per_worker": 10}
    with client_for(server, store.create_token("alice")) as http:
        response = http.post("/v1/jobs", json=tiny_spec(scaling=huge))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
