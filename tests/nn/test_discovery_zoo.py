"""First-layer discovery on timm and torchvision models (random weights, no download), and one
training step's first-layer gradient on the device under test.

timm and torchvision import only with PyPI's own torch build, not with the CPU wheel this
project's environment uses; these tests skip where they do not import (CI runs them in a
second environment).
"""

from __future__ import annotations

import pytest
import torch

import trainact
from testing.harness import model_step_error
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


def _zoo_model(package: str, name: str) -> torch.nn.Module:
    if package == "timm":
        return pytest.importorskip("timm").create_model(name, pretrained=False)
    return getattr(pytest.importorskip("torchvision.models"), name)(weights=None)


ZOO = [("timm", name, first) for name, first in TIMM.items()]
ZOO += [("torchvision", name, first) for name, first in TORCHVISION.items()]


@pytest.mark.parametrize(("package", "name", "expected"), ZOO, ids=[f"{p}-{n}" for p, n, _ in ZOO])
def test_training_step_gets_the_tract_gradient(device, package, name, expected):
    """One training step (the same seed for the plain copy: the same dropout and drop-path) on
    two standardized random images: the stem's TrAct gradient is G·(XᵀX/n + λI)⁻¹ of the input
    it saw. All-zero weight matrices (torchvision ViT's head) get small random values first,
    else no gradient would reach the stem. On the CPU the ResNet-18s only: each other model
    takes 5 to 20 s there."""
    if device.type == "cpu" and name != "resnet18":
        pytest.skip("on the CPU the ResNet-18s only (the others run with --device cuda)")
    torch.manual_seed(0)
    model = _zoo_model(package, name).to(device).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    assert trainact.apply(model) == expected
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert model_step_error(model, expected, (images.to(device),)) <= 1e-4
