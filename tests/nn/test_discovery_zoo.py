"""First-layer discovery on timm and torchvision models (random weights, no download).

timm and torchvision import only with PyPI's own torch build, not with the CPU wheel this
project's environment uses; these tests skip where they do not import.
"""

from __future__ import annotations

import pytest
import torch

import trainact
from trainact.nn.discovery import find_first_layer

IMAGES = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

TIMM = {
    # forward(x, attn_mask=None, is_causal=False): only x is an input
    "vit_tiny_patch16_224": "patch_embed.proj",
    "deit_tiny_patch16_224": "patch_embed.proj",
    "convnext_atto": "stem.0",
    "resnet18": "conv1",
    "efficientnet_b0": "conv_stem",
    "swin_tiny_patch4_window7_224": "patch_embed.proj",
    "mobilenetv3_small_050": "conv_stem",
}
TORCHVISION = {
    "resnet18": "conv1",
    "vit_b_16": "conv_proj",
    "convnext_tiny": "features.0.0",
    "efficientnet_b0": "features.0.0",
    "swin_t": "features.0.0",
    "mobilenet_v3_small": "features.0.0",
    "regnet_y_400mf": "stem.0",
    "maxvit_t": "stem.0.0",
}


def _check(model: torch.nn.Module, images: torch.Tensor, expected: str) -> None:
    assert find_first_layer(model) == expected  # torch.fx
    assert find_first_layer(model, images) == expected  # one forward run
    assert trainact.apply(model) == expected
    assert [name for name, _ in trainact.enabled_layers(model)] == [expected]


@pytest.mark.parametrize(("name", "expected"), TIMM.items())
def test_timm(name, expected):
    timm = pytest.importorskip("timm")
    _check(timm.create_model(name, pretrained=False), IMAGES, expected)


@pytest.mark.parametrize(("name", "expected"), TORCHVISION.items())
def test_torchvision(name, expected):
    models = pytest.importorskip("torchvision.models")
    _check(getattr(models, name)(weights=None), IMAGES, expected)


def test_torchvision_inception_normalizes_its_input_first():
    """inception_v3(transform_input=True) rescales each channel before the first conv."""
    models = pytest.importorskip("torchvision.models")
    model = models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=True
    )
    _check(model, torch.randn(1, 3, 299, 299), "Conv2d_1a_3x3.conv")
