"""Reading spec files and filling class counts from a real dataset.json written by the writer."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from jobs.contract.spec_files import (
    MAX_SPEC_FILE_BYTES,
    SpecFileError,
    format_validation_error,
    load_spec_file,
    parse_spec,
    parse_train_spec,
    resolve_class_counts,
)
from jobs.contract.sweep import SweepSpec
from jobs.contract.train import SpecError, TrainSpec
from jobs.data.writer import build_shards

YAML_SPEC = """\
data:
  train: shards/dataset.json
  val: shards/dataset.json
  num_classes: 4
loss: {name: noised_topk, k: 2, epsilon: 0.5}
metrics: {ks: [1, 2], select: val_macro_top2}
"""


def test_yaml_and_json_files_load_to_the_same_spec(tmp_path):
    yaml_path = tmp_path / "spec.yaml"
    yaml_path.write_text(YAML_SPEC)
    from_yaml = load_spec_file(str(yaml_path))
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(from_yaml))
    assert load_spec_file(str(json_path)) == from_yaml
    assert load_spec_file(f"file://{json_path}") == from_yaml
    spec = parse_spec(from_yaml)
    assert isinstance(spec, TrainSpec) and spec.loss.epsilon == 0.5


def test_specs_load_from_fsspec_urls():
    with fsspec.open("memory://specs/spec.yaml", "w") as handle:
        handle.write(YAML_SPEC)
    assert load_spec_file("memory://specs/spec.yaml")["loss"]["k"] == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("dup.yaml", "epochs: 1\nseed: 2\nepochs: 3\n", "duplicate key 'epochs' at line 3"),
        ("dup.json", '{"epochs": 1, "epochs": 2}', "not valid JSON: duplicate key 'epochs'"),
        ("bad.yaml", "data:\n  train: [a, b\n", "not valid YAML"),
        ("bad.json", '{"epochs": }', "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "a spec must be a mapping of fields, this file is a list"),
        ("empty.yaml", "", "this file is empty"),
        ("tag.yaml", "epochs: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ],
)
def test_unreadable_documents_raise_one_clear_error(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecFileError, match=message.replace("[", r"\[")) as info:
        load_spec_file(str(path))
    assert str(path) in str(info.value)


def test_missing_refused_huge_and_binary_files(tmp_path):
    with pytest.raises(SpecFileError, match="does not exist"):
        load_spec_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecFileError, match="'pipe:' URLs run shell commands"):
        load_spec_file("pipe:cat spec.yaml")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * MAX_SPEC_FILE_BYTES)
    with pytest.raises(SpecFileError, match="larger than"):
        load_spec_file(str(huge))
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(SpecFileError, match="not UTF-8"):
        load_spec_file(str(binary))


def test_a_document_with_search_is_a_sweep():
    raw = {
        "train": parse_spec(load_yaml_text(YAML_SPEC)).model_dump(),
        "search": {"loss.epsilon": {"grid": [0.1, 1.0]}},
        "metric": "val_macro_top2",
    }
    assert isinstance(parse_spec(raw), SweepSpec)


def load_yaml_text(text: str) -> dict:
    from jobs.contract.spec_files import parse_spec_text

    return parse_spec_text(text)


@pytest.fixture(scope="module")
def long_tail_dataset(tmp_path_factory) -> str:
    """A real 4-class long-tailed dataset (shards + dataset.json) from the shard writer."""
    root = tmp_path_factory.mktemp("lt")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    images = rng.integers(0, 255, size=(len(labels), 8, 8), dtype=np.uint8)
    np.savez(root / "arrays.npz", images=images, labels=labels)
    out = root / "shards"
    build_shards(
        str(root / "arrays.npz"),
        str(out),
        val_fraction=0.2,
        imbalance_ratio=8.0,
        shard_max_samples=8,
        progress=None,
    )
    return str(out)


def train_spec(train_source: object, loss: dict, num_classes: int = 4) -> TrainSpec:
    return parse_train_spec(
        {
            "data": {"train": train_source, "num_classes": num_classes},
            "loss": loss,
            "metrics": {"ks": [1, 2], "select": "train_loss", "mode": "min"},
        }
    )


def test_class_counts_come_from_the_dataset_json_of_the_training_data(long_tail_dataset):
    written = json.loads(Path(long_tail_dataset, "dataset.json").read_text())
    expected = written["splits"]["train"]["class_counts"]
    assert expected == [8, 4, 2, 1]  # 8 per class after the split, then the long tail
    shard_names = [s["path"] for s in written["splits"]["train"]["shards"]]
    sources = [
        f"{long_tail_dataset}/dataset.json",
        long_tail_dataset,
        [f"{long_tail_dataset}/{name}" for name in shard_names],
        f"{long_tail_dataset}/train-{{000000..{len(shard_names) - 1:06d}}}.tar",
    ]
    for source in sources:
        for loss in ("noised_topk_imbalanced", "ldam", "logit_adjusted"):
            spec = train_spec(source, {"name": loss, "k": 2} if "topk" in loss else {"name": loss})
            assert spec.loss.class_counts is None
            resolved = resolve_class_counts(spec)
            assert resolved.loss.class_counts == expected, (source, loss)
            assert resolved.model.cosine_head is type(spec.loss).needs_cosine_head


def test_resolving_fills_the_counts_without_validating_the_spec_again(long_tail_dataset):
    spec = train_spec(long_tail_dataset, {"name": "noised_topk_imbalanced", "k": 2})
    resolved = resolve_class_counts(spec)
    assert resolved.loss.class_counts == [8, 4, 2, 1]
    # A second validation would have built new sub-models; the spec was validated once.
    for part in ("data", "model", "optim", "scaling", "metrics"):
        assert getattr(resolved, part) is getattr(spec, part), part
    assert resolved.loss.epsilon == spec.loss.epsilon
    sweep = parse_spec(
        {
            "train": {**spec.model_dump(mode="json"), "loss": {"name": "ldam"}},
            "search": {"loss.max_m": {"grid": [0.1, 0.3]}},
            "metric": "train_loss",
            "mode": "min",
        }
    )
    filled = resolve_class_counts(sweep)
    assert filled.train.loss.class_counts == [8, 4, 2, 1]
    assert filled.search is sweep.search and filled.train.data is sweep.train.data


def test_counts_read_from_a_dataset_meet_the_counts_rule(tmp_path, long_tail_dataset):
    copy = tmp_path / "zeros"
    copy.mkdir()
    written = json.loads(Path(long_tail_dataset, "dataset.json").read_text())
    written["splits"]["train"]["class_counts"] = [0, 0, 0, 0]
    (copy / "dataset.json").write_text(json.dumps(written))
    with pytest.raises(SpecError, match="loss.class_counts.*at least one class with a positive"):
        format_validation_error(resolve_class_counts(train_spec(str(copy), {"name": "ldam"})))


def test_given_counts_and_losses_without_counts_are_left_alone(long_tail_dataset):
    given = train_spec(long_tail_dataset, {"name": "ldam", "class_counts": [1, 1, 1, 1]})
    assert resolve_class_counts(given) is given
    plain = train_spec("/nowhere/dataset.json", {"name": "noised_topk", "k": 2})
    assert resolve_class_counts(plain) is plain


def test_sweeps_resolve_their_base_training_spec(long_tail_dataset):
    sweep = parse_spec(
        {
            "train": {
                "data": {"train": long_tail_dataset, "num_classes": 4},
                "loss": {"name": "noised_topk_imbalanced", "k": 2},
                "metrics": {"ks": [1, 2], "select": "train_loss", "mode": "min"},
            },
            "search": {"loss.max_m": {"grid": [0.1, 0.3]}},
            "metric": "train_loss",
            "mode": "min",
        }
    )
    assert resolve_class_counts(sweep).train.loss.class_counts == [8, 4, 2, 1]


def test_missing_counts_name_loss_class_counts(tmp_path, long_tail_dataset):
    spec = train_spec(str(tmp_path / "absent" / "dataset.json"), {"name": "ldam"})
    with pytest.raises(SpecError) as info:
        resolve_class_counts(spec)
    [line] = format_validation_error(info.value)
    assert line.startswith("loss.class_counts: loss 'ldam' needs the per-class training counts")
    assert "no dataset.json at" in line
    wrong = train_spec(long_tail_dataset, {"name": "ldam"}, num_classes=5)
    with pytest.raises(SpecError, match=r"data.num_classes: is 5 but the dataset at .* has 4"):
        resolve_class_counts(wrong)
    narrowed = {"allowed_roots": [str(tmp_path)]}
    with pytest.raises(SpecError, match="outside the allowed roots"):
        resolve_class_counts(train_spec(long_tail_dataset, {"name": "ldam"}), context=narrowed)


def test_alias_bombs_are_refused_before_validation(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        levels.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    with pytest.raises(SpecFileError, match="values once aliases expand"):
        load_spec_file(str(path))
    # A modest use of anchors is fine.
    path.write_text("base: &base {lr: 0.1}\noptim: *base\n")
    assert load_spec_file(str(path))["optim"] == {"lr": 0.1}
