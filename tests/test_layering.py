"""The folders show the dependency direction: topk <- jobs <- service."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("forbidden", ["ray", "fastapi", "pydantic"])
def test_topk_stays_pure_pytorch(forbidden):
    assert forbidden not in imported_after("import topk")


def test_service_cli_does_not_import_torch_or_ray():
    modules = imported_after("import service.cli; service.cli.build_parser()")
    assert "torch" not in modules
    assert "ray" not in modules


def test_spec_models_do_not_import_torch():
    modules = imported_after("import jobs.contract.train, jobs.contract.sweep")
    assert "torch" not in modules


# --- Static checks: every import in the source, those inside functions included. ---

ROOT = Path(__file__).resolve().parents[1]


def imports_of(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{module file: the absolute module names it imports anywhere} for one top-level package."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the importing module's package
                    base = module.split(".")[: -node.level]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                names.add(target)
                names.update(f"{target}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(root))] = names
    return found


def offenders(package: str, forbidden) -> list[str]:
    return sorted(
        f"{file}: {name}"
        for file, names in imports_of(package).items()
        for name in names
        if forbidden(name)
    )


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_service_imports_only_the_contract_package_of_jobs():
    assert (
        offenders("service", lambda n: _under(n, "jobs") and not _under(n, "jobs.contract")) == []
    )
    # `from jobs import x` would reach past the contract package too
    assert offenders("service", lambda n: n == "jobs") == []


def test_the_contract_package_needs_no_runtime():
    def runtime(name: str) -> bool:
        outside = _under(name, "jobs") and not _under(name, "jobs.contract")
        return outside or _under(name, "torch", "torchvision", "topk", "service", "webdataset")

    contract = {file: names for file, names in imports_of("jobs").items() if "/contract/" in file}
    assert contract, "jobs/contract/ not found"
    bad = sorted(f"{f}: {n}" for f, names in contract.items() for n in names if runtime(n))
    # ray is imported only inside the one function that builds a Ray Tune search space
    bad = [b for b in bad if not b.endswith(": ray")]
    assert bad == []


def test_the_layers_point_one_way_in_every_import():
    assert offenders("topk", lambda n: _under(n, "jobs", "service")) == []
    assert offenders("jobs", lambda n: _under(n, "service")) == []


def test_the_static_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "mod.py").write_text(
        "def f():\n    from jobs.training import run\n    import jobs.sweep as s\n"
        "from ..other import thing\n"
    )
    names = imports_of("pkg", root=tmp_path)["pkg/sub/mod.py"]
    assert {"jobs.training.run", "jobs.sweep", "pkg.other.thing"} <= names


def test_the_runtime_commands_reach_topk_through_entry_points():
    from importlib.metadata import entry_points

    import service.cli

    declared = {point.name for point in entry_points(group=service.cli.COMMAND_GROUP)}
    assert declared == {"shards", "validate", "train", "experiment"}
    parser = service.cli.build_parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    assert {"shards", "validate", "train", "sweep", "experiment", "serve", "demo"} <= set(
        commands.choices
    )
    # no module path of the runtime is written into the service, not even as a string
    runtime = sorted(
        p.stem for p in (ROOT / "jobs").iterdir() if p.stem not in ("contract", "__init__")
    )
    named = re.compile(rf"\bjobs\.({'|'.join(runtime)})\b")
    assert named.search('"jobs.data.cli"') and not named.search("jobs.contract.urls")
    for path in (ROOT / "service").rglob("*.py"):
        for line in path.read_text().splitlines():
            if named.search(line):
                pytest.fail(f"{path.relative_to(ROOT)} names a runtime module: {line.strip()}")
