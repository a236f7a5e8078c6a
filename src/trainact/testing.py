"""Float64 references for checking TrAct: patches extracted by the layer's own forward.

Independent of trainact's patch code, so tests, benchmarks and users can check a layer's
preconditioned gradient against G·(XᵀX/n + λI)⁻¹ computed with an explicit inverse.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from trainact.api import remove

__all__ = ["exact_tract_grad", "reference_patches", "reference_tract_grad", "relative_error"]


def reference_patches(layer: nn.Module, x: Tensor) -> Tensor:
    """X as ``(groups, n, d)`` in float64.

    A Conv's patches are its output under an identity kernel (one output channel per patch
    entry), computed by the layer's own forward, so padding mode, stride, dilation and groups
    are exactly the layer's.
    """
    plain = remove(copy.deepcopy(layer)).double()
    x = x.double()
    if isinstance(plain, nn.Linear):
        return x.reshape(1, -1, plain.in_features)
    groups, per_group = plain.groups, plain.in_channels // plain.groups
    d = per_group * math.prod(plain.kernel_size)
    eye = torch.eye(d, dtype=torch.float64, device=x.device).reshape(
        d, per_group, *plain.kernel_size
    )
    z = plain._conv_forward(x, eye.repeat(groups, *([1] * (eye.dim() - 1))), None)
    if x.dim() == len(plain.kernel_size) + 1:  # unbatched
        z = z.unsqueeze(0)
    return z.movedim(1, -1).reshape(-1, groups, d).transpose(0, 1)


def reference_tract_grad(layer: nn.Module, x: Tensor, plain_grad: Tensor, lam: float) -> Tensor:
    """G·(XᵀX/n + λI)⁻¹ per group, in float64, from an explicit inverse."""
    patches = reference_patches(layer, x)
    groups, n, d = patches.shape
    eye = torch.eye(d, dtype=torch.float64, device=patches.device)
    a = patches.mT @ patches / max(n, 1) + lam * eye
    g = plain_grad.double().reshape(groups, -1, d)
    return (g @ torch.linalg.inv(a)).reshape(plain_grad.shape)


def exact_tract_grad(layer: nn.Module, x: Tensor, grad_output: Tensor, lam: float) -> Tensor:
    """TrAct's gradient in exact arithmetic, to float64 accuracy: G = ∂L/∂zᵀ·X computed in
    float64 from ``x`` and the output gradient, then preconditioned by
    :func:`reference_tract_grad`. For n < d this is the reference to use: the map applied to a
    rounded G also multiplies G's rounding outside the span of X's rows by 1/λ."""
    plain = remove(copy.deepcopy(layer)).double()
    plain.zero_grad(set_to_none=True)
    plain(x.double()).backward(grad_output.double())
    return reference_tract_grad(layer, x, plain.weight.grad, lam)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius), computed in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()
