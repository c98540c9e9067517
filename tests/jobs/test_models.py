"""jobs.models: every spec architecture builds, heads, channels, pretrained loading."""

from __future__ import annotations

import pytest
import torch

from jobs.contract.train import ARCHITECTURES
from jobs.models import build_model, list_archs
from topk.heads import CosineHead


def test_every_spec_architecture_is_buildable_and_nothing_else():
    assert set(list_archs()) == set(ARCHITECTURES)


@pytest.mark.parametrize(
    "arch, in_channels",
    [
        ("cifar_resnet20", 1),
        ("cifar_resnet20", 3),
        ("cifar_resnet18", 3),
        ("resnet18", 1),
        ("resnet50", 3),
    ],
)
def test_scores_have_one_column_per_class(arch, in_channels):
    model = build_model(arch, 7, in_channels=in_channels).eval()
    with torch.no_grad():
        scores = model(torch.randn(2, in_channels, 32, 32))
    assert scores.shape == (2, 7)
    assert torch.isfinite(scores).all()


def test_cosine_head_replaces_the_final_layer_and_bounds_the_scores():
    model = build_model("cifar_resnet20", 11, in_channels=1, cosine_head=True).eval()
    assert isinstance(model.fc, CosineHead)
    with torch.no_grad():
        scores = model(torch.randn(4, 1, 28, 28) * 10)
    assert scores.shape == (4, 11)
    assert scores.abs().max() <= 1.0 + 1e-5


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid choices: .*cifar_resnet20"):
        build_model("vgg11", 10)


def test_pretrained_backbone_loads_and_a_mismatched_head_is_fresh(tmp_path):
    source = build_model("cifar_resnet20", 100, in_channels=3)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)

    model = build_model("cifar_resnet20", 10, in_channels=3, pretrained=f"file://{path}")
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.weight.shape == (10, 64)

    same = build_model("cifar_resnet20", 100, in_channels=3, pretrained=str(path))
    assert torch.equal(same.fc.weight, source.fc.weight)


def test_pretrained_from_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model("cifar_resnet32", 10).state_dict(), path)
    with pytest.raises(ValueError, match="does not match the model"):
        build_model("cifar_resnet20", 10, pretrained=str(path))


def test_pretrained_with_the_wrong_input_channels_names_the_layer(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save(build_model("cifar_resnet20", 10, in_channels=3).state_dict(), path)
    with pytest.raises(ValueError, match="stem.0.weight"):
        build_model("cifar_resnet20", 10, in_channels=1, pretrained=str(path))


class _NotAStateDict:
    pass


def test_pretrained_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _NotAStateDict()}, path)
    with pytest.raises(ValueError, match="not a loadable state_dict"):
        build_model("cifar_resnet20", 10, pretrained=str(path))


def test_missing_pretrained_file_is_an_error(tmp_path):
    with pytest.raises((OSError, ValueError)):
        build_model("cifar_resnet20", 10, pretrained=str(tmp_path / "absent.pt"))
