"""The experiment models: the paper's CIFAR ResNets and CIFAR ViT, and small CPU variants.

Each model's first layer in forward order is the one TrAct is applied to: the ResNets' 3×3 stem
convolution (no max-pool, as in the paper) and the ViT's patch embedding (a Conv2d with
stride = kernel = patch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return Downsample(c_in, c_out, stride)


class Downsample(nn.Sequential):
    """The projection shortcut: a strided 1×1 convolution and BatchNorm.

    The convolution runs with stride 1 on the subsampled input, which is the same maths: on the
    channels-last batches that the crop augmentation yields, oneDNN's strided 1×1 kernel in
    torch 2.13 CPU corrupts the heap at some thread counts (3, for one). Converting the batch to
    the standard layout would avoid it too, but channels-last is the faster layout on the CPU.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x[:, :, :: self.stride, :: self.stride])


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, CIFAR variant): 3×3 stem, four stages, no max-pool."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            for j in range(depth):
                stages.append(block(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(out.mean((2, 3)))


@dataclass
class ViTConfig:
    patch: int = 8
    depth: int = 7
    hidden: int = 384
    mlp_hidden: int = 384
    heads: int = 12
    image_size: int = 32


class TransformerBlock(nn.Module):
    """Pre-norm encoder block, as in ViT-CIFAR (no dropout)."""

    def __init__(self, hidden: int, mlp_hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden), nn.GELU()
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, tokens, hidden)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The CIFAR ViT of github.com/omihub777/ViT-CIFAR: patch embedding, class token, learned
    positions, pre-norm encoder, classifier on the class token."""

    def __init__(self, cfg: ViTConfig, num_classes: int) -> None:
        super().__init__()
        tokens = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.hidden, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, cfg.hidden) * 0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(cfg.hidden, cfg.mlp_hidden, cfg.heads) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, hidden)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda c, s: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), c),
    "resnet34": lambda c, s: ResNet(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), c),
    "resnet50": lambda c, s: ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), c),
    # CPU-sized: ResNet-18's shape at a quarter of its width and one block per stage
    "resnet-narrow": lambda c, s: ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), c),
    # half of resnet-narrow's width: the default of `trainact compare`, minutes on two CPU cores
    "resnet-tiny": lambda c, s: ResNet(BasicBlock, (1, 1, 1, 1), (8, 16, 32, 64), c),
    "vit": lambda c, s: ViT(ViTConfig(image_size=s), c),
    "vit-tiny": lambda c, s: ViT(
        ViTConfig(patch=4, depth=4, hidden=96, mlp_hidden=192, heads=4, image_size=s), c
    ),
}
MODEL_NAMES = tuple(MODELS)


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """A fresh model by name; ValueError listing the valid names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return MODELS[name](num_classes, image_size)
