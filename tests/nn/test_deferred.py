"""Deferred statistics (trainact/nn/deferred.py): they follow their gradient's content, not the
tensor object that holds it, and do not travel with copies of the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import trainact
from testing.harness import regression_batches, regression_loss, regression_model
from trainact.nn import deferred


def test_deepcopy_with_pending_statistics_starts_clean():
    """An EMA copy taken mid-accumulation must not inherit the original's pending sums (it raised
    a false missed-precondition error)."""
    model = regression_model()
    trainact.apply(model, defer=True)
    regression_loss(model, *regression_batches()[0]).backward()
    ema = copy.deepcopy(model)
    assert not deferred.has_pending(ema[0])
    opt = torch.optim.SGD(ema.parameters(), lr=0.1)
    regression_loss(ema, *regression_batches()[0]).backward()
    trainact.precondition_(ema)
    opt.step()
    trainact.precondition_(model)


def test_pickle_drops_pending_statistics():
    model = regression_model()
    trainact.apply(model, defer=True)
    regression_loss(model, *regression_batches()[0]).backward()
    copied = pickle.loads(pickle.dumps(model))
    assert trainact.is_enabled(copied) and not deferred.has_pending(copied[0])


def _moved(grad: torch.Tensor) -> torch.Tensor:
    """What DDP's gradient_as_bucket_view does between passes: the values, in another tensor."""
    return grad.clone()


@pytest.mark.parametrize(
    ("between", "kept"),
    [
        (_moved, True),
        (lambda grad: torch.zeros_like(grad), False),  # a fresh zero gradient: cleared
        (lambda grad: None, False),
    ],
    ids=["moved to another tensor", "replaced by zeros", "set to None"],
)
def test_a_cleared_gradient_is_read_from_its_values(between, kept):
    """Two micro-batches with weight.grad replaced between them: moved with its values (DDP's
    bucket views, FSDP2's sharded parameter), both micro-batches count (the big batch; the
    statistics used to follow the tensor object and drop the first); cleared, only the second."""
    first, second = regression_batches()
    model = regression_model()
    trainact.apply(model, defer=True)
    regression_loss(model, *first, k=2).backward()
    for p in model.parameters():
        p.grad = between(p.grad)
    regression_loss(model, *second, k=2).backward()
    assert trainact.precondition_(model) == 1

    reference = regression_model()
    trainact.apply(reference)
    if kept:
        x, y = (torch.cat(parts) for parts in zip(first, second, strict=True))
        regression_loss(reference, x, y).backward()
    else:
        regression_loss(reference, *second, k=2).backward()
    torch.testing.assert_close(
        model[0].weight.grad, reference[0].weight.grad, rtol=1e-10, atol=1e-13
    )
