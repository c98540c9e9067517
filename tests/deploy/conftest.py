"""Fixtures for the offline deployment checks: rendered kustomize overlays, parsed files.

Nothing here can start a container or a cluster; every artifact is rendered and checked as data.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_manifests import OVERLAYS, REPO, render


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rendered(overlay) -> tuple[dict, ...]:
    """The objects of one overlay (the test runs once per overlay)."""
    return render(REPO / "k8s" / "overlays" / overlay)


@pytest.fixture(scope="session")
def dev_objects() -> tuple[dict, ...]:
    return render(REPO / "k8s" / "overlays" / "dev")


@pytest.fixture(scope="session")
def prod_objects() -> tuple[dict, ...]:
    return render(REPO / "k8s" / "overlays" / "prod")


@pytest.fixture(scope="session")
def pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


@pytest.fixture(scope="session")
def deploy_doc() -> str:
    return (REPO / "docs" / "deploy.md").read_text()
