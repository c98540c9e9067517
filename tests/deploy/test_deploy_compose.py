"""docker/compose.yaml: the one-machine deployment is wired consistently, publishes nothing
beyond localhost, and uses exactly the settings the service reads."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from deploy_manifests import REPO, find

SERVICES = {"postgres", "minio", "minio-bucket", "ray-head", "ray-worker", "api"}


def interpolated_names(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", text))


def env_file_values() -> dict[str, str]:
    lines = (REPO / "docker" / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_compose_runs_the_whole_product(compose):
    assert set(compose["services"]) == SERVICES
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], (name, dependency)
        if "build" in service:
            assert (
                REPO / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
            ).exists()
    assert compose["services"]["ray-worker"]["image"] == compose["services"]["ray-head"]["image"]


def test_only_localhost_gets_published_ports(compose):
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published.append((name, int(port.split(":")[2])))
    assert sorted(published) == [("api", 8000), ("ray-head", 8265)]


def test_every_interpolated_variable_is_in_the_env_example(compose):
    text = (REPO / "docker" / "compose.yaml").read_text()
    example = env_file_values()
    assert interpolated_names(text) <= set(example)
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", key):
            assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"


def test_ray_runs_with_token_auth_and_no_work_on_the_head(compose):
    services = compose["services"]
    assert "--num-cpus=0" in services["ray-head"]["command"]
    assert "--num-gpus=0" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    for name in ("ray-head", "ray-worker", "api"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        (secret,) = services[name]["secrets"]
        assert env["RAY_AUTH_TOKEN_PATH"] == f"/run/secrets/{secret}", name
        assert secret in compose["secrets"]


def test_api_reaches_the_other_services_by_name(compose):
    services = compose["services"]
    env = services["api"]["environment"]
    ray = urlsplit(env["TOPK_RAY_ADDRESS"])
    assert (ray.hostname, ray.port) == ("ray-head", 8265)
    assert "--dashboard-port=8265" in services["ray-head"]["command"]
    database = urlsplit(env["TOPK_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres"
    postgres = services["postgres"]["environment"]
    assert database.username == postgres["POSTGRES_USER"]
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    storage = urlsplit(env["TOPK_STORAGE_URL"])
    assert storage.scheme == "s3"
    assert services["minio-bucket"]["entrypoint"][-1] == f"store/{storage.hostname}"
    assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "minio"


def test_api_container_is_read_only_with_a_writable_tmp(compose):
    api = compose["services"]["api"]
    assert api["read_only"] is True
    assert "/tmp" in api["tmpfs"]
    assert api["environment"]["TOPK_DATA_DIR"].startswith("/tmp/")


def test_dependencies_wait_for_health(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                # Either compose defines the check or the image's Dockerfile does.
                image = services[dependency].get("image", "")
                has_check = "healthcheck" in services[dependency] or image.startswith("topk-")
                assert has_check, (name, dependency)


def settings_the_code_reads() -> set[str]:
    """The Settings fields' variables (TOPK_<FIELD NAME>, read in one loop by Settings.from_env)
    and every other TOPK_ name the service's code spells out."""
    import dataclasses

    from service.settings import Settings

    names = {f"TOPK_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    for path in (REPO / "service").rglob("*.py"):
        names |= set(re.findall(r"\"(TOPK_[A-Z_]+)\"", path.read_text()))
    return names


def test_topk_settings_are_ones_the_service_reads(compose, rendered):
    known = settings_the_code_reads()
    assert {"TOPK_DATABASE_URL", "TOPK_RAY_ADDRESS", "TOPK_STORAGE_URL"} <= known
    used = {k for k in compose["services"]["api"]["environment"] if k.startswith("TOPK_")}
    (config,) = find(rendered, "ConfigMap", "topk-api-config")
    used |= set(config["data"])
    (deployment,) = find(rendered, "Deployment", "topk-api")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("TOPK_")}
    assert used - known == set()
