"""TrAct inside real training machinery: autocast + GradScaler, torch.compile (one graph for
every batch size), activation checkpointing.

The layer's autograd functions (trainact/nn/layer.py) and the statistics' custom operator
(trainact/nn/call_statistics.py) meet PyTorch's machinery here, not in one module of their own.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import trainact
from testing import harness
from testing.markers import needs_compile
from trainact.testing import reference_tract_grad, relative_error


def small_cnn(device: torch.device | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return harness.small_cnn(width=8, classes=5).to(device)


def _grads(model: nn.Module, x: torch.Tensor, forward=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = (forward or model)(x)
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _batch(device: torch.device, seed: int, b: int = 8, hw: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, hw, hw, generator=gen)
    return x.to(device), torch.randint(0, 5, (b,), generator=gen).to(device)


def _backend(device: torch.device) -> str:
    """inductor where it compiles quickly (CUDA's Triton); aot_eager on the CPU, whose inductor
    (a C++ build per graph) test_torch_compile_fullgraph[inductor] covers once."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def test_autocast_bf16_with_grad_scaler(device):
    """Under autocast the layer's plain G (from bf16 kernels) is preconditioned in float32."""
    model, x = small_cnn(device), (torch.randn(6, 3, 10, 10) * 2).to(device)
    plain = copy.deepcopy(model)
    trainact.apply(model)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    grads = {}
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
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
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(x).float().square().mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert torch.equal(model[0].weight, before), "a non-finite step must be skipped"


def test_fp16_grad_scaler_skips_exactly_the_steps_the_plain_model_skips(device):
    """fp16 autocast and a GradScaler whose scale grows every step until float16 overflows, and
    an inf pixel at step 3: every applied step's TrAct gradient is exact, TrAct skips exactly the
    steps the plain model would, a non-finite plain gradient stays non-finite, and a skipped
    step leaves the weight alone."""
    torch.manual_seed(0)
    model = harness.small_cnn().to(device)
    trainact.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=1)
    errors, skipped = [], []
    for step in range(8):
        x, y = _batch(device, 100 + step)
        y = y * 2  # 10 classes
        if step == 3:
            x[0, 0, 0, 0] = math.inf
        plain = trainact.remove(copy.deepcopy(model))
        error = harness.step_error(model, x, y, amp=torch.float16, scaler=scaler, plain=plain)
        if not plain[0].weight.grad.isfinite().all():
            assert not model[0].weight.grad.isfinite().all(), f"step {step} made finite"
        scale, before = scaler.get_scale(), model[0].weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        tract_skipped = scaler.get_scale() < scale
        assert tract_skipped == math.isnan(error), f"step {step}: skipped {tract_skipped}"
        if tract_skipped:
            skipped.append(step)
            assert torch.equal(model[0].weight, before), f"skipped step {step} moved the weight"
        else:
            errors.append(error)
        opt.zero_grad(set_to_none=True)
    assert 3 in skipped and len(errors) >= 2, (skipped, errors)
    assert max(errors) <= 1e-4, errors
    assert all(p.isfinite().all() for p in model.parameters())


def test_no_host_synchronization_is_added_to_a_training_step(device):
    """torch.cuda.set_sync_debug_mode counts the calls that wait for the GPU: one bf16 autocast
    step with TrAct makes no more than the plain step (none, where the plain step makes none:
    then the TrAct step also runs under "error")."""
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode needs CUDA (elsewhere nothing waits)")
    torch.manual_seed(0)
    plain = harness.small_cnn(width=16).to(device)
    tract = copy.deepcopy(plain)
    trainact.apply(tract)
    x, y = _batch(device, 300, b=64, hw=32)
    steps = {}
    for name, model in (("plain", plain), ("TrAct", tract)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y * 2)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        step()  # warm-up: handles, workspaces and optimizer state are created here
        step()
    counts = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts["TrAct"] <= counts["plain"], counts
    if counts["plain"] == 0:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps["TrAct"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_neither_double_counts_nor_mispairs(device, reentrant):
    model, x = small_cnn(device), torch.randn(4, 3, 10, 10).to(device)
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


@needs_compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    model, x = small_cnn(device), torch.randn(4, 3, 10, 10).to(device)
    eager = copy.deepcopy(model)
    trainact.apply(model)
    trainact.apply(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got, expected = _grads(model, x, compiled), _grads(eager, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    plain = trainact.remove(copy.deepcopy(eager))
    assert not torch.allclose(got["0.weight"], _grads(plain, x)["0.weight"])


@needs_compile
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_sgd_steps_are_exact(device, mode):
    """Three SGD steps through ``torch.compile(fullgraph=True)``, each TrAct gradient against
    the plain eager copy's G preconditioned in float64 (with mode="reduce-overhead": CUDA graph
    replays)."""
    if mode == "reduce-overhead" and device.type != "cuda":
        pytest.skip("mode='reduce-overhead' records CUDA graphs: CUDA only")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = harness.small_cnn().to(device)
    trainact.apply(model)
    options = {"mode": mode} if mode else {}
    compiled = torch.compile(model, fullgraph=True, backend=_backend(device), **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        x, y = _batch(device, 200 + step)
        assert harness.step_error(model, x, y * 2, forward=compiled) <= 1e-4, step
        opt.step()
        opt.zero_grad(set_to_none=True)


@needs_compile
def test_compile_with_deferred_accumulation_equals_one_big_batch(device):
    """defer=True runs the layer eagerly under compile (a graph break) and stays exact."""
    torch._dynamo.reset()
    model, x = small_cnn(device), torch.randn(8, 3, 10, 10).to(device)
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


@needs_compile
@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_compile_one_graph_for_every_batch_size(device, model, how):
    """One graph serves 5 batch sizes, fullgraph included, each step exact. (The sizes stay
    below 16, where a plain CPU convolution's own compiled graph specializes on the batch; the
    first differs from every other size of the input, which dynamo would otherwise unify.)"""
    torch._dynamo.reset()
    make, sample = MODELS[model]
    torch.manual_seed(0)
    net = make().to(device)
    eager = copy.deepcopy(net)
    trainact.apply(net)
    trainact.apply(eager)
    backend = GraphCount()
    compiled = torch.compile(
        net, fullgraph=True, backend=backend, dynamic=True if how == "dynamic=True" else None
    )
    for batch in (5, 7, 9, 11, 13):
        x = torch.randn(batch, *sample).to(device)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        for m, f in ((net, compiled), (eager, eager)):
            m.zero_grad(set_to_none=True)
            f(x).square().mean().backward()
        torch.testing.assert_close(net[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-7)
    assert backend.graphs == 1


@needs_compile
def test_compile_inductor_dynamic_is_exact(device):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).to(device)
    eager = copy.deepcopy(net)
    trainact.apply(net)
    trainact.apply(eager)
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for batch in (2, 5):
        x = (torch.rand(batch, 3, 8, 8) * 255).to(device)  # raw pixels: float64 in the op
        for m, f in ((net, compiled), (eager, eager)):
            m.zero_grad(set_to_none=True)
            f(x).square().mean().backward()
        assert relative_error(net[0].weight.grad, eager[0].weight.grad) < 1e-6


@needs_compile
def test_compiled_cpu_statistics_still_choose_float32_where_accurate(monkeypatch):
    """Under torch.compile the CPU's data-dependent float32/float64 choice runs inside the
    custom operator: standardized inputs get the float32 product, raw pixels float64."""
    from trainact.nn import call_statistics

    torch._dynamo.reset()
    chosen = []
    original = call_statistics._product
    monkeypatch.setattr(
        call_statistics,
        "_product",
        lambda stats, adapter, x, mean, dtype, precision: (
            chosen.append(dtype) or original(stats, adapter, x, mean, dtype, precision)
        ),
    )
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    trainact.apply(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(4, 3, 8, 8)).sum().backward()
    compiled(255 * torch.rand(4, 3, 8, 8)).sum().backward()
    assert chosen == [torch.float32, torch.float64]
