"""The HTTP API over real HTTP against a server process (launch mode `hold`: jobs are recorded
and stay queued, so these tests exercise the API and the database, not a cluster), on SQLite
and on PostgreSQL."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_harness import ServerProcess, client_for, tiny_spec

from service.store import Store


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    """(server, store, alice token, bob token, storage root) for one database backend."""
    data_dir = tmp_path_factory.mktemp(f"api-{request.param}")
    if request.param == "postgres":
        database_url = request.getfixturevalue("postgres_url")
    else:
        database_url = f"sqlite:///{data_dir / 'topk.db'}"
    store = Store.from_url(database_url)
    store.migrate()
    env = {
        "TOPK_DATA_DIR": str(data_dir),
        "TOPK_DATABASE_URL": database_url,
        "TOPK_LAUNCH_MODE": "hold",
        "TOPK_MAX_BODY_BYTES": "20000",
        "TOPK_ALLOWED_ROOTS": f"/tmp,{data_dir}",
    }
    server = ServerProcess(env, data_dir / "server.log").start()
    alice, bob = store.create_token("alice"), store.create_token("bob")
    yield server, store, alice, bob, data_dir / "runs"
    server.stop()
    store.close()


def test_health_and_ready_need_no_token(api):
    server, *_ = api
    with client_for(server, None) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job-x"),
     ("GET", "/v1/sweeps"), ("POST", "/v1/jobs/job-x/cancel"), ("GET", "/v1/jobs/job-x/logs"),
     ("GET", "/v1/jobs/job-x/metrics"), ("GET", "/v1/sweeps/sweep-x/trials/t0/metrics"),
     ("GET", "/v1/info")],
)  # fmt: skip
def test_every_v1_route_needs_a_valid_token(api, method, path):
    server, *_ = api
    for headers in ({}, {"Authorization": "Bearer topk_wrong"}, {"Authorization": "Basic abc"}):
        with httpx.Client(base_url=server.url, headers=headers) as http:
            response = http.request(method, path, json=tiny_spec())
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "unauthorized"


def test_info_gives_the_version_and_the_ray_dashboard(api):
    from importlib.metadata import version

    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        info = http.get("/v1/info").json()
    # launch mode hold: no cluster, so no dashboard (test_two_ray_clusters.py shows one)
    assert info == {"version": version("topk-service"), "ray_dashboard_url": None}


def test_submit_returns_the_queued_record_and_get_shows_history(api):
    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        created = http.post("/v1/jobs", json=tiny_spec("first"))
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["status"] == "queued" and job["owner"] == "alice" and job["attempts"] == 0
        assert job["id"].startswith("job-") and job["name"] == "first"
        # the stored spec is the validated one, defaults filled
        assert (
            job["spec"]["optim"]["name"] == "sgd" and job["spec"]["model"]["cosine_head"] is False
        )
        detail = http.get(f"/v1/jobs/{job['id']}").json()
        assert [e["to_status"] for e in detail["events"]] == ["queued"]
        assert detail["events"][0]["reason"] == "submitted"
        assert detail["dashboard_url"] is None  # not launched
        # a job is not a sweep
        assert http.get(f"/v1/sweeps/{job['id']}").status_code == 404


def test_other_owners_jobs_are_invisible(api):
    server, _, alice, bob, _ = api
    with client_for(server, alice) as as_alice, client_for(server, bob) as as_bob:
        job = as_alice.post("/v1/jobs", json=tiny_spec()).json()
        for method, path in (
            ("GET", ""),
            ("GET", "/metrics"),
            ("GET", "/logs"),
            ("POST", "/cancel"),
        ):
            response = as_bob.request(method, f"/v1/jobs/{job['id']}{path}")
            assert response.status_code == 404, (path, response.text)
        assert job["id"] not in {j["id"] for j in as_bob.get("/v1/jobs").json()["items"]}
        assert as_alice.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_invalid_specs_get_422_with_field_paths(api):
    server, _, alice, *_ = api
    cases = [
        ({**tiny_spec(), "bogus": 1}, "bogus"),
        (tiny_spec(loss={"name": "noised_topk", "epsilon": -1.0}), "loss.epsilon"),
        (tiny_spec(loss={"name": "noised_topk", "k": 10}), "loss.k"),
        (tiny_spec(loss={"name": "no_such_loss"}), "loss.name"),
        (
            {**tiny_spec(), "data": {**tiny_spec()["data"], "train": "ftp://host/x.tar"}},
            "data.train",
        ),
        (
            {**tiny_spec(), "data": {**tiny_spec()["data"], "train": "/etc/shards.tar"}},
            "data.train",
        ),
        ({**tiny_spec(), "storage": "/root/elsewhere"}, "storage"),
        ({"epochs": 1}, "data"),
        (tiny_spec(epochs="many"), "epochs"),
        # ldam needs class counts; none given and no dataset.json to read them from
        (tiny_spec(loss={"name": "ldam"}), "loss.class_counts"),
        # 100 million shards: counted, not expanded (expanding it froze the server)
        (
            {
                **tiny_spec(),
                "data": {
                    **tiny_spec()["data"],
                    "train": "/tmp/topk-nonexistent/x-{0..99999999}.tar",
                },
            },
            "data.train",
        ),
    ]
    with client_for(server, alice) as http:
        before = len(http.get("/v1/jobs", params={"limit": 200}).json()["items"])
        for body, field in cases:
            response = http.post("/v1/jobs", json=body)
            assert response.status_code == 422, (body, response.text)
            answer = response.json()
            assert answer["error"] == "invalid_spec"
            assert field in [e["field"] for e in answer["errors"]], answer
            assert "Traceback" not in response.text
        assert len(http.get("/v1/jobs", params={"limit": 200}).json()["items"]) == before


def test_class_counts_given_in_the_body_are_kept(api):
    server, _, alice, *_ = api
    counts = [50, 40, 30, 20, 10, 9, 8, 7, 6, 5]
    with client_for(server, alice) as http:
        response = http.post(
            "/v1/jobs", json=tiny_spec(loss={"name": "ldam", "class_counts": counts})
        )
        assert response.status_code == 201, response.text
        assert response.json()["spec"]["loss"]["class_counts"] == counts


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "spec"),
        (b"", "spec"),
        (b'"text"', "spec"),
        (b"null", "spec"),
        ('{"data": "\u00e9"}'.encode("latin-1"), "not valid JSON"),
        # These gave a 500 and a dropped connection (each fits in the test server's 20 kB).
        (b"[" * 9_000 + b"]" * 9_000, "nested too deeply"),
        (b'{"a":' * 3_000, "nested too deeply"),
        (b'{"epochs": ' + b"9" * 5_000 + b"}", "integer of 5000 digits"),
        # The last key silently won; the CLI's loader already refused it.
        (b'{"epochs": 1, "epochs": 2}', "duplicate key 'epochs'"),
    ],
)
def test_malformed_bodies_get_422(api, body, message):
    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        response = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert message in response.json()["message"]
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_bodies_that_are_not_json_get_415(api, content_type):
    server, _, alice, *_ = api
    body = json.dumps(tiny_spec()).encode()
    with client_for(server, alice) as http:
        response = http.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["message"]
        charset = {"Content-Type": "application/json; charset=utf-8"}
        assert http.post("/v1/jobs", content=body, headers=charset).status_code == 201


def test_oversized_bodies_get_413(api):
    server, _, alice, *_ = api
    big = tiny_spec(name="x" * 30_000)
    with client_for(server, alice) as http:
        assert http.post("/v1/jobs", json=big).status_code == 413

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(30):
                yield b" " * 1000

        response = http.post(
            "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"] == "body_too_large"


def test_idempotency_key_same_body_same_job_different_body_409(api):
    server, _, alice, bob, _ = api
    with client_for(server, alice) as http, client_for(server, bob) as as_bob:
        key = {"Idempotency-Key": "retry-me"}
        first = http.post("/v1/jobs", json=tiny_spec("idem"), headers=key)
        again = http.post("/v1/jobs", json=tiny_spec("idem"), headers=key)
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"]
        other = http.post("/v1/jobs", json=tiny_spec("idem", epochs=3), headers=key)
        assert other.status_code == 409 and first.json()["id"] in other.json()["message"]
        # keys are per owner: bob's same key is a different job
        assert (
            as_bob.post("/v1/jobs", json=tiny_spec("idem"), headers=key).json()["id"]
            != (first.json()["id"])
        )


def test_concurrent_requests_with_one_key_create_exactly_one_job(api):
    server, store, alice, *_ = api
    spec = tiny_spec("concurrent")

    def post(_):
        with client_for(server, alice) as http:
            return http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "burst"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(32)))
    assert sorted({r.status_code for r in responses}) in ([200, 201], [201])
    assert [r.status_code for r in responses].count(201) == 1
    assert len({r.json()["id"] for r in responses}) == 1
    owner_id = store.owner_for_token(alice)[0]
    assert store.get_job_by_key(owner_id, "burst").id == responses[0].json()["id"]


def test_list_filters_by_status_and_pages_with_a_cursor(api):
    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        made = [http.post("/v1/jobs", json=tiny_spec(f"page{i}")).json()["id"] for i in range(5)]
        http.post(f"/v1/jobs/{made[0]}/cancel")
        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = http.get("/v1/jobs", params=params).json()
            assert len(page["items"]) <= 2
            seen += [job["id"] for job in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert seen[:4] == made[::-1][:4]  # newest first
        assert set(made) <= set(seen)
        cancelled = http.get("/v1/jobs", params={"status": "cancelled", "limit": 200}).json()
        assert made[0] in {job["id"] for job in cancelled["items"]}
        assert {job["status"] for job in cancelled["items"]} == {"cancelled"}
        both = http.get("/v1/jobs", params=[("status", "cancelled"), ("status", "queued")]).json()
        assert {job["status"] for job in both["items"]} <= {"cancelled", "queued"}
        for bad in ({"status": "done"}, {"limit": 0}, {"limit": 1000}, {"cursor": "abc"}):
            response = http.get("/v1/jobs", params=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["errors"][0]["field"].startswith("query.")


def test_cancel_is_idempotent_and_queued_jobs_never_start(api):
    server, store, alice, *_ = api
    with client_for(server, alice) as http:
        job = http.post("/v1/jobs", json=tiny_spec("to-cancel")).json()
        first = http.post(f"/v1/jobs/{job['id']}/cancel")
        second = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert first.status_code == second.status_code == 200
        assert first.json()["status"] == second.json()["status"] == "cancelled"
        events = [(e["from_status"], e["to_status"]) for e in second.json()["events"]]
        assert events == [(None, "queued"), ("queued", "cancelled")]
        assert second.json()["finished_at"] is not None
        assert http.post("/v1/jobs/job-000000000000/cancel").status_code == 404


def test_logs_before_launch_is_409(api):
    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        job = http.post("/v1/jobs", json=tiny_spec()).json()
        response = http.get(f"/v1/jobs/{job['id']}/logs")
        assert response.status_code == 409 and "not been launched" in response.json()["message"]


def test_metrics_history_comes_from_the_run_folder(api):
    server, store, alice, _, storage = api
    with client_for(server, alice) as http:
        job = http.post("/v1/jobs", json=tiny_spec("metrics")).json()
        assert http.get(f"/v1/jobs/{job['id']}/metrics").json() == {
            "job_id": job["id"],
            "epochs": [],
        }
        run_dir = Path(storage) / job["id"]
        run_dir.mkdir(parents=True)
        lines = [{"epoch": 1, "train_loss": 2.0, "val_top5": 0.4},
                 {"epoch": 2, "train_loss": 1.5, "val_top5": 0.6}]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 3, "trai'
        )
        history = http.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
        assert history == lines  # the half-written last line is not an epoch yet


def test_a_rank_1_collapse_shows_as_a_live_warning_of_the_job(api, capsys):
    """Epochs flagged collapse_warning in metrics.jsonl (the worker's live check) give the job's
    record a `warnings` line while it runs, and `topk jobs get` prints it; a healthy run has
    none."""
    from service.job_tables import print_job

    server, store, alice, _, storage = api
    with client_for(server, alice) as http:
        job = http.post("/v1/jobs", json=tiny_spec("collapsing")).json()
        store.transition(job["id"], "launching", "test", expect="queued", attempt=1)
        store.transition(job["id"], "running", "test", expect="launching")
        run_dir = Path(storage) / job["id"]
        run_dir.mkdir(parents=True)
        healthy = {"epoch": 1, "val_collapse_share": 0.2, "val_collapse_class": 3,
                   "collapse_warning": False}  # fmt: skip
        (run_dir / "metrics.jsonl").write_text(json.dumps(healthy) + "\n")
        record = http.get(f"/v1/jobs/{job['id']}").json()
        assert record["latest_metrics"]["epoch"] == 1 and record["warnings"] is None
        flagged = [{"epoch": 2, "val_collapse_share": 0.9, "val_collapse_class": 7,
                    "collapse_warning": True},
                   {"epoch": 3, "val_collapse_share": 0.6, "val_collapse_class": 7,
                    "collapse_warning": True}]  # fmt: skip
        with (run_dir / "metrics.jsonl").open("a") as handle:
            handle.write("".join(json.dumps(line) + "\n" for line in flagged))
        record = http.get(f"/v1/jobs/{job['id']}").json()
        assert record["status"] == "running"
        assert record["warnings"] == [
            "rank-1 collapse warning in epoch(s) 2, 3: up to 90% of the validation images had "
            "class 7 as their top-1 prediction (epoch 2)"
        ]
        print_job(record)
        assert "warning:   rank-1 collapse warning in epoch(s) 2, 3" in capsys.readouterr().out


def test_sweep_trial_metrics_come_from_each_trials_run(api):
    server, _, alice, bob, storage = api
    sweep = {"train": tiny_spec("trials"), "search": {"optim.lr": {"grid": [0.1, 0.01]}}}
    with client_for(server, alice) as http, client_for(server, bob) as as_bob:
        created = http.post("/v1/sweeps", json=sweep)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]
        trial_url = f"/v1/sweeps/{sweep_id}/trials/a1b2c_00000/metrics"
        assert http.get(trial_url).status_code == 404  # no trial table before the sweep ends
        run_dir = Path(storage) / sweep_id
        (run_dir / "trials" / "trial-a1b2c_00000").mkdir(parents=True)
        lines = [{"epoch": 1, "train_loss": 2.0, "val_top5": 0.4},
                 {"epoch": 2, "train_loss": 1.5, "val_top5": 0.6}]  # fmt: skip
        (run_dir / "trials" / "trial-a1b2c_00000" / "metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines)
        )
        trials = [{"trial_id": "a1b2c_00000", "params": {"optim.lr": 0.1}},
                  {"trial_id": "a1b2c_00001", "params": {"optim.lr": 0.01}},
                  {"trial_id": "not a name", "params": {}}]  # fmt: skip
        (run_dir / "sweep.json").write_text(json.dumps({"trials": trials}))

        assert http.get(trial_url).json() == {
            "job_id": sweep_id,
            "trial_id": "a1b2c_00000",
            "epochs": lines,
        }
        # a listed trial that has not written an epoch yet
        second = http.get(f"/v1/sweeps/{sweep_id}/trials/a1b2c_00001/metrics")
        assert second.status_code == 200 and second.json()["epochs"] == []
        for path in (
            f"/v1/sweeps/{sweep_id}/trials/a1b2c_00009/metrics",  # not in the trial table
            f"/v1/sweeps/{sweep_id}/trials/not%20a%20name/metrics",  # listed, but not a name
        ):
            response = http.get(path)
            assert response.status_code == 404 and response.json()["error"] == "not_found", path
        assert as_bob.get(trial_url).status_code == 404  # another owner's sweep
        job = http.post("/v1/jobs", json=tiny_spec()).json()
        assert http.get(f"/v1/sweeps/{job['id']}/trials/a1b2c_00000/metrics").status_code == 404
        assert http.get(f"/v1/jobs/{job['id']}/trials/a1b2c_00000/metrics").status_code == 404


def test_ui_and_docs_are_served_from_the_package_under_a_strict_policy(api):
    server, *_ = api
    with httpx.Client(base_url=server.url) as http:  # static pages: no token needed
        redirect = http.get("/ui")
        assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
        for path, media_type in (
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
        ):
            response = http.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(media_type)
            policy = response.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src 'self';" in policy
            assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        # only the UI's own files, by name
        for path in (
            "/ui/app.py",
            "/ui/..%2Fapp.py",
            "/ui/%2e%2e/web.py",
            "/docs/assets/README.md",
        ):
            assert http.get(path).status_code == 404, path

        docs = http.get("/docs")
        assert docs.status_code == 200
        script_policy = docs.headers["content-security-policy"].split("script-src")[1].split(";")[0]
        assert "'sha256-" in script_policy and "unsafe" not in script_policy
        sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert len(sources) == 3  # the bundle, its stylesheet, the icon
        for source in sources:
            assert not source.startswith(("http:", "https:", "//")), source
            assert http.get(f"/{source}").status_code == 200, source  # relative to /docs
        assert http.get("/redoc").status_code == 404
        paths = http.get("/openapi.json").json()["paths"]
        assert not [path for path in paths if path.startswith(("/ui", "/docs"))]


def test_sweeps_have_their_own_collection(api):
    server, _, alice, *_ = api
    sweep = {"train": tiny_spec("sweep-base"), "search": {"optim.lr": {"grid": [0.1, 0.01]}},
             "scheduler": {"name": "fifo"}}  # fmt: skip
    with client_for(server, alice) as http:
        created = http.post("/v1/sweeps", json=sweep)
        assert created.status_code == 201, created.text
        record = created.json()
        assert record["kind"] == "sweep" and record["id"].startswith("sweep-")
        assert record["id"] in {s["id"] for s in http.get("/v1/sweeps").json()["items"]}
        assert record["id"] not in {j["id"] for j in http.get("/v1/jobs").json()["items"]}
        bad = http.post("/v1/sweeps", json={**sweep, "search": {"optim.nope": {"grid": [1]}}})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"].startswith("search")
        # a training spec is not a sweep
        assert http.post("/v1/sweeps", json=tiny_spec()).status_code == 422


def test_unknown_routes_and_methods_answer_json(api):
    server, _, alice, *_ = api
    with client_for(server, alice) as http:
        missing = http.get("/v2/nothing")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        wrong = http.delete("/v1/jobs")
        assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


def test_prometheus_metrics(api):
    server, *_ = api
    text = httpx.get(f"{server.url}/metrics").text
    assert 'topk_jobs{status="queued"}' in text
    assert "topk_reconciler_lag_seconds" in text
    assert 'topk_http_requests_total{method="POST",route="/v1/jobs",status="201"}' in text
    assert "topk_launches_total 0.0" in text


def test_openapi_documents_the_spec_bodies(api):
    server, *_ = api
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/TrainSpec"
    assert "SweepSpec" in schema["components"]["schemas"]
    assert "DataSpec" in schema["components"]["schemas"]
