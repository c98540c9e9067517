"""`topk validate SPEC`: every problem with its field path, exit 1 when invalid, 2 when unreadable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.spec.train import TrainSpec
from service.cli import main as topk_main

VALID = """\
data: {train: data/dataset.json, val: data/dataset.json, num_classes: 20}
loss: {name: noised_topk, k: 3, epsilon: 0.5}
"""
INVALID = """\
data: {train: data/dataset.json, val: data/dataset.json, num_classes: 20}
loss: {name: noised_topk, k: 20}
model: {arch: cifar_resnet20, cosine_head: true}
metrics: {ks: [1, 5, 30]}
"""


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_valid_spec_prints_a_summary_and_exits_0(tmp_path, capsys):
    assert topk_main(["validate", write(tmp_path, "ok.yaml", VALID)]) == 0
    out = capsys.readouterr().out
    assert "valid training spec: noised_topk(k=3, epsilon=0.5, n_samples=5" in out
    assert "on 20 classes" in out


def test_an_invalid_spec_lists_every_problem_and_exits_1(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", INVALID)
    assert topk_main(["validate", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: invalid spec (3 problem(s)):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "loss.k",
        "model.cosine_head",
        "metrics.ks[2]",
    ]
    assert "loss.k: k + 1 = 21 exceeds data.num_classes = 20" in captured.err


def test_an_unreadable_file_exits_2(tmp_path, capsys):
    assert topk_main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert topk_main(["validate", write(tmp_path, "x.yaml", "a: [1,\n")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_class_counts_are_resolved_unless_told_not_to(tmp_path, capsys):
    path = write(
        tmp_path,
        "ldam.yaml",
        VALID.replace("{name: noised_topk, k: 3, epsilon: 0.5}", "{name: ldam}"),
    )
    assert topk_main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "loss.class_counts: loss 'ldam' needs the per-class training counts" in err
    assert "--no-resolve" in err.splitlines()[-1]
    assert topk_main(["validate", "--no-resolve", path]) == 0
    assert "ldam(max_m=0.2, scale=40.0)" in capsys.readouterr().out


def test_print_gives_the_complete_spec_as_json(tmp_path, capsys):
    assert topk_main(["validate", "--print", write(tmp_path, "ok.yaml", VALID)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["cosine_head"] is False and printed["epochs"] == 10
    assert TrainSpec.model_validate(printed).loss.k == 3


def test_sweeps_are_recognised(tmp_path, capsys):
    train = "\n".join("  " + line for line in VALID.splitlines())
    text = f"train:\n{train}\nsearch:\n  loss.epsilon: {{grid: [0.1, 1.0]}}\n"
    assert topk_main(["validate", write(tmp_path, "sweep.yaml", text)]) == 0
    assert "valid sweep spec: loss.epsilon (grid [0.1, 1.0])" in capsys.readouterr().out
    bad = text.replace("loss.epsilon", "loss.eps")
    assert topk_main(["validate", write(tmp_path, "bad_sweep.yaml", bad)]) == 1
    assert "search.loss.eps: not a field of the training spec" in capsys.readouterr().err


def test_the_service_allow_list_from_the_environment_applies(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "s3.yaml", VALID + "storage: s3://bucket/runs\n")
    assert topk_main(["validate", path]) == 0
    capsys.readouterr()
    monkeypatch.setenv("TOPK_ALLOWED_PROTOCOLS", "file")
    assert topk_main(["validate", path]) == 1
    assert "storage: refused URL 's3://bucket/runs'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "code"), [(INVALID, 1), ("- not a mapping\n", 2)])
def test_the_real_command_never_prints_a_traceback(tmp_path, text, code):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "validate", write(tmp_path, "spec.yaml", text)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == code
    assert "Traceback" not in result.stderr and result.stderr.strip()
