"""The public verbs: invariants of an enabled model, discovery of the first layer, bad input."""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle

import pytest
import torch
from torch import nn

import trainact
from trainact.nn import compat


class Net(nn.Module):
    """Registration order differs from forward order: the head is registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.stem(x))).flatten(1))


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_apply_finds_the_first_layer_in_forward_order():
    model = Net()
    assert trainact.apply(model) == "stem"
    assert trainact.is_enabled(model) and trainact.is_enabled(model.stem)
    assert not trainact.is_enabled(model.head)
    assert [n for n, _ in trainact.enabled_layers(model)] == ["stem"]


def test_apply_named_layer_and_the_model_itself():
    model = Net()
    assert trainact.apply(model, 0.5, layer="head") == "head"
    assert trainact.nn.state.state_of(model.head).lam == 0.5
    layer = nn.Linear(3, 2)
    assert trainact.apply(layer) == ""
    assert trainact.is_enabled(layer)


def test_tract_returns_the_same_layer_and_changes_only_the_weight_gradient():
    torch.manual_seed(0)
    model = Net()
    plain = copy.deepcopy(model)
    conv = model.stem
    assert trainact.TrAct(model.stem, l=0.1) is conv
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    assert torch.equal(model(x), plain(x))
    tract_grads, plain_grads = _step(model, x), _step(plain, x)
    for name in ("stem.bias", "head.weight", "head.bias"):
        assert torch.equal(tract_grads[name], plain_grads[name])
    assert not torch.allclose(tract_grads["stem.weight"], plain_grads["stem.weight"])


def test_state_dict_is_unchanged_and_checkpoints_move_both_ways():
    torch.manual_seed(0)
    plain = Net()
    model = copy.deepcopy(plain)
    trainact.apply(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = Net()
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))
    fresh_tract = trainact.apply(Net()) and None
    target = Net()
    trainact.apply(target)
    target.load_state_dict(plain.state_dict())
    assert fresh_tract is None and torch.equal(target(x), plain(x))


@pytest.mark.parametrize(
    "clone",
    [
        copy.deepcopy,
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: (lambda b: (torch.save(m, b), b.seek(0), torch.load(b, weights_only=False))[2])(
            io.BytesIO()
        ),
    ],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_copies_keep_tract_and_are_independent(clone):
    torch.manual_seed(0)
    model = Net()
    trainact.apply(model, 0.2)
    copied = clone(model)
    assert trainact.is_enabled(copied.stem)
    assert trainact.nn.state.state_of(copied.stem) is not trainact.nn.state.state_of(model.stem)
    assert type(copied.stem) is type(model.stem)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(_step(copied, x), _step(model, x), rtol=0, atol=0)


def test_remove_restores_the_plain_layer():
    torch.manual_seed(0)
    model, plain = Net(), None
    plain = copy.deepcopy(model)
    weight = model.stem.weight
    trainact.apply(model)
    assert trainact.remove(model) is model
    assert not trainact.is_enabled(model)
    assert type(model.stem) is nn.Conv2d and "trainact_state" not in model.stem.__dict__
    assert model.stem.weight is weight
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_step(model, x), _step(plain, x), rtol=0, atol=0)


def test_enabling_twice_is_refused_and_never_preconditions_twice():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    reference = trainact.TrAct(copy.deepcopy(layer))
    trainact.TrAct(layer)
    with pytest.raises(RuntimeError, match="already enabled"):
        trainact.TrAct(layer, l=0.2)
    with pytest.raises(RuntimeError, match="already enabled"):
        trainact.apply(layer)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()
    reference(x).sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)


def test_eval_no_grad_and_frozen_weights_do_no_covariance_work(monkeypatch):
    calls = []
    original = trainact.nn.layer.call_statistics
    monkeypatch.setattr(
        trainact.nn.layer, "call_statistics", lambda *a: calls.append(1) or original(*a)
    )
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3))
    x = torch.randn(20, 3, 6, 6)  # n > d: the Gram path
    layer(x)
    assert len(calls) == 1
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.weight.requires_grad_(False)
    layer(x.requires_grad_(True)).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "module", [nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(3), nn.Bilinear(2, 2, 2)]
)
def test_unsupported_module_is_a_type_error_naming_it(module):
    with pytest.raises(TypeError, match=type(module).__name__) as info:
        trainact.TrAct(module)
    assert "nn.Conv2d" in str(info.value) and "nn.Linear" in str(info.value)


def test_subclass_with_its_own_forward_is_refused():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    with pytest.raises(TypeError, match="StdConv"):
        trainact.TrAct(StdConv(3, 4, 3))

    class Tagged(nn.Conv2d):  # keeps the parent's forward: accepted
        pass

    assert trainact.is_enabled(trainact.TrAct(Tagged(3, 4, 3)))


@pytest.mark.parametrize("lam", [0, -0.1, math.inf, math.nan, True, "0.1", None])
def test_bad_lambda_is_a_value_error(lam):
    with pytest.raises(ValueError, match="lam"):
        trainact.TrAct(nn.Linear(2, 2), l=lam)
    with pytest.raises(ValueError, match="lam"):
        trainact.apply(nn.Linear(2, 2), lam)


def test_bad_process_group_is_a_value_error():
    with pytest.raises(ValueError, match="process_group"):
        trainact.apply(nn.Linear(2, 2), process_group="world")


def test_model_without_eligible_layer():
    with pytest.raises(ValueError, match="no layer TrAct supports"):
        trainact.apply(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_unknown_layer_name():
    with pytest.raises(ValueError, match="'nope'"):
        trainact.apply(Net(), layer="nope")


def test_two_first_layers_cannot_be_decided():
    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 5, padding=1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(ValueError, match="several") as info:
        trainact.apply(TwoStems())
    assert "a" in str(info.value) and "b" in str(info.value)
    assert trainact.apply(TwoStems(), layer="b") == "b"


def test_untraceable_model_lists_candidates():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.head(self.stem(x).mean((2, 3)))

    with pytest.raises(ValueError, match="stem, head"):
        trainact.apply(Branchy())


def test_vit_style_model_finds_the_patch_embedding():
    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.zeros(1, 1, 16))
            self.blocks = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
            return self.head(self.blocks(t)[:, 0])

    assert trainact.apply(TinyViT()) == "patch"


# ---- where TrAct runs: the log line and the summary -------------------------------------------


def _first_call_lines(caplog: pytest.LogCaptureFixture, lam: float) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "trainact"
        and r.getMessage().startswith("TrAct on")
        and f"={lam:g}," in r.getMessage()
    ]


@pytest.mark.parametrize("batch", [2, 64], ids=["n×n form", "d×d form"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_first_training_call_logs_one_line_naming_layer_lambda_deferral_and_precision(
    caplog, batch, compiled
):
    """Once per layer, eagerly and under torch.compile(fullgraph=True), in both forms (n = 2
    patches against d = 192 takes the n×n form)."""
    if compiled and compat.torch_version() < compat.MINIMUM_TORCH["torch.compile"][0]:
        pytest.skip("torch.compile of a TrAct layer needs torch>=2.8")
    lam = 0.0123 + 0.001 * batch + 0.0001 * compiled  # a line of its own for each case
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    assert trainact.apply(model, lam=lam) == "1"
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    with caplog.at_level(logging.INFO, logger="trainact"):
        for _ in range(3):
            run(torch.randn(batch, 3, 8, 8)).sum().backward()
    (line,) = _first_call_lines(caplog, lam)
    assert line.startswith(
        f"TrAct on 1 (Linear): lambda={lam:g}, applied in backward, world size 1;"
    )
    assert "cpu: float32 product" in line and "n×n form for n < d" in line


def test_summary_names_every_enabled_layer_and_how():
    model = Net()
    assert trainact.summary(model) == "TrAct is enabled on no layer of Net"
    trainact.apply(model, lam=0.2, defer=True)
    trainact.TrAct(model.head, l=0.5, statistics_dtype=torch.float32)
    lines = trainact.summary(model).splitlines()
    assert lines[0].startswith(
        "TrAct on head (Linear): lambda=0.5, applied in backward, world size 1"
    )
    assert "split float32 product" in lines[0]
    assert lines[1].startswith("TrAct on stem (Conv2d): lambda=0.2, deferred to precondition_,")
    assert "cpu: float32 product of centered patches" in lines[1]
    model.stem.weight.requires_grad_(False)
    assert trainact.summary(model).splitlines()[1].endswith("(frozen: nothing to do)")


# ---- torch versions ---------------------------------------------------------------------------


def test_torch_compile_below_its_minimum_raises_naming_the_version(monkeypatch):
    """Below torch 2.8 (here: this torch, made to say 2.7) compiling a TrAct layer raises an
    error that names torch.compile and the version it needs."""
    monkeypatch.setattr(compat, "torch_version", lambda: (2, 7))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    trainact.apply(model)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(Exception, match=r"torch.compile of a layer with TrAct needs torch>=2\.8"):
        compiled(torch.randn(2, 3, 6, 6))


def test_fsdp2_gradients_below_its_minimum_raise_naming_the_version(monkeypatch):
    """A sharded (DTensor) gradient at precondition_ below torch 2.7 raises naming FSDP2."""
    pytest.importorskip("torch.distributed.tensor")
    monkeypatch.setattr(compat, "torch_version", lambda: (2, 6))
    monkeypatch.setattr(trainact.distributed, "is_dtensor", lambda tensor: True)
    layer = trainact.TrAct(nn.Linear(4, 2), defer=True)
    layer(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"FSDP2 of a layer with TrAct needs torch>=2\.7"):
        trainact.precondition_(layer)


# ---- the random stream ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fx", "example_inputs", "layer"])
def test_apply_draws_nothing_from_the_global_generator(how):
    """Enabling TrAct, discovery included, leaves torch's global random stream where it was (the
    reference implementation draws from it when it builds its layer)."""
    model = Net()
    inputs = torch.zeros(2, 3, 8, 8) if how == "example_inputs" else None
    before = torch.get_rng_state()
    trainact.apply(model, layer="stem" if how == "layer" else None, example_inputs=inputs)
    assert torch.equal(torch.get_rng_state(), before)
