"""The kustomize overlays render, validate against the Kubernetes and KubeRay schemas, and have
the properties the deployment promises (no public Ray, GPU workers, hardened API pods)."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_manifests import find, pod_templates
from shared_paths import SHARED

# The oldest Kubernetes release the manifests are written for (docs/deploy.md says the same),
# and the newest whose schemas kubernetes-validate ships (catches removed APIs).
KUBERNETES_VERSION = "1.30.0"
KUBERNETES_VERSIONS = (KUBERNETES_VERSION, kubernetes_validate.utils.latest_version())
RAYCLUSTER_CRD = SHARED / "k8s-schemas" / "ray.io_rayclusters.yaml"
CUSTOM_KINDS = {"RayCluster"}


def closed(schema: dict) -> dict:
    """A copy of an OpenAPI v3 CRD schema that rejects unknown fields.

    The API server silently prunes fields a CRD does not declare, so a misspelt field would
    vanish instead of failing; here every object with declared properties is closed.
    """
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(RAYCLUSTER_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft202012Validator(closed(version["schema"]["openAPIV3Schema"]))


def raycluster(objects) -> dict:
    (cluster,) = find(objects, "RayCluster")
    return cluster


def container_named(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(rendered, kubernetes_version):
    kinds = set()
    for obj in rendered:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kinds.add(obj["kind"])
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {exc.path}")
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_kubernetes_validation_rejects_a_misspelt_field(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_raycluster_validates_against_the_kuberay_crd(rendered, raycluster_validator):
    cluster = raycluster(rendered)
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in raycluster_validator.iter_errors(cluster)
    ]
    assert errors == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplica=3),
        lambda c: c["spec"].update(authOptions={"mode": "password"}),
        lambda c: c["spec"]["headGroupSpec"].update(rayStartParams={"num-cpus": 0}),
    ],
    ids=["unknown-field", "bad-enum", "int-start-param"],
)
def test_crd_validation_rejects_broken_clusters(rendered, raycluster_validator, mutate):
    broken = copy.deepcopy(raycluster(rendered))
    mutate(broken)
    assert list(raycluster_validator.iter_errors(broken))


# --- Ray: private, token-authenticated, no work on the head ---------------------------------


def test_ray_dashboard_is_never_exposed_outside_the_cluster(rendered):
    assert not find(rendered, "Ingress")
    for service in find(rendered, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
    head = raycluster(rendered)["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    for template in pod_templates(rendered):
        assert not template.spec.get("hostNetwork"), template.owner
        for container in template.spec["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, template.owner


def test_head_schedules_no_training_work(rendered):
    params = raycluster(rendered)["spec"]["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["num-gpus"] == "0"


def test_ray_uses_token_auth_from_the_secret_the_api_mounts(rendered):
    auth = raycluster(rendered)["spec"]["authOptions"]
    assert auth["mode"] == "token"
    (deployment,) = find(rendered, "Deployment", "topk-api")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container_named(pod, "api")["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token_path = env["RAY_AUTH_TOKEN_PATH"]["value"]
    mounts = {m["name"]: m for m in container_named(pod, "api")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount_name,) = [n for n, m in mounts.items() if token_path.startswith(m["mountPath"] + "/")]
    secret = volumes[mount_name]["secret"]
    assert secret["secretName"] == auth["secretName"]
    file_name = token_path.rsplit("/", 1)[1]
    # KubeRay reads the token from the key auth_token of the Secret named in authOptions.
    assert {"key": "auth_token", "path": file_name} in secret["items"]


def test_autoscaling_bounds_are_consistent(rendered):
    cluster = raycluster(rendered)["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        assert group["maxReplicas"] >= 1


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_prod_trains_on_gpu_workers_that_tolerate_the_gpu_taint(prod_objects):
    groups = raycluster(prod_objects)["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        pod = group["template"]["spec"]
        (worker,) = pod["containers"]
        assert gpu_limit(worker) >= 1
        requests = worker["resources"]["requests"]
        assert requests.get("nvidia.com/gpu") == worker["resources"]["limits"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert group["minReplicas"] == 0  # GPUs are released when idle


def test_prod_gcs_is_fault_tolerant_on_external_redis(prod_objects, dev_objects):
    options = raycluster(prod_objects)["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"]
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]
    assert "gcsFaultToleranceOptions" not in raycluster(dev_objects)["spec"]


def test_dev_is_a_small_cpu_cluster(dev_objects):
    cluster = raycluster(dev_objects)["spec"]
    for template in pod_templates(dev_objects):
        for container in template.spec["containers"]:
            assert gpu_limit(container) == 0, template.owner
    assert sum(g["maxReplicas"] for g in cluster["workerGroupSpecs"]) <= 4


def test_ray_version_of_the_cluster_is_the_one_the_project_pins(rendered, pyproject):
    (ray_pin,) = [r for r in pyproject["project"]["optional-dependencies"]["jobs"] if "ray" in r]
    assert raycluster(rendered)["spec"]["rayVersion"] == ray_pin.split("==")[1]


# --- the API --------------------------------------------------------------------------------


def test_api_runs_two_probed_replicas_with_resources(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    api = container_named(pod, "api")
    port_names = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["readinessProbe"]["httpGet"]["port"] in port_names
    assert port_names[api["readinessProbe"]["httpGet"]["port"]] == 8000
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(api["resources"][kind])


def test_api_pod_is_non_root_with_a_read_only_root_and_a_writable_tmp(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    pod = deployment["spec"]["template"]["spec"]
    api = container_named(pod, "api")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    tmp_mount = next(m for m in api["volumeMounts"] if m["mountPath"] == "/tmp")
    tmp_volume = next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])
    assert "emptyDir" in tmp_volume
    (config,) = find(rendered, "ConfigMap", "topk-api-config")
    assert config["data"]["TOPK_DATA_DIR"].startswith("/tmp/")


def test_api_has_least_privilege_identity(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    pod = deployment["spec"]["template"]["spec"]
    (account,) = find(rendered, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        assert not find(rendered, kind)


def test_api_service_and_disruption_budget_select_the_api_pods(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = find(rendered, "Service", "topk-api")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (budget,) = find(rendered, "PodDisruptionBudget", "topk-api")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_api_settings_come_from_config_map_and_secret(rendered):
    (deployment,) = find(rendered, "Deployment", "topk-api")
    api = container_named(deployment["spec"]["template"]["spec"], "api")
    config_maps = {e["configMapRef"]["name"] for e in api["envFrom"] if "configMapRef" in e}
    for name in config_maps:
        assert find(rendered, "ConfigMap", name), name
    env = {e["name"]: e for e in api["env"]}
    assert env["TOPK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "topk-api"
    (config,) = find(rendered, "ConfigMap", "topk-api-config")
    # The head Service KubeRay creates is <cluster name>-head-svc; 8265 serves the Jobs API.
    cluster_name = raycluster(rendered)["metadata"]["name"]
    assert config["data"]["TOPK_RAY_ADDRESS"] == f"http://{cluster_name}-head-svc:8265"
    assert config["data"]["TOPK_STORAGE_URL"].startswith("s3://")


# --- every pod ------------------------------------------------------------------------------


def test_every_container_is_hardened_and_bounded(rendered):
    for template in pod_templates(rendered):
        pod_context = template.spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, template.owner
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for container in template.spec["containers"]:
            where = f"{template.owner}/{container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert "memory" in container["resources"]["limits"], where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where


def test_the_autoscaler_sidecar_is_hardened_and_bounded(rendered):
    options = raycluster(rendered)["spec"]["autoscalerOptions"]
    context = options["securityContext"]
    assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "memory" in options["resources"]["limits"]


def test_only_the_pods_that_talk_to_kubernetes_get_a_token(rendered):
    # Ray workers never call the Kubernetes API; the head keeps its token for the autoscaler.
    for template in pod_templates(rendered):
        if template.labels.get("ray.io/node-type") == "head":
            continue
        assert template.spec.get("automountServiceAccountToken") is False, template.owner


def test_namespace_enforces_pod_security(rendered):
    (namespace,) = find(rendered, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"]


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_queue_ceiling_matches_the_autoscaled_worker_groups(rendered):
    """TOPK_CLUSTER_MAX_CPUS/GPUS must equal what the worker groups can scale to, or the API
    would hold jobs queued forever (too low) or admit jobs that can never be placed (too high)."""
    (cluster,) = [o for o in rendered if o["kind"] == "RayCluster"]
    max_cpus = max_gpus = 0.0
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        max_cpus += group["maxReplicas"] * _quantity(limits.get("cpu", 0))
        max_gpus += group["maxReplicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
    config = {}
    for obj in rendered:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "topk-api-config":
            config = obj["data"]
    assert float(config["TOPK_CLUSTER_MAX_CPUS"]) == max_cpus
    assert float(config["TOPK_CLUSTER_MAX_GPUS"]) == max_gpus
