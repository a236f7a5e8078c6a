"""Never silently wrong, part two: what users do between forward and the optimizer step.

Each test is one probe of ordinary training code that used to train silently wrong or crash
with a message that never named TrAct; now each is exact or raises an error that says what to do.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import trainact
from testing.markers import needs_compile
from trainact.maths import precision
from trainact.testing import exact_tract_grad, reference_tract_grad, relative_error

F64 = torch.float64


def _model(device: torch.device | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2))
    return model.to(device, F64)


def _batch(seed: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 3 + 2 * torch.randn(4, 3, 6, 6, generator=gen, dtype=F64)
    return x.to(device), torch.randn(4, 2, generator=gen, dtype=F64).to(device)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


# ---- deferred statistics belong to their gradient ------------------------------------------


def _discard(model: nn.Module, opt: torch.optim.Optimizer, how: str) -> None:
    if how == "optimizer.zero_grad()":
        opt.zero_grad()
    elif how == "zero_grad(set_to_none=False)":
        opt.zero_grad(set_to_none=False)
    elif how == "model.zero_grad()":
        model.zero_grad()
    else:  # .grad = None
        for p in model.parameters():
            p.grad = None


@pytest.mark.parametrize(
    "how",
    ["optimizer.zero_grad()", "zero_grad(set_to_none=False)", "model.zero_grad()", ".grad = None"],
)
def test_a_discarded_backward_leaves_no_statistics_behind(device64, how):
    """An adversarial or probing backward, then its gradient cleared, then the real one: the
    step equals the real backward alone (the discarded statistics went with their gradient)."""
    kept = _model(device64)
    trainact.apply(kept, defer=True)
    _loss(kept, *_batch(2, device64)).backward()
    trainact.precondition_(kept)
    expected = kept[0].weight.grad.clone()

    model = _model(device64)
    trainact.apply(model, defer=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(1, device64)
    _loss(model, 5 * x, y).backward()
    _discard(model, opt, how)
    _loss(model, *_batch(2, device64)).backward()
    assert trainact.precondition_(model) == 1
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-12, atol=1e-14)


def test_statistics_of_a_gradient_cleared_after_its_backward_are_dropped():
    """backward, zero_grad, then precondition_ and step: nothing to precondition, no error."""
    model = _model()
    trainact.apply(model, defer=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model, *_batch(1)).backward()
    opt.zero_grad()
    assert trainact.precondition_(model) == 0
    opt.step()


def test_accumulated_micro_batches_are_all_kept(device64):
    """Not a clearing: gradients accumulated over micro-batches keep every micro-batch's
    statistics (one batch of the concatenation)."""
    big = _model(device64)
    trainact.apply(big)
    x = torch.cat([_batch(1, device64)[0], _batch(2, device64)[0]])
    y = torch.cat([_batch(1, device64)[1], _batch(2, device64)[1]])
    _loss(big, x, y).backward()

    model = _model(device64)
    trainact.apply(model, defer=True)
    for seed in (1, 2):
        (_loss(model, *_batch(seed, device64)) / 2).backward()
    trainact.precondition_(model)
    torch.testing.assert_close(model[0].weight.grad, big[0].weight.grad, rtol=1e-10, atol=1e-13)


def test_autograd_grad_under_defer_raises_naming_it():
    """defer=True preconditions weight.grad, which torch.autograd.grad does not write: the
    error names autograd.grad (it used to blame zero_grad() at precondition_)."""
    model = _model()
    trainact.apply(model, defer=True)
    with pytest.raises(RuntimeError, match="autograd.grad"):
        torch.autograd.grad(_loss(model, *_batch(1)), list(model.parameters()))
    _loss(model, *_batch(2)).backward()  # the failed pass left nothing behind
    assert trainact.precondition_(model) == 1


def test_autograd_grad_without_defer_is_preconditioned(device64):
    model = _model(device64)
    trainact.apply(model)
    x, y = _batch(1, device64)
    (grad,) = torch.autograd.grad(_loss(model, x, y), [model[0].weight])
    plain = trainact.remove(_model(device64))
    _loss(plain, x, y).backward()
    expected = reference_tract_grad(model[0], x, plain[0].weight.grad, 0.1)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


# ---- one rule for several calls and tied weights -------------------------------------------


def _two_views(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _loss(model, x, y) + _loss(model, 2 * x + 1, y)


def test_two_views_without_defer_use_each_call_s_own_statistics(device64):
    """The rule (the paper's Lemma, per forward): Σ Gᵢ·Aᵢ⁻¹."""
    model = _model(device64)
    trainact.apply(model)
    x, y = _batch(1, device64)
    _two_views(model, x, y).backward()
    expected = 0
    for view in (x, 2 * x + 1):
        plain = trainact.remove(_model(device64))
        _loss(plain, view, y).backward()
        expected = expected + reference_tract_grad(model[0], view, plain[0].weight.grad, 0.1)
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-9, atol=1e-12)


def test_two_views_with_defer_raise():
    """Deferred statistics would pool the two calls, a different update than without defer:
    refused, with what to do."""
    model = _model()
    trainact.apply(model, defer=True)
    with pytest.raises(RuntimeError, match="torch.cat"):
        _two_views(model, *_batch(1)).backward()


class _Tied(nn.Module):
    """A first Linear whose weight the decoder reuses (a tied autoencoder)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(12, 4).double()
        self.decoder = nn.Module()
        self.decoder.weight = self.encoder.weight  # the same Parameter, used transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.encoder(x)), self.decoder.weight.T)


def test_tied_weights_without_defer_precondition_the_layer_s_own_share(device64):
    model = _Tied().to(device64)
    trainact.apply(model, layer="encoder")
    x = torch.randn(20, 12, dtype=F64).to(device64)
    (model(x) - x).square().mean().backward()
    # the plain gradient, split into the encoder's own share and the decoder's
    plain = trainact.remove(_Tied().to(device64))
    w = plain.encoder.weight
    h = plain.encoder(x)
    decoded = nn.functional.linear(torch.tanh(h), w.detach().T)
    (own,) = torch.autograd.grad((decoded - x).square().mean(), [w])
    plain.zero_grad()
    (plain(x) - x).square().mean().backward()
    other = w.grad - own
    expected = reference_tract_grad(model.encoder, x, own, 0.1) + other
    torch.testing.assert_close(model.encoder.weight.grad, expected, rtol=1e-9, atol=1e-12)


def test_tied_weights_with_defer_are_refused():
    with pytest.raises(ValueError, match="tied"):
        trainact.apply(_Tied(), layer="encoder", defer=True)


class _TiedFunctional(nn.Module):
    """A tied autoencoder whose decoder reads the first layer's weight directly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(12, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.encoder(x)), self.encoder.weight.t())


@pytest.mark.parametrize("on_step", [False, True])
def test_a_weight_used_outside_the_layer_with_defer_is_refused_naming_it(on_step):
    """The decoder's share reaches encoder.weight.grad without passing the layer: with defer=True
    precondition_ would precondition it too (0.5 apart from defer=False). Refused before the
    step, naming the weight; the layer's own share alone is not (accumulation keeps working)."""
    model = _TiedFunctional()
    trainact.apply(model, layer="encoder", defer=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if on_step:
        trainact.precondition_on_step(opt, model)
    x = torch.randn(20, 12, dtype=F64)
    for part in x.chunk(2):
        (model(part) - part).square().mean().backward()
    before = model.encoder.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"encoder\.weight\.grad received gradient from"):
        opt.step() if on_step else trainact.precondition_(model)
    assert torch.equal(model.encoder.weight, before)


def _clip_steps(order: str, scaler: bool, k: int = 2, max_norm: float = 0.01) -> list[str]:
    """Two steps of k micro-batches with defer=True, clipping and a step in ``order``; the
    TrAct warnings they raise."""
    model = _model().float()
    trainact.apply(model, defer=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    if order == "on_step":
        trainact.precondition_on_step(opt, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            opt.zero_grad()
            for seed in range(k):
                x, y = (t.float() for t in _batch(10 * step + seed))
                loss = _loss(model, x, y) / k
                (grad_scaler.scale(loss) if grad_scaler else loss).backward()
            if grad_scaler:
                grad_scaler.unscale_(opt)
            if order == "precondition_ first":
                trainact.precondition_(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if order == "precondition_ after clipping":
                trainact.precondition_(model)
            if grad_scaler:
                grad_scaler.step(opt)
                grad_scaler.update()
            else:
                opt.step()
    return [str(w.message) for w in caught if "TrAct" in str(w.message)]


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "GradScaler"])
@pytest.mark.parametrize("order", ["on_step", "precondition_ after clipping"])
def test_clipping_before_tract_warns_once_naming_precondition_(monkeypatch, order, scaler):
    """precondition_on_step with clipping before optimizer.step() (timm's NativeScaler clips
    inside its call) clipped the plain gradient: one warning naming the fix."""
    monkeypatch.setattr(trainact.nn.deferred, "_warned_clipping", False)
    caught = _clip_steps(order, scaler)
    assert len(caught) == 1 and "trainact.precondition_(model)" in caught[0]
    assert "before clipping" in caught[0]


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "GradScaler"])
def test_no_clipping_warning_on_the_legitimate_paths(monkeypatch, scaler):
    """precondition_ after GradScaler.unscale_ (a power of two) and before clipping, with
    accumulation; precondition_on_step with a clip that does not bite (factor 1): no warning."""
    monkeypatch.setattr(trainact.nn.deferred, "_warned_clipping", False)
    assert _clip_steps("precondition_ first", scaler, k=3) == []
    assert _clip_steps("on_step", scaler, max_norm=1e9) == []


# ---- an input that requires grad (FGSM, gradient penalties) in the n×n form ---------------


def _fgsm_inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Photos as rows for an MLP: raw pixels or standardized, the first d of each photo."""
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")
    from testing.accuracy_cases import photos, standardized

    pixels, d, n = case.split()
    images = photos(int(n))
    if pixels == "standardized":
        images = standardized(images)
    x = images.reshape(int(n), -1)[:, : int(d)].contiguous()
    return x, torch.arange(int(n)) % 10


def _fgsm_probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str = "eager"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FGSM probe's backward (the input requires grad): the input's gradient, and the first
    layer's output gradient D (by a tensor hook)."""
    seen = []
    inp = x.clone().requires_grad_(True)
    if how == "compile":
        torch._dynamo.reset()
        out = torch.compile(model, backend="aot_eager")(inp)
        out.backward(torch.ones_like(out) / 7)
        return inp.grad, torch.empty(0)
    if how == "eager":
        h = model[0](inp)
    else:
        h = torch.utils.checkpoint.checkpoint(model[0], inp, use_reentrant=how == "reentrant")
    h.register_hook(seen.append)
    nn.functional.cross_entropy(model[1:](h), y).backward()
    return inp.grad, seen[0]


@pytest.mark.parametrize("case", ["raw 784 16", "standardized 784 16", "raw 3072 32"])
@pytest.mark.parametrize("how", ["eager", "checkpoint", "reentrant"])
def test_an_input_that_requires_grad_keeps_the_row_form_accuracy(case, how):
    """FGSM on raw and standardized pixels (n < d): the weight gradient meets the n < d target
    against the float64 answer from the same output gradient (the d×d form it used to take was
    0.14 off on these raw pixels, 0.36 for Linear(3072) at n = 32, 2e-5 standardized; 1.2e-7
    to 1.8e-7 now, as without input gradient), and the input gradient, the one FGSM steps
    along, is the plain layer's bit for bit; under activation checkpointing too."""
    x, y = _fgsm_inputs(case)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, 10))
    model = copy.deepcopy(plain)
    trainact.apply(model)
    input_grad, grad_output = _fgsm_probe(model, x, y, how)
    plain_input_grad, _ = _fgsm_probe(plain, x, y)
    expected = exact_tract_grad(plain[0], x, grad_output, 0.1)
    assert relative_error(model[0].weight.grad, expected) < 1e-5
    assert torch.equal(input_grad, plain_input_grad)
    assert torch.equal(model[0].bias.grad, plain[0].bias.grad)


@needs_compile
def test_an_input_that_requires_grad_under_torch_compile_is_exact():
    """The n×n form for an input that requires grad runs the layer eagerly (one graph break)."""
    x, _ = _fgsm_inputs("raw 784 16")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
    model = copy.deepcopy(plain)
    trainact.apply(model)
    input_grad, _ = _fgsm_probe(model, x, None, "compile")
    plain_input_grad, _ = _fgsm_probe(plain, x, None, "compile")
    h = plain[0](x).detach().requires_grad_(True)
    plain[1:](h).backward(torch.ones(16, 10) / 7)
    expected = exact_tract_grad(plain[0], x, h.grad, 0.1)
    assert relative_error(model[0].weight.grad, expected) < 1e-5
    torch.testing.assert_close(input_grad, plain_input_grad, rtol=1e-6, atol=1e-9)


def test_a_gradient_penalty_in_the_row_form_preconditions_the_whole_gradient():
    """A double backward through the layer (WGAN-GP's penalty on the input gradient, n < d):
    the weight gradient also gets the penalty's share, which is not DᵀX; the whole G is
    preconditioned, as the d×d form does (float64 reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    plain = copy.deepcopy(model)
    trainact.apply(model)
    x = torch.randn(5, 12, dtype=F64)
    grads = []
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        loss = m(xi).square().mean()
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        (loss + gx.square().sum()).backward()
        grads.append(m[0].weight.grad)
    expected = reference_tract_grad(model[0], x, grads[1], 0.1)
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)


# ---- values a layer never reads ------------------------------------------------------------

_PRECISIONS = {
    "cpu": None,
    "statistics float32": torch.float32,
    "statistics float64": torch.float64,
    "mps (host solve)": precision.HOST_SOLVE,
    "cuda full-rate float64": precision.gpu_precision("H100", 9, 0),
    "cuda reduced-rate float64": precision.gpu_precision("RTX 4090", 8, 9),
}


@pytest.mark.parametrize("path", sorted(_PRECISIONS))
@pytest.mark.parametrize("value", [float("nan"), 1e20], ids=["nan", "1e20"])
@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 8, 4, stride=4),  # on 17x17: row and column 16 unread
        lambda: nn.Conv2d(3, 8, 2, stride=3),  # every third row and column unread
        lambda: nn.Conv2d(3, 8, 3, stride=4, padding=1, padding_mode="reflect"),
    ],
    ids=["4x4/4", "2x2/3", "3x3/4 reflect"],
)
def test_a_value_the_layer_never_reads_cannot_poison_its_gradient(path, value, conv):
    """A NaN or 1e20 in a pixel a strided convolution never reads: the plain gradient is finite,
    and TrAct's is the one of the same input without it (the channel means, spreads and largest
    values included it: NaN, or 1e20 swamping the statistics), on every precision path."""
    torch.manual_seed(0)
    layer = conv()
    policy = _PRECISIONS[path]
    dtype = policy if isinstance(policy, torch.dtype) else None
    x = 255 * torch.rand(8, 3, 17, 17)
    unread = [(0, 1, 16, 5), (3, 0, 2, 16)] if layer.kernel_size[0] == 4 else [(2, 2, 2, 7)]
    clean, poisoned = x.clone(), x.clone()
    for index in unread:
        poisoned[index] = value
    grads = []
    for inp in (clean, poisoned):
        tract = trainact.TrAct(copy.deepcopy(layer), statistics_dtype=dtype)
        use = precision.use_precision(policy) if isinstance(policy, precision.Precision) else None
        with use or contextlib.nullcontext():
            tract(inp).square().sum().backward()
        grads.append(tract.weight.grad)
    plain = copy.deepcopy(layer)
    plain(poisoned).square().sum().backward()
    assert plain.weight.grad.isfinite().all()
    assert grads[1].isfinite().all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)


# ---- frozen layers ---------------------------------------------------------------------------


def test_a_frozen_first_layer_warns_naming_it_and_costs_nothing(monkeypatch):
    model = _model()
    model[0].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"TrAct enabled on 0, whose weight does not require"):
        assert trainact.apply(model) == "0"
    with pytest.warns(UserWarning, match="frozen"):
        trainact.TrAct(nn.Linear(3, 2).requires_grad_(False))
    calls = []
    original = trainact.nn.layer.call_statistics
    monkeypatch.setattr(
        trainact.nn.layer, "call_statistics", lambda *a: calls.append(1) or original(*a)
    )
    _loss(model, *_batch(1)).backward()
    assert not calls
    model[0].requires_grad_(True)  # unfrozen later: TrAct works from then on
    _loss(model, *_batch(1)).backward()
    assert calls


def test_a_trainable_layer_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainact.apply(_model())


# ---- tracing and scripting -------------------------------------------------------------------


def test_jit_trace_in_training_mode_raises_and_traces_in_eval_mode():
    model = _model()
    trainact.apply(model)
    x = _batch(1)[0]
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(model, (x,))
    traced = torch.jit.trace(model.eval(), (x,))
    torch.testing.assert_close(traced(x), model(x))


def test_jit_script_compiles_the_plain_layer_for_eval_mode_and_refuses_training():
    """Scripting used to fail ("has no attribute '__dict__'"); the scripted module computes the
    plain layer in eval mode, refuses training mode, and the Python model keeps TrAct."""
    model = _model()
    trainact.apply(model)
    x = _batch(1)[0]
    scripted = torch.jit.script(model)
    with pytest.raises(torch.jit.Error, match="cannot keep TrAct"):
        scripted(x)
    scripted.eval()
    model.eval()
    torch.testing.assert_close(scripted(x), model(x))
    assert trainact.is_enabled(model)
    model.train()
    _loss(model, *_batch(1)).backward()  # the Python model still trains with TrAct


# ---- transforms and libraries TrAct cannot follow ------------------------------------------


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, p, x: torch.func.grad(lambda p: f(p, x).sum())(p),
        lambda f, p, x: torch.func.jacrev(lambda p: f(p, x).sum())(p),
        lambda f, p, x: torch.func.vmap(lambda xi: f(p, xi[None]))(x),
    ],
    ids=["grad", "jacrev", "vmap"],
)
def test_torch_func_transforms_raise_naming_tract(transform):
    layer = trainact.TrAct(nn.Linear(5, 3))
    params = dict(layer.named_parameters())

    def f(p, x):
        return torch.func.functional_call(layer, p, (x,))

    with pytest.raises(RuntimeError, match="TrAct on TrActLinear does not support torch.func"):
        transform(f, params, torch.randn(4, 5))


def test_functional_call_outside_transforms_is_preconditioned(device64):
    layer = trainact.TrAct(nn.Linear(5, 3).to(device64, F64))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    x = torch.randn(8, 5, dtype=F64).to(device64)
    torch.func.functional_call(layer, params, (x,)).square().sum().backward()
    plain = trainact.remove(copy.deepcopy(layer))
    plain.load_state_dict({k: v.detach() for k, v in params.items()})
    plain(x).square().sum().backward()
    expected = reference_tract_grad(layer, x, plain.weight.grad, 0.1)
    assert relative_error(params["weight"].grad, expected) < 1e-10


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_opacus_raises_naming_tract(mode):
    opacus = pytest.importorskip("opacus.grad_sample")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    trainact.apply(model)
    gsm_class = opacus.get_gsm_class(mode)
    gsm = gsm_class(model, force_functorch=True) if mode == "functorch" else gsm_class(model)
    with pytest.raises(RuntimeError, match="TrAct on TrActConv2d cannot be combined with Opacus"):
        gsm(torch.randn(5, 3, 8, 8)).sum().backward()


def test_prepare_qat_raises_instead_of_leaving_the_stem_unquantized():
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    trainact.apply(model)
    model.qconfig = get_default_qat_qconfig("x86")
    prepared = prepare_qat(model.train())
    assert type(prepared[0]).__name__ == "TrActConv2d"  # not swapped: the silent case
    with pytest.raises(RuntimeError, match="prepare_qat"):
        prepared(torch.randn(2, 3, 6, 6))


def test_quantize_dynamic_warns_that_the_stem_stays_unquantized():
    """quantize_dynamic swaps exact nn.Linear types: the TrAct layer stayed float, silently (the
    Trainer leaves TrAct on). It warns naming the fix, which then quantizes every Linear."""
    from torch.ao.quantization import quantize_dynamic

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    trainact.apply(model)
    with pytest.warns(UserWarning, match=r"stays unquantized.*trainact\.remove\(model\)"):
        quantized = quantize_dynamic(model)
    assert type(quantized[0]).__name__ == "TrActLinear"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*qconfig")
        quantized = quantize_dynamic(trainact.remove(model))
    assert type(quantized[0]) is type(quantized[2]) is not nn.Linear


# ---- inputs the layer itself refuses or takes differently ----------------------------------


def test_a_kernel_larger_than_the_input_gets_the_layer_s_own_error():
    layer = trainact.TrAct(nn.Conv2d(3, 4, 5))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        layer(torch.randn(2, 3, 3, 3))


def test_a_jagged_nested_tensor_into_a_linear_layer_is_exact(device64):
    torch.manual_seed(0)
    layer = trainact.TrAct(nn.Linear(6, 3).to(device64, F64))
    rows = [torch.randn(n, 6, dtype=F64).to(device64) for n in (3, 5, 2)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    layer(nested).values().square().sum().backward()
    plain = trainact.remove(copy.deepcopy(layer))
    plain.zero_grad()
    flat = torch.cat(rows)
    plain(flat).square().sum().backward()
    expected = reference_tract_grad(layer, flat, plain.weight.grad, 0.1)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [5, 40], ids=["n<d", "n>d"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_input_into_a_linear_layer_is_exact(n, layout):
    """Sparse COO and CSR rows (a bag of words): the forward is the plain layer's on the sparse
    input, the weight gradient that of the same rows dense (it used to fail inside reshape,
    never naming TrAct)."""
    torch.manual_seed(0)
    dense = torch.randn(n, 20, dtype=F64) * (torch.rand(n, 20) < 0.3)
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    layer = nn.Linear(20, 3).double()
    plain, tract, reference = (copy.deepcopy(layer) for _ in range(3))
    trainact.TrAct(tract)
    trainact.TrAct(reference)
    out = tract(sparse)
    assert torch.equal(out, plain(sparse))
    grad = torch.randn_like(out)
    out.backward(grad)
    reference(dense).backward(grad)
    torch.testing.assert_close(tract.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-14)


def test_a_sparse_input_into_a_convolution_is_refused_naming_tract():
    layer = trainact.TrAct(nn.Conv1d(2, 3, 3))
    with pytest.raises(TypeError, match="TrAct on TrActConv1d does not support sparse"):
        layer(torch.randn(4, 2, 8).to_sparse())


def test_a_nested_tensor_into_a_convolution_is_refused_naming_tract():
    layer = trainact.TrAct(nn.Conv1d(2, 3, 3))
    nested = torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(2, 7)])
    with pytest.raises(TypeError, match="TrAct on TrActConv1d does not support nested"):
        layer(nested)


# ---- discovery leaves nothing behind ---------------------------------------------------------


@pytest.mark.parametrize("example", [False, True], ids=["fx", "example_inputs"])
def test_automatic_discovery_leaves_no_reference_cycle_holding_the_model(example):
    model = _model()
    gc.collect()
    gc.disable()
    try:
        trainact.apply(model, example_inputs=_batch(1)[0] if example else None)
        ref = weakref.ref(model[0])
        del model
        assert ref() is None
    finally:
        gc.enable()


# ---- patterns that keep working ------------------------------------------------------------


def test_a_gradient_penalty_differentiates_through_the_preconditioned_backward():
    """Double backward: a penalty on the input gradient (create_graph=True) trains with
    TrAct's gradient of the total loss, checked against an explicit float64 reference."""
    model = _model()
    trainact.apply(model)
    plain = trainact.remove(_model())
    x, y = _batch(1)
    grads = []
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        loss = _loss(m, xi, y)
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        (loss + gx.square().sum()).backward()
        grads.append(m[0].weight.grad)
    expected = reference_tract_grad(model[0], x, grads[1], 0.1)
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)


def test_meta_device_init_then_assign_loading_keeps_tract():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2))
    trainact.apply(model)
    model.load_state_dict(trainact.remove(_model()).float().state_dict(), assign=True)
    assert trainact.is_enabled(model) and model[0].weight.device.type == "cpu"
    x, y = (t.float() for t in _batch(1))
    _loss(model, x, y).backward()
    plain = trainact.remove(_model()).float()
    _loss(plain, x, y).backward()
    expected = reference_tract_grad(model[0], x, plain[0].weight.grad, 0.1)
    assert relative_error(model[0].weight.grad, expected) < 1e-5


def test_precondition_on_step_with_a_grad_scaler_that_skips_a_step():
    """A step the GradScaler skips never calls optimizer.step(), so its statistics are never
    preconditioned; cleared with their gradient by the next zero_grad, they do not leak into
    the next step."""
    model = _model().float()
    trainact.apply(model, defer=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainact.precondition_on_step(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = (t.float() for t in _batch(1))
    scaler.scale(_loss(model, 5 * x, y) * float("inf")).backward()
    scaler.step(opt)  # skipped: the gradient is not finite
    scaler.update()
    opt.zero_grad()
    x2, y2 = (t.float() for t in _batch(2))
    scaler.scale(_loss(model, x2, y2)).backward()
    scaler.step(opt)
    plain = trainact.remove(_model()).float()
    _loss(plain, x2, y2).backward()
    expected = reference_tract_grad(model[0], x2, plain[0].weight.grad, 0.1)
    assert relative_error(model[0].weight.grad, expected) < 1e-5
