"""docs/deploy.md stays true: the Secrets it creates are the ones the manifests reference, the
paths and names it mentions exist, the figures it quotes are the manifests' figures."""

from __future__ import annotations

import re

import pytest
from deploy_manifests import REPO, find, pod_templates, render


def shell_commands(doc: str) -> list[str]:
    """The lines of the doc's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", doc, flags=re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def documented_secrets(doc: str) -> set[tuple[str, str, str]]:
    """(namespace, secret name, key) for every `kubectl -n NS create secret generic` command."""
    created = set()
    for command in shell_commands(doc):
        match = re.search(r"kubectl -n (\S+) create secret generic (\S+)", command)
        if match:
            namespace, name = match.groups()
            for key in re.findall(r"--from-literal=([\w.-]+)=", command):
                created.add((namespace, name, key))
    return created


def referenced_secrets(objects) -> set[tuple[str, str]]:
    """(secret name, key) that the rendered objects need to exist."""
    needed = set()
    for template in pod_templates(objects):
        for container in template.spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    needed.add((ref["name"], ref["key"]))
        for volume in template.spec.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"].get("items", []):
                    needed.add((volume["secret"]["secretName"], item["key"]))
    for cluster in find(objects, "RayCluster"):
        spec = cluster["spec"]
        if "authOptions" in spec:
            needed.add((spec["authOptions"]["secretName"], "auth_token"))
        ref = spec.get("gcsFaultToleranceOptions", {}).get("redisPassword", {}).get("valueFrom")
        if ref:
            needed.add((ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
    return needed


def test_the_doc_creates_every_secret_the_overlay_needs(deploy_doc, rendered):
    (namespace,) = find(rendered, "Namespace")
    ns = namespace["metadata"]["name"]
    created = {(name, key) for n, name, key in documented_secrets(deploy_doc) if n == ns}
    needed = referenced_secrets(rendered)
    assert needed, "the overlay references no Secret?"
    assert needed - created == set()


def test_the_doc_applies_existing_overlays_in_their_namespaces(deploy_doc):
    commands = shell_commands(deploy_doc)
    for overlay in ("dev", "prod"):
        assert (REPO / "k8s" / "overlays" / overlay / "kustomization.yaml").exists()
        assert any(f"kubectl apply -k k8s/overlays/{overlay}" in c for c in commands)
    namespaces = {
        find(render(REPO / "k8s" / "overlays" / o), "Namespace")[0]["metadata"]["name"]
        for o in ("dev", "prod")
    }
    assert all(f"kubectl create namespace {ns}" in commands for ns in namespaces)


def test_every_repository_path_in_the_doc_exists(deploy_doc):
    paths = set(re.findall(r"`((?:docker|k8s|docs|tests)/[\w./-]*)`", deploy_doc))
    paths |= set(re.findall(r"-f (docker/[\w./-]+)", deploy_doc))
    assert len(paths) >= 8
    for path in paths - {"docker/.env"}:  # the one file the reader creates (from .env.example)
        assert (REPO / path).exists(), path


def test_port_forwards_and_exec_target_real_objects(deploy_doc, prod_objects):
    (service,) = find(prod_objects, "Service", "topk-api")
    service_port = service["spec"]["ports"][0]["port"]
    assert f"port-forward svc/topk-api 8000:{service_port}" in deploy_doc
    cluster = find(prod_objects, "RayCluster")[0]["metadata"]["name"]
    assert f"port-forward svc/{cluster}-head-svc 8265:8265" in deploy_doc
    (config,) = find(prod_objects, "ConfigMap", "topk-api-config")
    assert config["data"]["TOPK_RAY_DASHBOARD_URL"] == "http://127.0.0.1:8265"
    assert "exec deploy/topk-api -- topk token create" in deploy_doc


def test_quoted_figures_are_the_manifests(deploy_doc, prod_objects, dev_objects):
    (prod_config,) = find(prod_objects, "ConfigMap", "topk-api-config")
    (dev_config,) = find(dev_objects, "ConfigMap", "topk-api-config")
    assert f"`{prod_config['data']['TOPK_STORAGE_URL']}`" in deploy_doc
    assert f"`{dev_config['data']['TOPK_STORAGE_URL']}`" in deploy_doc
    (gpu,) = find(prod_objects, "RayCluster")[0]["spec"]["workerGroupSpecs"]
    assert f"prod: {gpu['minReplicas']} to {gpu['maxReplicas']}" in deploy_doc
    autoscaler = find(prod_objects, "RayCluster")[0]["spec"]["autoscalerOptions"]
    assert f"after {autoscaler['idleTimeoutSeconds']} s idle" in deploy_doc
    ray_base = re.search(
        r"^FROM (rayproject/ray:\S+)", (REPO / "docker" / "ray.Dockerfile").read_text(), re.M
    )
    assert f"`{ray_base.group(1)}`" in deploy_doc


@pytest.mark.parametrize(
    "needle", ["KubeRay operator v1.6.0 or newer", "nvidia.com/gpu", "## Upgrade", "## Scale"]
)
def test_the_doc_covers_the_prerequisites_and_operations(deploy_doc, needle):
    assert needle in deploy_doc
