"""Never silently plain (trainact/nn/checks.py): every road that used to train without TrAct now
preconditions exactly or raises an error that says what to do (issue 9)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import trainact
from testing.harness import regression_batches, regression_loss, regression_model


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: parametrizations.weight_norm(m),
        lambda m: parametrizations.spectral_norm(m),
        lambda m: torch.nn.utils.spectral_norm(m),
        lambda m: parametrize.register_parametrization(m, "weight", nn.Tanh()) or m,
    ],
    ids=["weight_norm", "spectral_norm", "old-spectral_norm", "register_parametrization"],
)
def test_parametrized_weights_are_refused_with_defer_and_left_untouched(wrap):
    torch.manual_seed(0)
    layer = wrap(nn.Conv2d(3, 4, 3))
    with pytest.raises(RuntimeError, match="defer=False"):
        trainact.TrAct(layer, defer=True)
    assert not trainact.is_enabled(layer)
    reference = copy.deepcopy(layer)
    trainact.TrAct(layer)  # without defer: fine, and enabling runs no parametrization
    for (name, a), b in zip(
        layer.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: parametrize.register_parametrization(m, "weight", nn.Identity()),
        lambda m: parametrizations.weight_norm(m),
        lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
    ],
    ids=["register_parametrization", "weight_norm", "prune"],
)
def test_computed_weight_added_after_defer_is_refused_at_the_next_forward(change):
    """The guard follows the layer, not the Parameter it saw when enabled: with a computed
    weight, .grad is another tensor's (pruning's weight_orig gets G·mask), so precondition_
    could not be exact and an optimizer step would see a plain gradient."""
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3), defer=True)
    change(layer)
    with pytest.raises(RuntimeError, match="defer=False"):
        layer(torch.randn(2, 3, 6, 6))


def test_complex_weights_are_refused():
    with pytest.raises(TypeError, match="real weights"):
        trainact.TrAct(nn.Linear(3, 2, dtype=torch.complex64))


def test_del_model_frees_it_without_the_cycle_collector():
    model = regression_model()
    trainact.apply(model)
    regression_loss(model, *regression_batches()[0]).backward()
    ref = weakref.ref(model[0])
    gc.collect()  # unrelated garbage of earlier tests
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_data_parallel_replicas_are_refused():
    """nn.DataParallel runs replicas made by _replicate_for_data_parallel (it needs several GPUs
    to do so; the replica itself is made here the same way)."""
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3))
    replica = layer._replicate_for_data_parallel()
    replica._parameters["weight"] = layer.weight  # as replicate() assigns the broadcast copy
    replica._parameters["bias"] = layer.bias
    with pytest.raises(RuntimeError, match="DataParallel"):
        replica(torch.randn(2, 3, 6, 6))


def test_torch_export_refuses_training_mode_and_exports_eval_mode():
    model = regression_model().float()
    trainact.apply(model)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(Exception, match="torch.export"):
        torch.export.export(model, (x,))
    exported = torch.export.export(model.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_lazy_layers_are_refused_until_initialized():
    """A lazy layer swaps its own class at the first forward, which would drop TrAct's."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Tanh())
    with pytest.raises(RuntimeError, match="lazy"):
        trainact.apply(model)
    model(torch.randn(1, 3, 6, 6))
    assert trainact.apply(model) == "0"


def test_fx_tracing_keeps_the_tract_layer_whole():
    """torch.fx (feature extractors, quantization) keeps torch.nn layers as call_module leaves;
    the TrAct class must stay one, so a traced model still preconditions."""
    model = regression_model()
    trainact.apply(model)
    traced = torch.fx.symbolic_trace(model)
    assert "0" in [n.target for n in traced.graph.nodes if n.op == "call_module"]
    x, y = regression_batches()[0]
    regression_loss(traced, x, y).backward()
    plain = trainact.remove(regression_model())
    regression_loss(plain, x, y).backward()
    assert not torch.allclose(traced.get_submodule("0").weight.grad, plain[0].weight.grad)


def test_remove_parametrizations_after_tract_keeps_tract():
    layer = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    trainact.TrAct(layer)
    parametrize.remove_parametrizations(layer, "weight")
    assert trainact.is_enabled(layer) and isinstance(layer.weight, nn.Parameter)
    trainact.remove(layer)
    assert type(layer) is nn.Conv2d


def test_reenable_after_remove_under_a_later_parametrization():
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3))
    parametrizations.weight_norm(layer)  # parametrize subclasses the TrAct class
    trainact.remove(layer)
    layer(torch.randn(1, 3, 6, 6))  # plain again
    parametrize.remove_parametrizations(layer, "weight")
    trainact.TrAct(layer)  # the TrAct class left behind is reused, not refused
    assert trainact.is_enabled(layer)
