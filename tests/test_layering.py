"""The folders show the dependency direction: topk <- jobs <- service."""

import subprocess
import sys

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
