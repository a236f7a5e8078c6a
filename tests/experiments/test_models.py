"""Each preset trains the network of the code the paper names: its first layer's geometry and its
shape (parameter count, stages, initialization) pinned against that source.

The parameter counts were computed by building the sources' own models with torch 2.13:
``resnet18(num_classes=10)`` of github.com/Felix-Petersen/tract ``examples/resnet_cifar10.py``
(11,173,962), ``ViT(3, 10, img_size=32, patch=8, mlp_hidden=384, num_layers=7, hidden=384,
head=12)`` of github.com/omihub777/ViT-CIFAR ``vit.py`` (6,268,810; its README says 6.3 M) and
``resnet18()`` of github.com/weiaicunzai/pytorch-cifar100 ``models/resnet.py`` (11,220,132).
Loading each source's ``state_dict`` into trainact's model (renaming weiaicunzai's keys) gave
the same outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainact.experiments import cli
from trainact.experiments.models import FIRST_LAYER, build_model


def preset_model(preset: str) -> tuple[nn.Module, str]:
    cfg = cli.build_config(cli._parser().parse_args(["train", "--preset", preset]))
    return build_model(cfg.model, 100 if cfg.dataset == "cifar100" else 10), cfg.model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trunk_output(model: nn.Module) -> torch.Size:
    """The shape of the last stage's output for one 32×32 image."""
    shapes = []
    model.layer4.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model.eval()(torch.zeros(1, 3, 32, 32))
    return shapes[0]


@pytest.mark.parametrize("preset", ["resnet18-cifar10-sgd", "resnet18-cifar10-adam"])
def test_the_cifar10_resnet_is_the_authors_example(preset):
    torch.manual_seed(0)
    model, name = preset_model(preset)
    stem = model.get_submodule(FIRST_LAYER[name])
    assert isinstance(stem, nn.Conv2d) and stem.bias is None
    assert (stem.in_channels, stem.out_channels) == (3, 64)
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert params(model) == 11_173_962
    assert isinstance(model.maxpool, nn.MaxPool2d)  # kept after the 3×3/1 stem
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert trunk_output(model) == (1, 512, 2, 2)  # 32 -> 16 at the max-pool, then /2 /2 /2
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std √(2 / (out · k²))
    for conv in (stem, model.layer3[0].conv2, model.layer2[0].downsample[0]):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.08)
    # the source's parameter names: its state_dict loads as it is
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "fc.bias"} <= keys


def test_the_cifar100_resnet_is_weiaicunzais():
    torch.manual_seed(0)
    model, name = preset_model("resnet18-cifar100")
    stem = model.get_submodule(FIRST_LAYER[name])
    assert isinstance(stem, nn.Conv2d) and stem.bias is None
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (
        3,
        64,
        (3, 3),
        (1, 1),
        (1, 1),
    )
    assert params(model) == 11_220_132 and model.fc.out_features == 100
    assert isinstance(model.maxpool, nn.Identity)  # no max-pool
    assert trunk_output(model) == (1, 512, 4, 4)
    # PyTorch's default initialization: kaiming_uniform_(a=√5), std = 1 / √(3 · fan_in)
    fan_in = 64 * 9
    conv = model.layer1[0].conv1
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.08)


def test_the_vit_is_vit_cifar_with_patch_8():
    torch.manual_seed(0)
    model, name = preset_model("vit-cifar10")
    emb = model.get_submodule(FIRST_LAYER[name])
    # --patch 8 is an 8×8 grid: 4×4-pixel patches, d = 4 · 4 · 3 = 48 inputs of TrAct's layer
    assert isinstance(emb, nn.Linear) and (emb.in_features, emb.out_features) == (48, 384)
    assert model.patch == 8 and model.patch_size == 4
    words = model._to_words(torch.zeros(2, 3, 32, 32))
    assert words.shape == (2, 64, 48)
    assert model.pos_emb.shape == (1, 65, 384)  # 64 patches and the class token
    assert params(model) == 6_268_810
    assert len(model.enc) == 7 and model.enc[0].msa.head == 12
    assert model.enc[0].mlp[0].out_features == 384  # ViT-CIFAR's --mlp-hidden 384
    # the class token and the positions are drawn from N(0, 1), as there
    assert model.pos_emb.std().item() == pytest.approx(1.0, rel=0.05)
    # a word is the patch's pixels by row, column, then channel (ViT-CIFAR's unfold order)
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32)
    word = model._to_words(x)[0, 1]  # the second patch of the first row: columns 4 to 7
    assert word[:3].tolist() == [x[0, c, 0, 4].item() for c in range(3)]
    assert word[3:6].tolist() == [x[0, c, 0, 5].item() for c in range(3)]
    assert word[12:15].tolist() == [x[0, c, 1, 4].item() for c in range(3)]


def test_the_vit_attention_is_scaled_by_the_whole_width():
    torch.manual_seed(0)
    msa = build_model("vit", 10).enc[0].msa
    x = torch.randn(2, 5, 384)
    b, n, f = x.shape

    def heads(t):
        return t.view(b, n, 12, 32).transpose(1, 2)

    q, k, v = heads(msa.q(x)), heads(msa.k(x)), heads(msa.v(x))
    score = torch.softmax(torch.einsum("bhif,bhjf->bhij", q, k) / 384**0.5, dim=-1)
    expected = msa.o(torch.einsum("bhij,bhjf->bihf", score, v).flatten(2))  # ViT-CIFAR's maths
    assert torch.allclose(msa(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "name,paper,first,d",
    [
        ("resnet-tiny", "resnet18-nopool", (3, 8), 27),
        ("resnet-narrow", "resnet18-nopool", (3, 16), 27),
        ("vit-tiny", "vit", (48, 96), 48),
    ],
)
def test_the_cpu_models_keep_the_first_layer_geometry_of_a_paper_network(name, paper, first, d):
    model, big = build_model(name, 10), build_model(paper, 10)
    layer, big_layer = (m.get_submodule(FIRST_LAYER[n]) for m, n in ((model, name), (big, paper)))
    assert type(layer) is type(big_layer)
    if isinstance(layer, nn.Conv2d):
        assert (layer.in_channels, layer.out_channels) == first
        assert layer.kernel_size == big_layer.kernel_size and layer.stride == big_layer.stride
        assert layer.in_channels * math.prod(layer.kernel_size) == d
    else:
        assert (layer.in_features, layer.out_features) == first and layer.in_features == d
