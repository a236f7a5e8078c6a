"""The optimizer-step guard of deferred TrAct (trainact/nn/step_guard.py): the
missed-precondition check and ``precondition_on_step``, with fused, foreach, closure, LBFGS and
accelerate optimizers."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import trainact
from testing.harness import regression_batches, regression_loss, regression_model
from trainact.nn import deferred


def _big_batch_step(opt_fn) -> torch.Tensor:
    """One step on all micro-batches as one batch (TrAct not deferred): the exact answer."""
    model = regression_model()
    trainact.apply(model)
    opt = opt_fn(model.parameters())
    x = torch.cat([b[0] for b in regression_batches()])
    y = torch.cat([b[1] for b in regression_batches()])
    regression_loss(model, x, y).backward()
    opt.step()
    return model[0].weight.detach().clone()


@pytest.mark.parametrize(
    "opt_fn",
    [
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.1, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.1),
    ],
    ids=["adam-fused", "adamw-fused", "sgd-fused", "sgd-foreach", "adam"],
)
def test_step_without_precondition_raises_before_changing_weights(device64, opt_fn):
    """The guard sits at optimizer.step, so fused kernels (which do not bump the weight's
    version counter) are caught too."""
    model = regression_model(device64)
    trainact.apply(model, defer=True)
    opt = opt_fn(model.parameters())
    for x, y in regression_batches(device=device64):
        regression_loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="precondition_"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    trainact.precondition_(model)
    opt.step()  # now fine


def test_an_optimizer_of_other_parameters_is_not_blocked():
    model = regression_model()
    trainact.apply(model, defer=True)
    head_opt = torch.optim.SGD(model[3].parameters(), lr=0.1)
    regression_loss(model, *regression_batches()[0]).backward()
    head_opt.step()  # the first layer is not this optimizer's: no error
    trainact.precondition_(model)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_precondition_on_step_with_closure_is_exact():
    """step(closure) runs the backward inside step (LBFGS, Lightning): preconditioning must come
    after the closure, not in a plain pre-hook before it."""
    model = regression_model()
    trainact.apply(model, defer=True)
    opt = _sgd(model.parameters())
    trainact.precondition_on_step(opt, model)
    batches = regression_batches()
    regression_loss(model, *batches[0], k=2).backward()  # an earlier micro-batch, outside step

    def closure():
        loss = regression_loss(model, *batches[1], k=2)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(model[0].weight, _big_batch_step(_sgd), rtol=1e-12, atol=1e-12)


def _lbfgs_step(defer: bool, how: str = "") -> nn.Module:
    """One LBFGS step (3 evaluations of the closure) with TrAct; ``how`` finishes deferred
    statistics: "on_step" (precondition_on_step), "in_closure" (precondition_ after the
    closure's backward) or "before_step" (precondition_ before step(closure), too early)."""
    model = regression_model()
    trainact.apply(model, defer=defer)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    if how == "on_step":
        trainact.precondition_on_step(opt, model)
    x, y = regression_batches()[0]

    def closure():
        opt.zero_grad()
        loss = regression_loss(model, x, y)
        loss.backward()
        if how == "in_closure":
            trainact.precondition_(model)
        return loss

    if how == "before_step":
        trainact.precondition_(model)
    opt.step(closure)
    return model


@pytest.mark.parametrize("how", ["on_step", "in_closure"])
def test_lbfgs_with_defer_preconditions_each_evaluation_exactly(how):
    """LBFGS calls the closure several times per step: each evaluation's gradient is
    preconditioned with its own statistics, as without defer."""
    model = _lbfgs_step(True, how)
    assert not deferred.has_pending(model[0])
    expected = _lbfgs_step(False)[0].weight
    torch.testing.assert_close(model[0].weight, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["", "before_step"])
def test_step_closure_whose_backward_nobody_preconditions_raises(how):
    """defer=True with step(closure) and no precondition_ (or one before step, which comes
    before the closure's backward): refused at the first evaluation, naming the remedies (it
    used to train the stem plainly: exactly as the plain model)."""
    with pytest.raises(RuntimeError, match="inside the closure") as info:
        _lbfgs_step(True, how)
    assert "precondition_on_step" in str(info.value)


def test_precondition_on_step_unwraps_accelerate_and_can_be_removed():
    accelerate = pytest.importorskip("accelerate")
    model = regression_model()
    trainact.apply(model, defer=True)
    opt = accelerate.Accelerator(cpu=True).prepare_optimizer(_sgd(model.parameters()))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    handle = trainact.precondition_on_step(opt, model)
    for x, y in regression_batches():
        regression_loss(model, x, y, k=2).backward()
    opt.step()
    torch.testing.assert_close(model[0].weight, _big_batch_step(_sgd), rtol=1e-12, atol=1e-12)
    handle.remove()
    regression_loss(model, *regression_batches()[0]).backward()
    with pytest.raises(RuntimeError, match="precondition_"):
        opt.step()
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        trainact.precondition_on_step(object(), model)


def test_guard_checks_the_weight_not_the_bias():
    """Only the weight's gradient waits for precondition_: an optimizer of the bias may step."""
    model = regression_model()
    trainact.apply(model, defer=True)
    bias_opt = torch.optim.SGD([model[0].bias], lr=0.1)
    regression_loss(model, *regression_batches()[0]).backward()
    bias_opt.step()
    trainact.precondition_(model)


def test_precondition_on_step_does_not_keep_a_model_that_holds_its_optimizer():
    model = regression_model()
    trainact.apply(model, defer=True)
    model.optimizer = _sgd(model.parameters())
    trainact.precondition_on_step(model.optimizer, model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


class _SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as the widely used one-file implementation writes it:
    ``first_step`` moves the weights along the gradient, ``second_step`` restores them and
    steps a base optimizer with the gradient at the moved point; ``step(closure)`` does both."""

    def __init__(self, params, rho: float = 0.05, lr: float = 0.1) -> None:
        super().__init__(params, {"rho": rho, "lr": lr})
        self.base_optimizer = torch.optim.SGD(self.param_groups, lr=lr)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.stack([grad.norm() for grad in grads]).norm()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.detach().clone()
                    p.add_(p.grad * group["rho"] / (norm + 1e-12))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()


def _sam_steps(defer: bool, how: str) -> nn.Module:
    """Two SAM steps with TrAct. ``how``: "closure" (step(closure), precondition_ before it and
    inside the closure), "on_step" (step(closure) with precondition_on_step alone), "on_step+"
    (the same with precondition_ before step(closure)), "two_step" (first_step and
    second_step, precondition_ before second_step only) or "two_step+" (before each)."""
    model = regression_model()
    trainact.apply(model, defer=defer)
    opt = _SAM(model.parameters())
    if how.startswith("on_step"):
        trainact.precondition_on_step(opt, model)
    batches = regression_batches()

    def finish(early: bool) -> None:
        if defer and (how in ("closure", "two_step+") or (early and how == "on_step+")):
            trainact.precondition_(model)

    for x, y in batches:

        def closure(x=x, y=y):
            loss = regression_loss(model, x, y)
            loss.backward()
            if defer and how == "closure":
                trainact.precondition_(model)
            return loss

        regression_loss(model, x, y).backward()
        finish(early=True)
        if how.startswith("two_step"):
            opt.first_step(zero_grad=True)
            regression_loss(model, x, y).backward()
            if defer:
                trainact.precondition_(model)
            opt.second_step(zero_grad=True)
        else:
            opt.step(closure)
            opt.zero_grad()
    return model


@pytest.mark.parametrize("how", ["closure", "on_step+", "two_step+"])
def test_sam_with_defer_is_exact_when_each_gradient_is_preconditioned(how):
    """SAM uses two gradients per step: each preconditioned before it is used, deferred TrAct
    trains as without defer."""
    expected = _sam_steps(False, "closure")[0].weight
    torch.testing.assert_close(_sam_steps(True, how)[0].weight, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("how", ["on_step", "two_step"])
def test_sam_first_step_with_a_plain_gradient_raises(how):
    """SAM's first_step moves the weights with the gradient of a backward nobody
    preconditioned (precondition_on_step runs inside step, after first_step): it used to train
    0.2% off defer=False, silently; now the next backward refuses, naming the remedy."""
    with pytest.raises(RuntimeError, match="before first_step") as info:
        _sam_steps(True, how)
    assert "the weight was changed" in str(info.value)


def test_a_hand_written_update_of_a_plain_deferred_gradient_raises():
    """An update loop without torch.optim (which the step guard cannot see) that forgets
    precondition_ used to train the stem plainly; the next backward refuses."""
    model = regression_model()
    trainact.apply(model, defer=True)
    x, y = regression_batches()[0]
    regression_loss(model, x, y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    with pytest.raises(RuntimeError, match="hand-written update"):
        regression_loss(model, x, y).backward()


def test_a_discarded_backward_with_unchanged_weights_is_not_an_update():
    """A backward whose gradient is thrown away (an adversarial probe, a skipped step) leaves
    the weights as they were: no refusal, and the next step is exact."""
    model = regression_model()
    trainact.apply(model, defer=True)
    opt = _sgd(model.parameters())
    batches = regression_batches()
    regression_loss(model, *batches[0]).backward()
    opt.zero_grad()
    for x, y in batches:
        regression_loss(model, x, y, k=2).backward()
    trainact.precondition_(model)
    opt.step()
    torch.testing.assert_close(model[0].weight, _big_batch_step(_sgd), rtol=1e-12, atol=1e-12)
