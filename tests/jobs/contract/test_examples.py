"""Every shipped example spec is a test: it validates, it carries the published settings, its
class counts come from the dataset it names, and the `topk shards build` command in its header
makes the data it names (skipped, saying so, where the source is not on this machine)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.contract.dataset_info import DatasetInfo, read_dataset_info
from jobs.contract.loss import LOSS_SPECS
from jobs.contract.spec_files import load_spec_file, parse_spec, resolve_class_counts
from jobs.contract.sweep import SweepSpec
from topk.registry import list_losses

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SHARDS_COMMAND = re.compile(r"^#\s+(topk shards build .+)$", re.MULTILINE)
PLANTNET_LOSSES = {
    "cross_entropy": {},
    "focal": {"gamma": 2.0},
    "ldam": {"max_m": 0.2, "scale": 40.0},
    "logit_adjusted": {"tau": 1.0},
    "noised_topk": {"k": 5, "epsilon": 1.0, "n_samples": 5},
    "noised_topk_imbalanced": {
        "k": 5,
        "epsilon": 0.01,
        "n_samples": 5,
        "max_m": 0.2,
        "scale": 60.0,
    },
    "smooth_topk_svm": {"k": 5, "tau": 0.1},
    "topk_hinge": {"k": 5},
}


def train_part(spec):
    return spec.train if isinstance(spec, SweepSpec) else spec


def dataset_folder(source: str) -> Path:
    """The dataset folder a data source names (`.../dataset.json#split` or the folder)."""
    path = Path(source.partition("#")[0])
    return path.parent if path.name == "dataset.json" else path


def test_the_promised_examples_are_shipped():
    names = {path.stem for path in EXAMPLES}
    expected = {
        "cifar100_noisy_noised_topk",
        "omniglot_noised_topk",
        "omniglot_lt_noised_topk_imbalanced",
        "fashion_mnist_lt_cross_entropy",
        "sweep_omniglot_epsilon",
    } | {f"plantnet300k_{loss}" for loss in list_losses()}
    assert expected <= names
    assert set(PLANTNET_LOSSES) == set(list_losses())


def test_the_examples_readme_lists_every_example():
    readme = (REPO / "examples" / "README.md").read_text()
    for path in EXAMPLES:
        listed = path.name if not path.stem.startswith("plantnet300k_") else "plantnet300k_<loss>"
        assert listed in readme, path.name


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_a_valid_spec(path):
    """The spec validates (its structure: the data need not be here), and its header says how
    to make the data it reads: a `topk shards build` command whose output folder is the one
    data.train and data.val name."""
    spec = parse_spec(load_spec_file(str(path)))
    data = train_part(spec).data
    match = SHARDS_COMMAND.search(path.read_text())
    assert match, "the header must say how to make the shards"
    out = Path(shlex.split(match.group(1))[4])
    for source in (data.train, data.val):
        assert isinstance(source, str) and dataset_folder(source) == out, source


def write_small_dataset(out: Path, num_classes: int) -> DatasetInfo:
    """Real shards and dataset.json of `num_classes` classes (8x8 grey images, 2 to 3 a class,
    one of each class to the validation split) under `out`, by the project's writer."""
    from jobs.data.sources import ImageSource
    from jobs.data.writer import build_shards

    labels = np.concatenate([np.arange(num_classes)] * 2 + [np.arange(0, num_classes, 2)])
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    source = ImageSource(
        "arrays",
        [f"c{c}" for c in range(num_classes)],
        labels,
        ["x"] * len(labels),
        images.__getitem__,
    )
    build_shards(source, str(out), val_fraction=0.34, image_format="png", progress=None)
    return read_dataset_info(str(out))


NEEDS_CLASS_COUNTS = [
    path
    for path in EXAMPLES
    if type(train_part(parse_spec(load_spec_file(str(path)))).loss).needs_class_counts
]


@pytest.mark.parametrize("path", NEEDS_CLASS_COUNTS, ids=lambda p: p.stem)
def test_class_counts_come_from_the_dataset_the_example_names(path, tmp_path, monkeypatch):
    """An example whose loss needs class counts leaves them to the dataset.json it names: with
    a small dataset of its class count written there, the counts are that dataset's."""
    spec = parse_spec(load_spec_file(str(path)))
    train = train_part(spec)
    assert train.loss.class_counts is None
    folder = tmp_path / dataset_folder(train.data.train)
    built = write_small_dataset(folder, train.data.num_classes)
    monkeypatch.chdir(tmp_path)  # data URLs are relative to the repository root
    resolved = train_part(resolve_class_counts(spec)).loss
    assert resolved.class_counts == built.class_counts["train"]


@pytest.mark.parametrize("loss", sorted(PLANTNET_LOSSES))
def test_plantnet_examples_use_the_published_settings(loss):
    spec = parse_spec(load_spec_file(str(REPO / "examples" / f"plantnet300k_{loss}.yaml")))
    assert (spec.model.arch, spec.epochs, spec.optim.lr) == ("resnet50", 30, 0.002)
    assert spec.model.pretrained and spec.data.num_classes == 1081
    assert spec.metrics.select == "val_macro_top5"
    assert spec.loss.name == loss
    given = spec.loss.to_kwargs()
    assert {key: given[key] for key in PLANTNET_LOSSES[loss]} == PLANTNET_LOSSES[loss]


def test_cifar100_example_uses_the_published_settings():
    spec = parse_spec(load_spec_file(str(REPO / "examples" / "cifar100_noisy_noised_topk.yaml")))
    assert spec.loss.to_kwargs() == {"k": 5, "epsilon": 0.2, "n_samples": 10, "sampler": "full"}
    assert spec.data.num_classes == 100


def shards_commands() -> list[tuple[Path, str]]:
    """(example, its header's shards command) for every example."""
    found = []
    for path in EXAMPLES:
        match = SHARDS_COMMAND.search(path.read_text())
        if match:
            found.append((path, match.group(1)))
    return found


def readme_shards_commands() -> list[str]:
    """The `topk shards build` commands of README.md's code blocks, continuation lines joined
    and the `.venv/bin/` prefix dropped."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"^(?:\.venv/bin/)?(topk shards build .+)$", text, re.MULTILINE)
    return [" ".join(command.split()) for command in commands]


def test_the_readme_makes_the_data_the_examples_read():
    """Each shards command in the README is an example's header command, word for word (the
    README's Fashion-MNIST command once made runs/data/fmnist-lt, which no example reads)."""
    headers = {
        " ".join(match.group(1).split())
        for path in EXAMPLES
        if (match := SHARDS_COMMAND.search(path.read_text()))
    }
    commands = readme_shards_commands()
    assert len(commands) >= 2
    for command in commands:
        assert command in headers, command


@pytest.mark.slow
@pytest.mark.parametrize(("path", "command"), shards_commands(), ids=lambda x: str(x)[-40:])
def test_the_header_command_makes_the_data_the_example_validates_with(
    path, command, tmp_path, shared_data
):
    """The header command, run as written from a copy of the repository's layout (examples/
    beside ../shared), with --max-per-class to keep it small; then `topk validate` passes on the
    example, its data found, and class counts read where its loss needs them. Skipped, naming
    it, where the command's source is not on this machine."""
    args = shlex.split(command)
    if not (REPO / args[3]).exists():
        pytest.skip(f"its source {args[3]} is not on this machine")
    main = tmp_path / "main"
    (main / "examples").mkdir(parents=True)
    shutil.copy(path, main / "examples" / path.name)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    topk = str(Path(sys.executable).with_name("topk"))
    built = subprocess.run(
        [topk, *args[1:], "--max-per-class", "20", "--quiet"],
        cwd=main, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    example = f"examples/{path.name}"
    checked = subprocess.run(
        [topk, "validate", "--print", example], cwd=main, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    spec = json.loads(checked.stdout)
    train = spec.get("train", spec)
    info = read_dataset_info(str(main / train["data"]["train"]))
    assert info.url == str(main / args[4] / "dataset.json")  # what the command wrote
    assert info.num_classes == train["data"]["num_classes"]
    assert {"train", "val"} <= set(info.splits)
    if LOSS_SPECS[train["loss"]["name"]].needs_class_counts:
        assert train["loss"]["class_counts"] == info.class_counts["train"]
