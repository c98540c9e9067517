"""Views of the rendered deployment manifests, shared by the tests in tests/deploy/.

Rendering uses the real kustomize (standalone or built into kubectl), offline.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")


def kustomize_command(directory: Path) -> list[str]:
    """The command that renders `directory`: a standalone kustomize, else `kubectl kustomize`."""
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build", str(directory)]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize", str(directory)]
    pytest.fail(
        "rendering k8s/ needs `kustomize` or `kubectl` on PATH "
        "(Debian: apt-get install kubernetes-client)"
    )


@cache
def render(directory: Path) -> tuple[dict, ...]:
    """The objects that kustomize renders from `directory`; fails the test on a kustomize error."""
    result = subprocess.run(
        kustomize_command(directory), capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        pytest.fail(f"kustomize failed on {directory}:\n{result.stderr}")
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


@dataclass(frozen=True)
class PodTemplate:
    """One pod spec in the rendered manifests, with the labels its pods carry."""

    owner: str  # "Kind/name" or "RayCluster/name/group"
    spec: dict
    labels: dict


def pod_templates(objects: tuple[dict, ...]) -> list[PodTemplate]:
    """Every pod template: workload controllers, and the RayCluster's head and worker groups.

    Ray pods get the labels KubeRay puts on them (ray.io/cluster, ray.io/node-type, ray.io/group)
    on top of their template's labels.
    """
    templates = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            template = obj["spec"]["template"]
            templates.append(
                PodTemplate(f"{kind}/{name}", template["spec"], template["metadata"]["labels"])
            )
        elif kind == "RayCluster":
            groups = [("head", "headgroup", obj["spec"]["headGroupSpec"])]
            groups += [("worker", g["groupName"], g) for g in obj["spec"]["workerGroupSpecs"]]
            for node_type, group, group_spec in groups:
                template = group_spec["template"]
                labels = dict(template.get("metadata", {}).get("labels", {}))
                labels.update(
                    {"ray.io/cluster": name, "ray.io/node-type": node_type, "ray.io/group": group}
                )
                templates.append(
                    PodTemplate(f"RayCluster/{name}/{group}", template["spec"], labels)
                )
    return templates


def find(objects: tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
