"""Every shipped example spec is a test: it validates, it carries the published settings, and the
`topk shards build` command in its header makes the data it names (where the source is here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from jobs.data.dataset_info import read_dataset_info
from jobs.spec.io import load_spec_file, parse_spec, resolve_class_counts
from jobs.spec.sweep import SweepSpec
from service.cli import main as topk_main
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
def test_example_is_a_valid_spec(path, monkeypatch):
    monkeypatch.chdir(REPO)  # data URLs are relative to the repository root
    spec = parse_spec(load_spec_file(str(path)))
    train = train_part(spec)
    location = Path(REPO, train.data.train if isinstance(train.data.train, str) else "")
    if type(train.loss).needs_class_counts and location.is_file():
        assert train_part(resolve_class_counts(spec)).loss.class_counts is not None
    # (otherwise the data is not on this machine: the structure is what is validated here)
    assert SHARDS_COMMAND.search(path.read_text()), "the header must say how to make the shards"


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


def runnable_shards_commands() -> list[tuple[Path, str]]:
    """(example, its shards command) where the command's source exists on this machine."""
    found = []
    for path in EXAMPLES:
        match = SHARDS_COMMAND.search(path.read_text())
        if match and (REPO / shlex.split(match.group(1))[3]).exists():
            found.append((path, match.group(1)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "command"), runnable_shards_commands(), ids=lambda x: str(x)[-40:]
)
def test_the_documented_shards_command_makes_the_data_the_example_names(
    path, command, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    args = shlex.split(command)[1:]  # drop "topk"
    out = args[3]
    assert out.startswith("runs/data/")
    args[3] = str(tmp_path / out)
    assert topk_main([*args, "--quiet"]) == 0
    text = path.read_text().replace(f"{out}/", f"{tmp_path / out}/")
    moved = tmp_path / path.name
    moved.write_text(text)
    spec = parse_spec(load_spec_file(str(moved)))
    train = train_part(spec)
    assert str(tmp_path) in str(train.data.train)  # the example reads what the command wrote
    info = read_dataset_info(str(train.data.train))
    assert info.num_classes == train.data.num_classes
    assert {"train", "val"} <= set(info.splits)
    resolved = train_part(resolve_class_counts(spec))
    if type(train.loss).needs_class_counts:
        assert resolved.loss.class_counts == info.class_counts["train"]
