"""The experiment models: the networks the paper trained on CIFAR, and small CPU variants.

Each is built as the code the paper names builds it, with its parameter names, so that its
``state_dict`` loads into the source's model (and back):

- ``resnet18``, ``resnet34``, ``resnet50``: the authors' CIFAR-10 ResNets
  (github.com/Felix-Petersen/tract, ``examples/resnet_cifar10.py``, torchvision's ResNet with a
  3×3/1 stem): the 3×3/2 max-pool after the stem is kept, convolutions are initialized with
  ``kaiming_normal_(mode="fan_out")``. ResNet-18 has 11,173,962 parameters for 10 classes.
- ``resnet18-nopool``: the CIFAR-100 ResNet-18 of github.com/weiaicunzai/pytorch-cifar100 (the
  same blocks, no max-pool, PyTorch's default initialization; 11,220,132 parameters for 100
  classes). Its parameters are named like the authors' ResNet, not like weiaicunzai's.
- ``vit``: github.com/omihub777/ViT-CIFAR's ViT with ``--patch 8``, which there is the number of
  patches per side: 4×4-pixel patches embedded by a Linear layer of d = 48 inputs, 64 tokens and
  a class token, 7 pre-norm layers of width 384 (MLP 384, 12 heads), attention scaled by
  1/√384 (the whole width, as there), class token and positions drawn from N(0, 1);
  6,268,810 parameters for 10 classes.
- CPU-sized: ``resnet-narrow`` and ``resnet-tiny`` (ResNet-18's stages with one block each at
  1/4 and 1/8 of its width, no max-pool, default initialization) and ``vit-tiny`` (the ViT above
  with its 4×4-pixel patches, 4 layers of width 96, MLP 192, 4 heads).

The first layer in forward order is the one TrAct is applied to (:data:`FIRST_LAYER`): the
ResNets' 3×3 stem ``conv1`` and the ViT's patch embedding ``emb``, as in the authors' examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(c_in, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


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
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.downsample(x))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module:
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
        strided = x[:, :, :: self.stride, :: self.stride]
        out: Tensor = super().forward(strided)  # type: ignore[no-untyped-call]  # unannotated
        return out


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3×3/1 stem, optionally the 3×3/2 max-pool, four stages.

    ``max_pool`` and ``kaiming_init`` (``kaiming_normal_(mode="fan_out")`` for every
    convolution) give the authors' CIFAR-10 network; without them it is weiaicunzai's.
    """

    # the four stages, added by name in __init__
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, int, int, int],
        widths: tuple[int, int, int, int],
        num_classes: int,
        *,
        max_pool: bool = False,
        kaiming_init: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1) if max_pool else nn.Identity()
        c_in = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        out = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        logits: Tensor = self.fc(out.mean((2, 3)))
        return logits


@dataclass(frozen=True)
class ViTConfig:
    """ViT-CIFAR's sizes, under its own option names (``patch``: patches per side)."""

    patch: int = 8  # patches per row and column: 8 on 32×32 images = 4×4-pixel patches
    num_layers: int = 7
    hidden: int = 384
    mlp_hidden: int = 384
    head: int = 12
    img_size: int = 32


class MultiHeadSelfAttention(nn.Module):
    """ViT-CIFAR's attention: separate q, k, v, o projections, scores scaled by 1/√hidden."""

    def __init__(self, feats: int, head: int) -> None:
        super().__init__()
        self.head, self.feats = head, feats
        self.q = nn.Linear(feats, feats)
        self.k = nn.Linear(feats, feats)
        self.v = nn.Linear(feats, feats)
        self.o = nn.Linear(feats, feats)

    def forward(self, x: Tensor) -> Tensor:  # (B, n, f)
        b, n, f = x.shape

        def heads(t: Tensor) -> Tensor:  # (B, n, f) -> (B, head, n, f / head)
            return t.view(b, n, self.head, f // self.head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(self.feats))
        out: Tensor = self.o(attn.transpose(1, 2).flatten(2))
        return out


class TransformerEncoder(nn.Module):
    """ViT-CIFAR's pre-norm encoder layer (its dropout is 0 and kept as a no-op, so that the
    MLP's parameter names match)."""

    def __init__(self, feats: int, mlp_hidden: int, head: int) -> None:
        super().__init__()
        self.la1 = nn.LayerNorm(feats)
        self.msa = MultiHeadSelfAttention(feats, head)
        self.la2 = nn.LayerNorm(feats)
        self.mlp = nn.Sequential(
            nn.Linear(feats, mlp_hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(mlp_hidden, feats),
            nn.GELU(),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, tokens, hidden)
        out: Tensor = self.msa(self.la1(x)) + x
        mixed: Tensor = self.mlp(self.la2(out))
        return mixed + out


class ViT(nn.Module):
    """The ViT of github.com/omihub777/ViT-CIFAR: the image cut into ``patch``×``patch`` words,
    a Linear embedding, class token, learned positions, pre-norm encoder, LayerNorm + Linear
    head on the class token."""

    def __init__(self, cfg: ViTConfig, num_classes: int) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch:
            raise ValueError(
                f"the ViT cuts {cfg.img_size}-pixel images into {cfg.patch} patches per side: "
                "the image size must be a multiple of it"
            )
        self.patch = cfg.patch
        self.patch_size = cfg.img_size // cfg.patch
        f = self.patch_size**2 * 3  # 48 for 4×4-pixel RGB patches
        self.emb = nn.Linear(f, cfg.hidden)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden))
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.patch**2 + 1, cfg.hidden))
        layers = range(cfg.num_layers)
        self.enc = nn.Sequential(
            *[TransformerEncoder(cfg.hidden, cfg.mlp_hidden, cfg.head) for _ in layers]
        )
        self.fc = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        out = self.emb(self._to_words(x))  # (B, patch², hidden)
        out = torch.cat([self.cls_token.repeat(out.size(0), 1, 1), out], dim=1) + self.pos_emb
        logits: Tensor = self.fc(self.enc(out)[:, 0])
        return logits

    def _to_words(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, patch², patch_size² · C), a word's pixels by row, column, channel."""
        p = self.patch_size
        out = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1)
        return out.reshape(x.size(0), self.patch**2, -1)


def _authors(
    block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int]
) -> Callable[[int, int], nn.Module]:
    """A ResNet of the authors' CIFAR-10 example (max-pool, kaiming fan_out) by its depths."""
    widths = (64, 128, 256, 512)
    return lambda c, s: ResNet(block, depths, widths, c, max_pool=True, kaiming_init=True)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": _authors(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _authors(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _authors(Bottleneck, (3, 4, 6, 3)),
    # weiaicunzai/pytorch-cifar100's ResNet-18 (no max-pool, default initialization)
    "resnet18-nopool": lambda c, s: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), c),
    # CPU-sized: ResNet-18's stages with one block each, at 1/4 and 1/8 of its width
    "resnet-narrow": lambda c, s: ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), c),
    "resnet-tiny": lambda c, s: ResNet(BasicBlock, (1, 1, 1, 1), (8, 16, 32, 64), c),
    "vit": lambda c, s: ViT(ViTConfig(img_size=s), c),
    "vit-tiny": lambda c, s: ViT(
        ViTConfig(patch=s // 4, num_layers=4, hidden=96, mlp_hidden=192, head=4, img_size=s), c
    ),
}
MODEL_NAMES = tuple(MODELS)
# The name of each model's first layer, the one TrAct is applied to.
FIRST_LAYER = {name: "emb" if name.startswith("vit") else "conv1" for name in MODELS}


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """A fresh model by name; ValueError listing the valid names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return MODELS[name](num_classes, image_size)
