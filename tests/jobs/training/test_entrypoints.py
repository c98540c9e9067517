"""`python -m jobs train|sweep` and `topk train|sweep`: clear errors for bad input (no
traceback; exit 2 for bad arguments or an unreadable file, 3 for an invalid spec) and a real run
through the CLI on the session's Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml


def _python_m_jobs(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _write(path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_missing_spec_file_is_one_line_and_exit_2(tmp_path):
    done = _python_m_jobs(
        "train", "--spec", str(tmp_path / "absent.yaml"), "--run-name", "r1", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "absent.yaml" in done.stderr


def test_an_invalid_spec_names_the_field_paths(tmp_path, omniglot_spec):
    spec = omniglot_spec(str(tmp_path / "dataset.json"))
    spec["loss"]["k"] = 30  # k + 1 > 30 classes
    done = _python_m_jobs(
        "train", "--spec", _write(tmp_path / "bad.yaml", spec), "--run-name", "r1", cwd=tmp_path
    )
    assert done.returncode == 3  # an invalid spec (jobs/contract/exit_codes.py)
    assert "Traceback" not in done.stderr
    assert "loss.k:" in done.stderr
    spec["loss"]["k"] = 5
    spec["epochs"] = 0
    spec["optim"]["lrr"] = 0.1
    done = _python_m_jobs(
        "train", "--spec", _write(tmp_path / "bad.yaml", spec), "--run-name", "r1", cwd=tmp_path
    )
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "epochs:" in done.stderr and "optim.lrr:" in done.stderr


def test_a_bad_run_name_and_the_wrong_kind_of_spec_are_refused(tmp_path, omniglot_spec):
    (tmp_path / "dataset.json").touch()  # local data must exist; these runs never read it
    spec = _write(tmp_path / "ok.yaml", omniglot_spec(str(tmp_path / "dataset.json")))
    done = _python_m_jobs("train", "--spec", spec, "--run-name", "../escape", cwd=tmp_path)
    assert done.returncode == 2 and "run name" in done.stderr and "Traceback" not in done.stderr
    done = _python_m_jobs("sweep", "--spec", spec, "--run-name", "s1", cwd=tmp_path)
    assert done.returncode == 2 and "training spec" in done.stderr
    done = _python_m_jobs("train", "--spec", spec, cwd=tmp_path)  # --run-name is required
    assert done.returncode == 2 and "--run-name" in done.stderr


@pytest.mark.slow
def test_topk_train_runs_a_spec_and_prints_each_epoch(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path, capsys
):
    from service.cli import main

    spec = omniglot_spec(omniglot_dataset, epochs=2, scaling={"num_workers": 1})
    path = _write(tmp_path / "omniglot.yaml", spec)
    code = main(["train", path, "--run-name", "cli-run", "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val_top5" in out
    result = json.loads((tmp_path / "runs" / "cli-run" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["epochs"] == 2


def test_counts_that_cannot_be_read_at_start_up_fail_the_run_with_the_reason(tmp_path):
    """The service accepts a job whose dataset.json it may not read (a remote host outside
    TOPK_ALLOWED_HOSTS); the worker resolves the counts at start-up. When it cannot, result.json
    says why, so the service fails the job with that reason instead of retrying it as an
    infrastructure failure."""
    shards = tmp_path / "shards"  # shards without a dataset.json: no counts to read
    shards.mkdir()
    for name in ("train-000.tar", "train-001.tar"):
        (shards / name).touch()
    spec = {
        "data": {"train": str(shards / "train-{000..001}.tar"), "num_classes": 10},
        "loss": {"name": "ldam"},
        "metrics": {"select": "train_loss", "mode": "min"},
        "epochs": 1,
    }
    storage = tmp_path / "runs"
    done = _python_m_jobs(
        "train", "--spec", _write(tmp_path / "spec.yaml", spec), "--run-name", "job-1",
        "--storage", str(storage), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "loss.class_counts:" in done.stderr
    result = json.loads((storage / "job-1" / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["error"].startswith("invalid spec: loss.class_counts: loss 'ldam' needs")
    # without --storage (a run from a shell, not the service) nothing is written
    done = _python_m_jobs(
        "train", "--spec", str(tmp_path / "spec.yaml"), "--run-name", "job-2", cwd=tmp_path
    )
    assert done.returncode == 3 and not (tmp_path / ".topk").exists()
