"""Student backbones: small models for digits-size inputs, torchvision ResNets (ImageNet or CIFAR stem).

Every backbone exposes `features(x)` and `classifier`, so methods that need the penultimate
representation (MLC's LCN) get it without a second forward pass.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ARCHS = ("small_cnn", "mlp", "resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar")


class Backbone(nn.Module):
    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def small_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Two conv blocks with BatchNorm (so BN handling is exercised everywhere), global pooling."""
    body = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, 2 * width


def mlp(in_features: int, width: int) -> tuple[nn.Module, int]:
    hidden = 4 * width
    body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
    return body, hidden


def resnet(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    import torchvision

    name, _, stem = arch.partition("_")
    net = getattr(torchvision.models, name)(weights=None)
    if stem == "cifar" or in_channels != 3:
        # CIFAR variant: 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep spatial resolution.
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        net.conv1 = nn.Conv2d(in_channels, 64, k, s, p, bias=False)
        if stem == "cifar":
            net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_backbone(arch: str, num_classes: int, image_shape: tuple[int, int, int] | list[int], width: int = 32,
                   pretrained: str | None = None) -> Backbone:
    h, w, c = image_shape
    if arch == "small_cnn":
        body, dim = small_cnn(c, width)
    elif arch == "mlp":
        body, dim = mlp(h * w * c, width)
    elif arch in ARCHS:
        body, dim = resnet(arch, c)
    else:
        raise ValueError(f"model.arch: unknown architecture '{arch}' (expected one of {', '.join(ARCHS)})")
    model = Backbone(body, dim, num_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: Backbone, path: str) -> None:
    """Load a torchvision-format state dict from a local file; the classifier is re-initialised."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: {file} not found (weights cannot be downloaded here; "
                                "save a torchvision state dict to a local file)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    body_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.body.load_state_dict(body_state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise ValueError(f"model.pretrained: {file} does not match the backbone "
                         f"(missing {len(missing)}, unexpected {len(unexpected)} keys)")
