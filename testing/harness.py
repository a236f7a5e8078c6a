"""The test harness: one TrAct layer or a whole model's step against the float64 references of
:mod:`trainact.testing`, and small models for checks of training machinery. Shared by the tests
and the benchmarks; not part of the installed package.

- :func:`tract_error` (and :func:`tract_and_reference_grads`): one TrAct layer's weight gradient
  against the reference, from a plain copy's gradient G on the same input;
- :func:`check_layer`: forward, input and bias gradients bit-identical to the plain layer's, the
  weight gradient to a tolerance;
- :func:`step_error` and :func:`model_step_error`: the same after a training step of a whole
  model (autocast, a GradScaler, a compiled or checkpointed forward; a model zoo's model).

    >>> import torch
    >>> from testing.harness import tract_error
    >>> tract_error(torch.nn.Conv2d(3, 8, 3), torch.randn(4, 3, 16, 16)) < 1e-5
    True
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainact import TrAct, remove
from trainact.testing import exact_tract_grad, reference_tract_grad, relative_error

#: λ of every check here unless given.
LAM = 0.1

# ---- one layer ------------------------------------------------------------------------------


def plain_and_tract(layer: nn.Module, lam: float = LAM) -> tuple[nn.Module, nn.Module]:
    """A plain copy of ``layer`` and ``layer`` itself with TrAct enabled."""
    plain = copy.deepcopy(layer)
    return plain, TrAct(layer, l=lam)


def check_layer(
    layer: nn.Module,
    x: Tensor,
    lam: float,
    rtol: float,
    atol: float,
    device: torch.device | None = None,
) -> None:
    """Forward, input and bias gradients bit-identical to the plain layer's; the weight gradient
    G·(XᵀX/n + λI)⁻¹ to ``rtol``/``atol``; layer and input moved to ``device`` first (made on
    the CPU, so every device sees the same numbers). TrAct is enabled on ``layer`` here."""
    if device is not None:
        layer, x = layer.to(device), x.to(device)
    plain, tract = plain_and_tract(layer, lam)
    out_plain, out_tract = plain(x), tract(x)
    assert torch.equal(out_plain, out_tract), "forward must be bit-identical"
    grad_out = torch.randn_like(out_plain)
    xp, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xp).backward(grad_out)
    tract(xt).backward(grad_out)
    plain_weight, tract_weight = plain.get_parameter("weight"), tract.get_parameter("weight")
    assert plain_weight.grad is not None and tract_weight.grad is not None
    expected = reference_tract_grad(tract, x, plain_weight.grad, lam)
    assert tract_weight.grad.dtype == tract_weight.dtype
    torch.testing.assert_close(tract_weight.grad.double(), expected, rtol=rtol, atol=atol)
    assert torch.equal(xp.grad, xt.grad), "input gradient must be unchanged"
    plain_bias = plain.get_parameter("bias") if getattr(plain, "bias", None) is not None else None
    if plain_bias is not None:
        tract_bias = tract.get_parameter("bias")
        assert torch.equal(plain_bias.grad, tract_bias.grad), "bias gradient must be unchanged"


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


def regression_model(device: torch.device | None = None) -> nn.Sequential:
    """A float64 conv stem (``[0]``, 3→4 channels, 3×3) and a linear head on 6×6 images, for
    the deferred-statistics and step-guard checks (:func:`regression_batches`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2))
    return model.to(device, torch.float64)


def regression_batches(
    k: int = 2, device: torch.device | None = None
) -> list[tuple[Tensor, Tensor]]:
    """``k`` micro-batches of 4 float64 images (mean 3, std 2) and 2 regression targets each."""
    gen = torch.Generator().manual_seed(1)
    return [
        (
            (3 + 2 * torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)).to(device),
            torch.randn(4, 2, generator=gen).to(device),
        )
        for _ in range(k)
    ]


def regression_loss(model: nn.Module, x: Tensor, y: Tensor, k: int = 1) -> Tensor:
    """Mean squared error, divided by the number ``k`` of micro-batches of the step."""
    out: Tensor = model(x)
    return (out - y.double()).square().mean() / k


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
