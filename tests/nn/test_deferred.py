"""Deferred statistics (trainact/nn/deferred.py) do not travel with copies of the model."""

from __future__ import annotations

import copy
import pickle

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
