"""NetworkPolicies, evaluated: who can open which port on which pod in the rendered overlays.

The evaluator follows the Kubernetes semantics for ingress: a pod selected by no ingress policy
accepts everything; a selected pod accepts a connection that at least one of its policies'
rules allows (peers and ports both match). A peer with only a podSelector means pods of the
policy's own namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from deploy_manifests import find, pod_templates

OTHER_NAMESPACE = "somewhere-else"


@dataclass(frozen=True)
class Pod:
    labels: dict
    namespace: str


def selects(selector: dict, labels: dict) -> bool:
    """Label-selector match (matchLabels and matchExpressions); {} selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict, source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return True  # conservatively: an ipBlock could be any address
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": source.namespace}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), source.labels)


def port_matches(rule_ports: list[dict] | None, port: int) -> bool:
    if not rule_ports:
        return True
    return any(p.get("port") in (None, port) for p in rule_ports)


def allowed(objects, source: Pod, target: Pod, port: int) -> bool:
    policies = [
        p
        for p in find(objects, "NetworkPolicy")
        if p["metadata"]["namespace"] == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = not peers or any(
                peer_matches(peer, source, policy["metadata"]["namespace"]) for peer in peers
            )
            if peer_ok and port_matches(rule.get("ports"), port):
                return True
    return False


@pytest.fixture(scope="module")
def pods(rendered) -> dict[str, Pod]:
    """The overlay's pods by role, plus strangers in and outside the namespace."""
    (namespace,) = find(rendered, "Namespace")
    ns = namespace["metadata"]["name"]
    by_owner = {t.owner: Pod(t.labels, ns) for t in pod_templates(rendered)}
    ray_workers = [p for o, p in by_owner.items() if "RayCluster" in o and "headgroup" not in o]
    return {
        "api": by_owner["Deployment/topk-api"],
        "head": next(p for o, p in by_owner.items() if o.endswith("/headgroup")),
        "worker": ray_workers[0],
        "stranger": Pod({"app": "debug-shell"}, ns),
        "outsider": Pod({"app.kubernetes.io/name": "topk-api"}, OTHER_NAMESPACE),
    }


RAY_PORTS = (6379, 8265, 10001, 8080)


def test_only_api_pods_reach_the_jobs_api(rendered, pods):
    assert allowed(rendered, pods["api"], pods["head"], 8265)
    assert not allowed(rendered, pods["stranger"], pods["head"], 8265)
    assert not allowed(rendered, pods["outsider"], pods["head"], 8265)


def test_api_pods_reach_nothing_else_on_ray(rendered, pods):
    for port in (6379, 10001, 8080):
        assert not allowed(rendered, pods["api"], pods["head"], port), port
    assert not allowed(rendered, pods["api"], pods["worker"], 8265)


def test_ray_nodes_reach_each_other(rendered, pods):
    for port in RAY_PORTS:
        assert allowed(rendered, pods["worker"], pods["head"], port)
    assert allowed(rendered, pods["head"], pods["worker"], 12345)


def test_nothing_outside_the_namespace_reaches_ray(rendered, pods):
    for target in ("head", "worker"):
        for port in (*RAY_PORTS, 52365):
            assert not allowed(rendered, pods["outsider"], pods[target], port), (target, port)
            assert not allowed(rendered, pods["stranger"], pods[target], port), (target, port)


def test_api_serves_http_only(rendered, pods):
    assert allowed(rendered, pods["outsider"], pods["api"], 8000)
    assert not allowed(rendered, pods["stranger"], pods["api"], 9000)


def test_dev_data_stores_are_reachable_only_by_their_clients(dev_objects):
    ns = find(dev_objects, "Namespace")[0]["metadata"]["name"]
    by_owner = {t.owner: Pod(t.labels, ns) for t in pod_templates(dev_objects)}
    api, postgres = by_owner["Deployment/topk-api"], by_owner["StatefulSet/topk-postgres"]
    minio = by_owner["StatefulSet/topk-minio"]
    head = by_owner["RayCluster/topk-raycluster/headgroup"]
    stranger = Pod({"app": "debug-shell"}, ns)
    assert allowed(dev_objects, api, postgres, 5432)
    assert not allowed(dev_objects, head, postgres, 5432)
    assert not allowed(dev_objects, stranger, postgres, 5432)
    for client in (api, head, by_owner["Job/topk-minio-bucket"]):
        assert allowed(dev_objects, client, minio, 9000)
    assert not allowed(dev_objects, stranger, minio, 9000)


def test_the_evaluator_denies_what_no_rule_allows():
    # A policy that selects a pod with an empty ingress list isolates it completely.
    objects = (
        {
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "ns"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []},
        },
    )
    assert not allowed(objects, Pod({}, "ns"), Pod({"a": "b"}, "ns"), 80)
    assert allowed(objects, Pod({}, "ns"), Pod({"a": "b"}, "other"), 80)
