"""`topk validate SPEC`: every problem with its field path, exit 3 when invalid, 2 when
unreadable (jobs/contract/exit_codes.py); local data that does not exist is a problem of its field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.contract import exit_codes
from jobs.contract.train import TrainSpec
from service.cli import main as topk_main

TRAIN_COUNTS = [30 - i for i in range(20)]

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


@pytest.fixture(autouse=True)
def data(tmp_path, monkeypatch):
    """The specs' relative `data/` in the working directory: a dataset.json of 20 classes
    naming its shards, and the (empty) shards themselves."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    splits = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", [2] * 20)):
        (folder / f"{split}-000.tar").touch()
        shard = {"path": f"{split}-000.tar", "samples": sum(counts), "bytes": 0}
        splits[split] = {"num_samples": sum(counts), "class_counts": counts, "shards": [shard]}
    info = {"format": "topk-webdataset", "format_version": 1, "num_classes": 20, "splits": splits}
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


def test_a_valid_spec_prints_a_summary_and_exits_0(tmp_path, capsys):
    assert topk_main(["validate", write(tmp_path, "ok.yaml", VALID)]) == 0
    out = capsys.readouterr().out
    assert "valid training spec: noised_topk(k=3, epsilon=0.5, n_samples=5" in out
    assert "on 20 classes" in out


def test_an_invalid_spec_lists_every_problem_and_exits_3(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", INVALID)
    assert topk_main(["validate", path]) == exit_codes.INVALID_SPEC == 3
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
    assert topk_main(["validate", str(tmp_path / "missing.yaml")]) == exit_codes.USAGE == 2
    assert "does not exist" in capsys.readouterr().err
    assert topk_main(["validate", write(tmp_path, "x.yaml", "a: [1,\n")]) == exit_codes.USAGE
    assert "not valid YAML" in capsys.readouterr().err


def test_class_counts_are_resolved_unless_told_not_to(tmp_path, capsys):
    ldam = VALID.replace("{name: noised_topk, k: 3, epsilon: 0.5}", "{name: ldam}")
    path = write(tmp_path, "ldam.yaml", ldam)
    assert topk_main(["validate", path]) == 0
    assert "ldam(max_m=0.2, scale=40.0) with class counts 11..30" in capsys.readouterr().out
    # shards without a dataset.json beside them: the counts cannot be read
    (tmp_path / "data" / "dataset.json").unlink()
    path = write(tmp_path, "ldam.yaml", ldam.replace("data/dataset.json", "data/train-000.tar"))
    assert topk_main(["validate", path]) == exit_codes.INVALID_SPEC
    err = capsys.readouterr().err
    assert "loss.class_counts: loss 'ldam' needs the per-class training counts" in err
    assert "--no-resolve" in err.splitlines()[-1]
    assert topk_main(["validate", "--no-resolve", path]) == 0
    assert "ldam(max_m=0.2, scale=40.0)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train", "absent/dataset.json", "absent/dataset.json does not exist"),
        ("train", "absent", "absent does not exist"),
        ("train", "data/shards-{000..003}.tar", "shard {data}/shards-000.tar does not exist"),
        ("train", "absent/train-{000..003}.tar", "folder {tmp}/absent does not exist"),
        ("val", "data/val-001.tar", "shard {data}/val-001.tar does not exist"),
        ("val", "data/dataset.json#test", None),  # the file is there; its split is the job's
        ("train", "s3://bucket/never-looked-at/dataset.json", None),
        ("train", "https://example.org/never-looked-at/train-{0..9}.tar", None),
    ],
)
def test_local_data_that_does_not_exist_is_refused_naming_the_field(
    tmp_path, data, capsys, field, value, message
):
    spec = VALID.replace(f"{field}: data/dataset.json", f"{field}: '{value}'")
    assert topk_main(["validate", write(tmp_path, "spec.yaml", spec)]) == (
        exit_codes.INVALID_SPEC if message else exit_codes.OK
    )
    err = capsys.readouterr().err
    if message:
        expected = message.format(data=data, tmp=tmp_path)
        problem = next(line.strip() for line in err.splitlines() if f"data.{field}:" in line)
        assert problem.startswith(f"data.{field}: ") and expected in problem, err
        assert "topk shards build" in err.splitlines()[-1]  # the hint
        # structure only: nothing is looked for
        assert topk_main(["validate", "--no-resolve", str(tmp_path / "spec.yaml")]) == 0


def test_a_shard_list_and_pretrained_weights_are_checked_too(tmp_path, data, capsys):
    (tmp_path / "weights").mkdir()
    spec = (
        VALID.replace("train: data/dataset.json", "train: [data/train-000.tar, data/train-009.tar]")
        + "model: {pretrained: weights}\n"
    )
    assert topk_main(["validate", write(tmp_path, "spec.yaml", spec)]) == 3
    err = capsys.readouterr().err
    assert f"data.train[1]: shard {data}/train-009.tar does not exist" in err
    assert "data.train[0]" not in err
    assert f"model.pretrained: {tmp_path}/weights is a folder, not a weights file" in err


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
    assert topk_main(["validate", write(tmp_path, "bad_sweep.yaml", bad)]) == 3
    assert "search.loss.eps: not a field of the training spec" in capsys.readouterr().err


def test_the_service_allow_list_from_the_environment_applies(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "s3.yaml", VALID + "storage: s3://bucket/runs\n")
    assert topk_main(["validate", path]) == 0
    capsys.readouterr()
    monkeypatch.setenv("TOPK_ALLOWED_PROTOCOLS", "file")
    assert topk_main(["validate", path]) == 3
    assert "storage: refused URL 's3://bucket/runs'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "code"), [(INVALID, 3), ("- not a mapping\n", 2)])
def test_the_real_command_never_prints_a_traceback(tmp_path, text, code):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "validate", write(tmp_path, "spec.yaml", text)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == code
    assert "Traceback" not in result.stderr and result.stderr.strip()


@pytest.mark.parametrize("image_format", ["png", "webp", "jpeg", None])
def test_device_decoding_of_a_dataset_that_holds_no_jpeg_is_refused(
    tmp_path, data, capsys, image_format
):
    """dataset.json's source.image_format says what the shards hold: PNG or WebP with
    data.decode device is a problem of data.decode; JPEG, or a dataset that does not say
    (the loader then checks each sample), passes."""
    info = json.loads((data / "dataset.json").read_text())
    if image_format is not None:
        info["source"] = {"image_format": image_format}
    (data / "dataset.json").write_text(json.dumps(info))
    spec = write(
        tmp_path, "device.yaml", VALID.replace("num_classes: 20", "num_classes: 20, decode: device")
    )
    code = topk_main(["validate", spec])
    err = capsys.readouterr().err
    if image_format in ("png", "webp"):
        assert code == exit_codes.INVALID_SPEC
        assert "data.decode: 'device' decodes JPEG images only, and data.train" in err
        assert f"holds {image_format} images" in err
    else:
        assert code == exit_codes.OK, err
    # --no-resolve reads no dataset.json, so it cannot tell
    assert topk_main(["validate", "--no-resolve", spec]) == exit_codes.OK


def test_whole_number_arguments_say_their_range():
    """The argparse type the commands share (`--concurrency`, `--epochs`, `--max-per-class`)."""
    import argparse

    from jobs.contract.cli import whole_number

    assert whole_number(1, 64)("64") == 64 and whole_number(1)("1000000") == 1000000
    for parse, text, message in (
        (whole_number(1, 64), "65", "expected a whole number from 1 to 64, got '65'"),
        (whole_number(3, 200), "x", "expected a whole number from 3 to 200, got 'x'"),
        (whole_number(1), "0", "expected a whole number of at least 1, got '0'"),
        (whole_number(1), "1.5", "expected a whole number of at least 1, got '1.5'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace(".", r"\.")):
            parse(text)
