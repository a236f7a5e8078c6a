"""TrAct inside real training machinery: autocast + GradScaler, torch.compile (one graph for
every batch size), activation checkpointing.

The layer's autograd functions (trainact/nn/layer.py) and the statistics' custom operator
(trainact/nn/statistics.py) meet PyTorch's machinery here, not in one module of their own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import trainact
from trainact import testing
from trainact.testing import reference_tract_grad, relative_error


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return testing.small_cnn(width=8, classes=5)


def _grads(model: nn.Module, x: torch.Tensor, forward=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = (forward or model)(x)
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_autocast_bf16_with_grad_scaler():
    """Under autocast the layer's plain G (from bf16 kernels) is preconditioned in float32."""
    model, x = small_cnn(), torch.randn(6, 3, 10, 10) * 2
    plain = copy.deepcopy(model)
    trainact.apply(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    grads = {}
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        scaler.scale(out.float().square().mean()).backward()
        grads[m] = m[0].weight.grad.clone()
    assert grads[model].dtype == torch.float32
    expected = reference_tract_grad(model[0], x, grads[plain], 0.1)
    torch.testing.assert_close(grads[model].double(), expected, rtol=1e-4, atol=1e-4)
    # the scaler unscales and steps; an inf gradient is skipped as without TrAct
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.step(opt)
    scaler.update()
    before = model[0].weight.detach().clone()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert torch.equal(model[0].weight, before), "a non-finite step must be skipped"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model, x = small_cnn(), torch.randn(4, 3, 10, 10)
    eager = copy.deepcopy(model)
    trainact.apply(model)
    trainact.apply(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got, expected = _grads(model, x, compiled), _grads(eager, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    plain = trainact.remove(copy.deepcopy(eager))
    assert not torch.allclose(got["0.weight"], _grads(plain, x)["0.weight"])


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_neither_double_counts_nor_mispairs(reentrant):
    model, x = small_cnn(), torch.randn(4, 3, 10, 10)
    reference = copy.deepcopy(model)
    trainact.apply(model)
    trainact.apply(reference)
    calls = []

    def forward(inp):
        # the TrAct layer is called twice inside the checkpointed region, on different inputs
        def region(t):
            calls.append(1)
            return model[1](model[0](t)) + model[1](model[0](t * 3 + 1))

        h = checkpoint(region, inp, use_reentrant=reentrant)
        return model[2:](h)

    def reference_forward(inp):
        h = reference[1](reference[0](inp)) + reference[1](reference[0](inp * 3 + 1))
        return reference[2:](h)

    got = _grads(model, x.requires_grad_(reentrant), forward)
    expected = _grads(reference, x.detach(), reference_forward)
    assert len(calls) == 2, "the region must have been recomputed"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_compile_with_deferred_accumulation_equals_one_big_batch():
    """defer=True runs the layer eagerly under compile (a graph break) and stays exact."""
    torch._dynamo.reset()
    model, x = small_cnn(), torch.randn(8, 3, 10, 10)
    reference = copy.deepcopy(model)
    trainact.apply(model, defer=True)
    trainact.apply(reference)
    compiled = torch.compile(model, backend="aot_eager")
    for part in x.chunk(4):
        (compiled(part).square().mean() / 4).backward()
    assert trainact.precondition_(model) == 1
    expected = _grads(reference, x)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


class GraphCount:
    """A torch.compile backend that counts the graphs it is given (aot_eager underneath)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


MODELS = {
    "conv stem": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (3, 8, 8)),
    "mlp, n < d": (lambda: nn.Sequential(nn.Linear(300, 16), nn.ReLU()), (300,)),
}


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_compile_one_graph_for_every_batch_size(model, how):
    """One graph serves 5 batch sizes, fullgraph included, each step exact. (The sizes stay
    below 16, where a plain CPU convolution's own compiled graph specializes on the batch; the
    first differs from every other size of the input, which dynamo would otherwise unify.)"""
    torch._dynamo.reset()
    make, sample = MODELS[model]
    torch.manual_seed(0)
    net = make()
    eager = copy.deepcopy(net)
    trainact.apply(net)
    trainact.apply(eager)
    backend = GraphCount()
    compiled = torch.compile(
        net, fullgraph=True, backend=backend, dynamic=True if how == "dynamic=True" else None
    )
    for batch in (5, 7, 9, 11, 13):
        x = torch.randn(batch, *sample)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        for m, f in ((net, compiled), (eager, eager)):
            m.zero_grad(set_to_none=True)
            f(x).square().mean().backward()
        torch.testing.assert_close(net[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-7)
    assert backend.graphs == 1


def test_compile_inductor_dynamic_is_exact():
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    eager = copy.deepcopy(net)
    trainact.apply(net)
    trainact.apply(eager)
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for batch in (2, 5):
        x = torch.rand(batch, 3, 8, 8) * 255  # raw pixels: the float64 product inside the op
        for m, f in ((net, compiled), (eager, eager)):
            m.zero_grad(set_to_none=True)
            f(x).square().mean().backward()
        assert relative_error(net[0].weight.grad, eager[0].weight.grad) < 1e-6
