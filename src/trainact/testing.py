"""Float64 references for TrAct, for checking a layer's TrAct gradient in tests and scripts.

The references extract a layer's input patches with the layer's own forward (independent of
trainact's patch code) and compute G·(XᵀX/n + λI)⁻¹ in float64, on the layer's device, or on
the CPU for a device without float64 (MPS).

    >>> import torch, trainact
    >>> from trainact.testing import reference_tract_grad, relative_error
    >>> conv, x = torch.nn.Conv2d(3, 8, 3), torch.randn(4, 3, 16, 16)
    >>> plain = reference_tract_grad(conv, x, torch.ones(8, 3, 3, 3), lam=0.1)
    >>> plain.shape
    torch.Size([8, 3, 3, 3])

``import trainact.testing`` needs only torch.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from trainact.api import remove

__all__ = [
    "exact_tract_grad",
    "float64_device",
    "reference_patches",
    "reference_tract_grad",
    "relative_error",
]


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 references for tensors on ``device`` are computed: ``device`` itself, or
    the CPU for a device type without float64 (MPS, and any type other than CPU and CUDA, as
    trainact's precision policy assumes)."""
    device = torch.device(device)
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _float64(t: Tensor) -> Tensor:
    return t.detach().to(float64_device(t.device), torch.float64)


def reference_patches(layer: nn.Module, x: Tensor) -> Tensor:
    """X as ``(groups, n, d)`` in float64.

    A Conv's patches are its output under an identity kernel (one output channel per patch
    entry), computed by the layer's own forward, so padding mode, stride, dilation and groups
    are exactly the layer's.
    """
    x = _float64(x)
    plain = remove(copy.deepcopy(layer)).to(x.device, torch.float64)
    if isinstance(plain, nn.Linear):
        return x.reshape(1, -1, plain.in_features)
    if not isinstance(plain, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise TypeError(f"reference_patches takes a Linear or ConvNd layer, not {type(layer)}")
    groups, per_group = plain.groups, plain.in_channels // plain.groups
    kernel = tuple(plain.kernel_size)
    d = per_group * math.prod(kernel)
    eye = torch.eye(d, dtype=torch.float64, device=x.device).reshape(d, per_group, *kernel)
    z: Tensor = plain._conv_forward(x, eye.repeat(groups, *([1] * (eye.dim() - 1))), None)
    if x.dim() == len(kernel) + 1:  # unbatched
        z = z.unsqueeze(0)
    return z.movedim(1, -1).reshape(-1, groups, d).transpose(0, 1)


def reference_tract_grad(layer: nn.Module, x: Tensor, plain_grad: Tensor, lam: float) -> Tensor:
    """G·(XᵀX/n + λI)⁻¹ per group, in float64, from an explicit inverse."""
    patches = reference_patches(layer, x)
    groups, n, d = patches.shape
    eye = torch.eye(d, dtype=torch.float64, device=patches.device)
    a = patches.mT @ patches / max(n, 1) + lam * eye
    g = _float64(plain_grad).to(patches.device).reshape(groups, -1, d)
    inverse: Tensor = torch.linalg.inv(a)
    return (g @ inverse).reshape(plain_grad.shape)


def exact_tract_grad(layer: nn.Module, x: Tensor, grad_output: Tensor, lam: float) -> Tensor:
    """TrAct's gradient in exact arithmetic, to float64 accuracy, from ``x`` and the output
    gradient D. For n ≥ d: G = Dᵀ·X computed in float64, then preconditioned by
    :func:`reference_tract_grad`. For n < d, the reference to use there: the push-through form
    Dᵀ·(XXᵀ/n + λI)⁻¹·X, an n×n solve in float64, exact at every input scale (inverting the d×d
    matrix, whose d − n smallest eigenvalues are λ, loses 1e-16 of its largest to rounding: of
    the order of λ for inputs scaled by 1e6), and free of the 1/λ that the d×d map applies to a
    rounded G outside the span of X's rows."""
    x, grad_output = _float64(x), _float64(grad_output)
    plain = remove(copy.deepcopy(layer)).to(x.device, torch.float64)
    patches = reference_patches(plain, x)
    groups, n, d = patches.shape
    weight = plain.get_parameter("weight")
    if n < d:
        grad = grad_output.reshape(1, -1, weight.shape[0])  # D per patch, (groups, n, out/g)
        if not isinstance(plain, nn.Linear):
            batched = grad_output if x.dim() == weight.dim() else grad_output.unsqueeze(0)
            grad = batched.movedim(1, -1).reshape(n, groups, -1).transpose(0, 1)
        eye = torch.eye(n, dtype=torch.float64, device=patches.device)
        solved: Tensor = torch.linalg.solve(patches @ patches.mT / n + lam * eye, grad)
        return (solved.mT @ patches).reshape(weight.shape)
    plain.zero_grad(set_to_none=True)
    plain(x).backward(grad_output)
    assert weight.grad is not None
    return reference_tract_grad(layer, x, weight.grad, lam)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius), computed in float64; NaN or inf where
    ``actual`` is not finite.

    Raises:
        ValueError: ``expected`` is zero, so the comparison would prove nothing.
    """
    expected = _float64(expected)
    norm = float(expected.norm().item())
    if norm == 0:
        raise ValueError("the expected tensor is zero: a relative error would prove nothing")
    return float((_float64(actual).to(expected.device) - expected).norm().item()) / norm
