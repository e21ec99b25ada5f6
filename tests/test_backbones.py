"""Backbones build for every architecture and input shape the platform uses, and load local weights."""
from __future__ import annotations

import pytest
import torch

from metacorrect.methods.backbones import ARCHS, build_backbone


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_every_arch_maps_images_to_class_logits(arch, shape):
    if arch.startswith("resnet50") and shape[0] == 32:
        pytest.skip("covered at 8x8; keeps the suite fast")
    model = build_backbone(arch, num_classes=7, image_shape=shape, width=4)
    x = torch.randn(2, shape[2], shape[0], shape[1])
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, model.feature_dim)


def test_pretrained_loads_a_torchvision_state_dict_and_reinitialises_the_classifier(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model = build_backbone("resnet18", num_classes=5, image_shape=(32, 32, 3), pretrained=str(path))
    torch.testing.assert_close(model.body.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.classifier.out_features == 5


def test_missing_pretrained_file_says_weights_cannot_be_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        build_backbone("resnet18", 5, (32, 32, 3), pretrained=str(tmp_path / "nope.pt"))
