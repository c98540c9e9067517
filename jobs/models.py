"""Image classifiers by name: torchvision ResNets, small CIFAR-style ResNets and a small
conv net.

`build_model(arch, num_classes, ...)` returns an `nn.Module` mapping images
[batch, in_channels, S, S] to scores [batch, num_classes]. Weights are never downloaded: a
pretrained backbone comes only from a state_dict at a local path or fsspec URL, read with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv_models

# torchvision ImageNet ResNets: stride-2 7x7 stem + max-pool, for images of about 64 px and up.
_TORCHVISION_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
    "resnet101": tv_models.resnet101,
    "resnet152": tv_models.resnet152,
}

# CIFAR-style ResNets (He et al. 2016, section 4.2): 3x3 stem, no max-pool, for 28-64 px images.
# name -> (blocks per stage, channels per stage)
_CIFAR_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "cifar_resnet20": ((3, 3, 3), (16, 32, 64)),
    "cifar_resnet32": ((5, 5, 5), (16, 32, 64)),
    "cifar_resnet44": ((7, 7, 7), (16, 32, 64)),
    "cifar_resnet56": ((9, 9, 9), (16, 32, 64)),
    "cifar_resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
}


# Plain conv nets (conv-BN-ReLU stages with a 2x2 max-pool between them): small enough that
# a grid of hundreds of runs trains on a CPU. name -> channels per stage
_CONVNET_ARCHS: dict[str, tuple[int, ...]] = {
    "convnet_small": (32, 64, 128),
}


def list_archs() -> list[str]:
    """The architecture names `build_model` accepts, sorted."""
    return sorted([*_TORCHVISION_ARCHS, *_CIFAR_ARCHS, *_CONVNET_ARCHS])


def _init_convs(model: nn.Module) -> None:
    """He initialisation (fan-out, ReLU) of every convolution, as torchvision's ResNets do."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet with a 3x3 stem and no max-pool; the final layer is `fc` like torchvision's."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        channels: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        previous = channels[0]
        for index, (count, width) in enumerate(zip(blocks_per_stage, channels, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = [_BasicBlock(previous, width, stride)]
            blocks += [_BasicBlock(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(previous, num_classes)
        _init_convs(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(images))).flatten(1)
        return self.fc(features)


class ConvNet(nn.Module):
    """One 3x3 conv-BN-ReLU layer per stage, a 2x2 max-pool between stages, global average
    pooling and a final layer `fc` (so a cosine head replaces it like a ResNet's)."""

    def __init__(self, channels: tuple[int, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            if index > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(previous, width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(previous, num_classes)
        _init_convs(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(images)).flatten(1))


def build_model(
    arch: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    cosine_head: bool = False,
    pretrained: str | None = None,
) -> nn.Module:
    """A classifier: images [batch, in_channels, S, S] -> scores [batch, num_classes].

    `cosine_head=True` replaces the final linear layer (`fc`) with `topk.heads.CosineHead`, whose
    scores lie in [-1, 1] (the margin losses apply their own scale). `pretrained` is a local path
    or fsspec URL of a state_dict for the backbone (the final layer's weights are dropped when
    their shape does not fit). Raises ValueError for an unknown arch or a state_dict that does not
    match the backbone.
    """
    if arch in _TORCHVISION_ARCHS:
        model = _TORCHVISION_ARCHS[arch](weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(
                in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
    elif arch in _CIFAR_ARCHS:
        blocks, channels = _CIFAR_ARCHS[arch]
        model = CifarResNet(blocks, channels, num_classes, in_channels)
    elif arch in _CONVNET_ARCHS:
        model = ConvNet(_CONVNET_ARCHS[arch], num_classes, in_channels)
    else:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(list_archs())}")
    if pretrained is not None:
        _load_backbone(model, pretrained)
    if cosine_head:
        from topk.heads import CosineHead

        model.fc = CosineHead(model.fc.in_features, num_classes)
    return model


def _load_backbone(model: nn.Module, url: str) -> None:
    """Load a state_dict into `model`, keeping the fresh final layer when shapes differ."""
    from jobs.contract.urls import open_url  # fsspec behind our protocol allow-list

    with open_url(url, "rb") as handle:
        payload = handle.read()
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a state_dict"
        raise ValueError(f"pretrained {url!r} is not a loadable state_dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # our own checkpoints nest the weights under "model"
    if not isinstance(state, dict):
        raise ValueError(f"pretrained {url!r} does not hold a state_dict")
    own = model.state_dict()
    head_keys = {key for key in own if key.startswith("fc.")}
    state = {
        key: value
        for key, value in state.items()
        if not (key in head_keys and getattr(value, "shape", None) != own[key].shape)
    }
    # Weights saved from a 3-channel stem do not fit a 1-channel model and vice versa.
    for key, value in state.items():
        if key in own and getattr(value, "shape", None) != own[key].shape:
            raise ValueError(
                f"pretrained {url!r}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if key not in head_keys]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained {url!r} does not match the model: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
