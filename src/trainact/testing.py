"""Float64 references and checks for TrAct, shared by trainact's tests, its benchmarks and users.

The references extract a layer's input patches with the layer's own forward (independent of
trainact's patch code) and compute G·(XᵀX/n + λI)⁻¹ with an explicit inverse in float64, on the
layer's device, or on the CPU for a device without float64 (MPS). On top of them:

- :func:`tract_error` (and :func:`tract_and_reference_grads`): one TrAct layer's weight gradient
  against the reference, from a plain copy's gradient G on the same input;
- :func:`step_error` and :func:`model_step_error`: the same after a training step of a whole
  model (autocast, a GradScaler, a compiled or checkpointed forward; a model zoo's model);
- :data:`ACCURACY_CASES`: real photos at every input scale with the targets TrAct meets
  (``benchmarks/accuracy.py`` prints them, the tests assert them), with :func:`photos` to load
  the photos (needs the ``[experiments]`` extra: numpy, pillow) and :func:`case_error`.

    >>> import torch, trainact
    >>> from trainact.testing import tract_error
    >>> tract_error(torch.nn.Conv2d(3, 8, 3), torch.randn(4, 3, 16, 16)) < 1e-5
    True

``import trainact.testing`` needs only torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainact.api import TrAct, remove

__all__ = [
    "ACCURACY_CASES",
    "LAM",
    "STATISTICS_DTYPES",
    "AccuracyCase",
    "case_error",
    "case_target",
    "conv_stem",
    "exact_tract_grad",
    "float64_device",
    "main_output",
    "many_chunk_cases",
    "model_step_error",
    "over_exposed",
    "photos",
    "reference_patches",
    "reference_tract_grad",
    "relative_error",
    "small_cnn",
    "smooth",
    "standardized",
    "step_error",
    "tokens",
    "tract_and_reference_grads",
    "tract_error",
]

#: λ of every check here unless given.
LAM = 0.1

# ---- references ---------------------------------------------------------------------------


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
    """TrAct's gradient in exact arithmetic, to float64 accuracy: G = ∂L/∂zᵀ·X computed in
    float64 from ``x`` and the output gradient, then preconditioned by
    :func:`reference_tract_grad`. For n < d this is the reference to use: the map applied to a
    rounded G also multiplies G's rounding outside the span of X's rows by 1/λ."""
    x, grad_output = _float64(x), _float64(grad_output)
    plain = remove(copy.deepcopy(layer)).to(x.device, torch.float64)
    plain.zero_grad(set_to_none=True)
    plain(x).backward(grad_output)
    weight = plain.get_parameter("weight")
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


# ---- one layer ------------------------------------------------------------------------------


def _patch_count_and_dim(layer: nn.Module, out: Tensor) -> tuple[int, int]:
    """(n, d): patches of one group in the call that gave ``out``, entries per patch."""
    weight = layer.get_parameter("weight")
    if isinstance(layer, nn.Linear):
        channels = out.shape[-1]
    else:
        spatial = weight.dim() - 2
        channels = out.shape[1] if out.dim() == spatial + 2 else out.shape[0]
    return out.numel() // max(channels, 1), weight[0].numel()


def tract_and_reference_grads(
    layer: nn.Module,
    x: Tensor,
    *,
    lam: float = LAM,
    statistics_dtype: torch.dtype | None = None,
    grad_output: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TrAct's weight gradient on ``layer`` (enabled here, in place) and its float64 reference.

    A plain copy of ``layer`` gives G on the same input and output gradient (``grad_output``, or
    ``torch.randn_like`` of the output); the reference is G·(XᵀX/n + λI)⁻¹, or for n < d the
    float64 answer for the same input (:func:`exact_tract_grad`).
    """
    plain = copy.deepcopy(layer)
    tract = TrAct(layer, l=lam, statistics_dtype=statistics_dtype)
    out = plain(x)
    grad = torch.randn_like(out) if grad_output is None else grad_output
    out.backward(grad)
    tract(x).backward(grad)
    n, d = _patch_count_and_dim(plain, out)
    plain_grad = plain.get_parameter("weight").grad
    tract_grad = tract.get_parameter("weight").grad
    assert plain_grad is not None and tract_grad is not None
    if n < d:
        return tract_grad, exact_tract_grad(plain, x, grad, lam)
    return tract_grad, reference_tract_grad(tract, x, plain_grad, lam)


def tract_error(
    layer: nn.Module,
    x: Tensor,
    *,
    lam: float = LAM,
    statistics_dtype: torch.dtype | None = None,
    grad_output: Tensor | None = None,
) -> float:
    """Relative error of TrAct's weight gradient on ``layer`` against the float64 reference
    (:func:`tract_and_reference_grads`); NaN where it is not finite."""
    return relative_error(
        *tract_and_reference_grads(
            layer, x, lam=lam, statistics_dtype=statistics_dtype, grad_output=grad_output
        )
    )


# ---- whole models ---------------------------------------------------------------------------


def small_cnn(width: int = 8, classes: int = 10) -> nn.Sequential:
    """A stem (``[0]``, Conv2d 3→width, 3×3, padding 1) and a little network behind it, for
    checks of training machinery (autocast, GradScaler, compile, checkpointing)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def step_error(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    *,
    lam: float = LAM,
    amp: torch.dtype | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    plain: nn.Sequential | None = None,
) -> float:
    """One backward of ``model`` (TrAct on ``model[0]``) and of a plain copy (``plain``, or
    made here) on ``x``, with a cross-entropy loss against ``y``; the relative error of
    ``model[0]``'s weight gradient against the plain G preconditioned in float64.

    ``amp`` runs both forwards under autocast in that dtype, ``forward`` replaces ``model``'s own
    (a compiled or checkpointed forward), ``scaler`` scales both losses. Gradients stay on both
    models' parameters. NaN where the plain model's gradients are not finite (a step a
    GradScaler skips: there is no reference).
    """
    plain = plain if plain is not None else remove(copy.deepcopy(model))
    for m, f in ((plain, plain), (model, forward or model)):
        m.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(x.device.type, dtype=amp)
            if amp is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = f(x)
        loss = F.cross_entropy(out.float(), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if not all(p.grad is None or bool(p.grad.isfinite().all()) for p in plain.parameters()):
        return math.nan
    plain_grad = plain[0].get_parameter("weight").grad
    tract_grad = model[0].get_parameter("weight").grad
    assert plain_grad is not None and tract_grad is not None
    expected = reference_tract_grad(model[0], x.detach(), plain_grad, lam)
    return relative_error(tract_grad, expected)


def main_output(out: Any) -> Tensor:
    """A model's main output tensor: ``out`` itself, its ``logits`` or ``last_hidden_state``
    (Hugging Face outputs), or its first element."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    first = out[0]
    assert isinstance(first, Tensor), type(first)
    return first


def model_step_error(
    model: nn.Module,
    layer: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    lam: float = LAM,
    seed: int = 1,
    plain: nn.Module | None = None,
) -> float:
    """One backward of ``model`` (TrAct on its submodule ``layer``) and of a plain copy
    (``plain``, or made here); the relative error of the layer's weight gradient against
    G·(XᵀX/n + λI)⁻¹ in float64, with X the input the plain layer saw (captured by a forward
    pre-hook). Gradients stay on both models' parameters.

    Both forwards run after ``torch.manual_seed(seed)`` (the same dropout and drop-path draws);
    the loss is the main output (:func:`main_output`) times a fixed random tensor, summed.
    """
    kwargs = dict(kwargs or {})
    plain = plain if plain is not None else remove(copy.deepcopy(model))
    plain_layer, tract_layer = plain.get_submodule(layer), model.get_submodule(layer)
    seen: list[Tensor] = []
    hook = plain_layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    projection: Tensor | None = None
    try:
        for m in (plain, model):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = main_output(m(*args, **kwargs)).float()
            if projection is None:
                gen = torch.Generator(device=out.device).manual_seed(seed + 1)
                projection = torch.randn(out.shape, generator=gen, device=out.device)
            (out * projection).sum().backward()
    finally:
        hook.remove()
    if len(seen) != 1:
        raise RuntimeError(f"{layer} was called {len(seen)} times in one forward, not once")
    plain_grad = plain_layer.get_parameter("weight").grad
    tract_grad = tract_layer.get_parameter("weight").grad
    assert plain_grad is not None and tract_grad is not None
    return relative_error(tract_grad, reference_tract_grad(tract_layer, seen[0], plain_grad, lam))


# ---- real photos at every input scale -----------------------------------------------------


@functools.cache
def _embedded_test_photos() -> Tensor:
    """The embedded CIFAR-10 subset's 2000 test photos, uint8, decoded once per process."""
    from trainact.experiments.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset("cifar10-subset", tmp, progress=False)
    images: Tensor = data.test_images
    return images


def photos(count: int = 256, *, device: torch.device | str | None = None) -> Tensor:
    """``count`` real CIFAR-10 test photos (the package's embedded subset, 2000 photos) as float32
    pixels in [0, 255], ``(count, 3, 32, 32)``, a new tensor. Needs the ``[experiments]`` extra
    (numpy)."""
    images = _embedded_test_photos()
    if count > images.shape[0]:
        raise ValueError(f"the embedded subset has {images.shape[0]} test photos, not {count}")
    selected = images[:count].float()  # a copy: the decoded photos stay as they are
    return selected if device is None else selected.to(device)


def standardized(x: Tensor) -> Tensor:
    """Each channel shifted and scaled to mean 0 and standard deviation 1 over the batch."""
    mean = x.mean((0, 2, 3), keepdim=True)
    return (x - mean) / x.std((0, 2, 3), keepdim=True)


def smooth(x: Tensor, size: int = 128) -> Tensor:
    """Upsampled like a high-resolution photo: neighbouring pixels nearly equal."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 255)


def over_exposed(x: Tensor, size: int = 128) -> Tensor:
    """Smooth (:func:`smooth` to ``size`` pixels) and bright: every pixel in [200, 255]."""
    return 200 + smooth(x, size) * (55 / 255)


def tokens(x: Tensor, patch: int = 8) -> Tensor:
    """Non-overlapping patches as token rows ``(B, tokens, 3·patch²)``, as a ViT embeds them."""
    b = x.shape[0]
    return F.unfold(x, patch, stride=patch).transpose(1, 2).reshape(b, -1, 3 * patch * patch)


def conv_stem(k: int, s: int, p: int = 0, out: int = 16) -> Callable[[], nn.Module]:
    """A factory of ``Conv2d(3, out, k, stride=s, padding=p)``."""
    return lambda: nn.Conv2d(3, out, k, stride=s, padding=p)


@dataclass(frozen=True)
class AccuracyCase:
    """One stem on one input made from the photos; ``target`` is the largest relative error
    allowed by default and for ``statistics_dtype=torch.float32``."""

    name: str
    layer: Callable[[], nn.Module]
    input: Callable[[Tensor], Tensor]
    target: float
    #: With ``statistics_dtype=torch.float64``. For n < d (the n×n form) the float32 layer's own
    #: kernel computes the weight gradient from the transformed output gradient, which bounds
    #: its accuracy whatever the statistics' dtype.
    exact_target: float = 1e-6


ACCURACY_CASES: list[AccuracyCase] = [
    AccuracyCase(
        "standardized, 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: standardized(x[:64]), 3e-5
    ),
    AccuracyCase(
        "standardized, 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: standardized(x[:64]), 3e-5
    ),
    AccuracyCase("[0, 1], 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: x[:64] / 255, 3e-5),
    AccuracyCase("[0, 1], 8x8/8", conv_stem(8, 8), lambda x: x[:64] / 255, 3e-5),
    AccuracyCase("[0, 255], 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 4x4/4", conv_stem(4, 4), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 8x8/8", conv_stem(8, 8), lambda x: x[:128], 2e-3),
    AccuracyCase("[0, 255], 16x16/16", conv_stem(16, 16), lambda x: x[:256], 2e-3),
    AccuracyCase(
        "[0, 255], Linear on 8x8 tokens", lambda: nn.Linear(192, 32), lambda x: tokens(x[:64]), 2e-3
    ),
    AccuracyCase(
        "smooth 128 px [0, 255], 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: smooth(x[:16]), 1e-2
    ),
    AccuracyCase("smooth 128 px [0, 255], 8x8/8", conv_stem(8, 8), lambda x: smooth(x[:32]), 1e-2),
    AccuracyCase(
        "smooth 128 px [0, 255], 16x16/16", conv_stem(16, 16), lambda x: smooth(x[:64]), 1e-2
    ),
    AccuracyCase(
        "over-exposed [200, 255], 7x7/2 pad 3",
        conv_stem(7, 2, 3),
        lambda x: over_exposed(x[:16]),
        5e-2,
    ),
    AccuracyCase(
        "over-exposed [200, 255], 8x8/8", conv_stem(8, 8), lambda x: over_exposed(x[:32]), 5e-2
    ),
    AccuracyCase(
        "over-exposed [200, 255], 16x16/16",
        conv_stem(16, 16),
        lambda x: over_exposed(x[:64]),
        5e-2,
    ),
    AccuracyCase(
        "n < d: Linear(300) on 16 rows [0, 255]",
        lambda: nn.Linear(300, 8),
        lambda x: x[:16].reshape(16, -1)[:, :300],
        1e-5,
        1e-5,
    ),
    AccuracyCase(
        "n < d: 7x7 on one 9x9 image [0, 255]",
        conv_stem(7, 1),
        lambda x: x[:1, :, :9, :9],
        1e-5,
        1e-5,
    ),
]


def many_chunk_cases(photos_32: int, photos_128: int) -> list[AccuracyCase]:
    """Two raw-pixel cases whose statistics take many chunks: a 7×7/2 stem (64 channels) on
    ``photos_32`` photos, and on ``photos_128`` photos upsampled to 128 px."""
    return [
        AccuracyCase(
            f"[0, 255], 7x7/2 pad 3, {photos_32} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: x[:photos_32],
            2e-3,
        ),
        AccuracyCase(
            f"smooth 128 px [0, 255], 7x7/2 pad 3, {photos_128} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: smooth(x[:photos_128]),
            1e-2,
        ),
    ]


#: The ``statistics_dtype`` of each column of the accuracy table, by name.
STATISTICS_DTYPES: dict[str, torch.dtype | None] = {
    "default": None,
    "float32": torch.float32,
    "float64": torch.float64,
}


def case_target(case: AccuracyCase, statistics_dtype: torch.dtype | None) -> float:
    """The largest relative error allowed for ``case`` with ``statistics_dtype``."""
    return case.exact_target if statistics_dtype is torch.float64 else case.target


def case_error(
    case: AccuracyCase,
    images: Tensor,
    statistics_dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
) -> float:
    """Relative error of TrAct's weight gradient on ``case`` (its layer on ``images``' device, a
    random output gradient) against the float64 reference (:func:`tract_error`)."""
    torch.manual_seed(seed)
    layer = case.layer().to(images.device)
    return tract_error(layer, case.input(images), statistics_dtype=statistics_dtype)
