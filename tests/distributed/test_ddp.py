"""TrAct across two real gloo processes: DDP, gradient accumulation and FSDP2 against one process.

All scenarios run once, in one spawned group (``conftest.py``), in float64, so that "the same
weights" can be asserted to 1e-12 while a change of statistics moves the weights by ~0.1.
"""

from __future__ import annotations

import pytest
from scenarios import EXACT

from trainact.nn import compat


def assert_matches_one_process(ranks: list[dict]) -> None:
    for measured in ranks:
        assert measured["diff"] < EXACT
        assert measured["spread"] == 0.0


@pytest.mark.parametrize("name", ["ddp_conv", "ddp_linear"])
def test_ddp_equals_one_big_batch(scenario, name: str) -> None:
    """Several SGD-with-momentum steps on 2×3 samples equal one process on the 6."""
    assert_matches_one_process(scenario(name))


@pytest.mark.parametrize("name", ["ddp_uneven_empty", "ddp_uneven_empty_linear"])
def test_uneven_and_empty_local_batches(scenario, name: str) -> None:
    """Local batches (5, 0), (1, 4), (0, 3), (2, 2): the global n, the empty rank included."""
    assert_matches_one_process(scenario(name))


def test_one_overlapped_all_reduce_per_layer_per_step(scenario) -> None:
    """One async all-reduce per call, started in backward when the call's output gradient
    arrives (so a forward without backward communicates nothing), waited where the gradient is
    preconditioned (after the layer's own backward kernels)."""
    for counts in scenario("ddp_conv"):
        assert counts["async_calls"] == counts["forwards"] == counts["steps"]
        assert counts["blocking_calls"] == 0
        assert counts["unwaited_after_forward"] == 0
        assert counts["waits"] == counts["async_calls"]


def test_process_group_none_keeps_per_rank_statistics(scenario) -> None:
    """None is the reference's behaviour: far from the big batch, equal to per-rank solves."""
    for measured in scenario("ddp_none"):
        assert measured["diff"] > 1e-3
        assert measured["async_calls"] == measured["blocking_calls"] == 0
    assert_matches_one_process(scenario("ddp_none_per_rank"))


def test_checkpoint_recomputation_uses_the_reduced_statistics(scenario) -> None:
    """Non-reentrant checkpointing recomputes the layer in backward; the recomputed call's own
    backward never runs, so it communicates nothing, and backward uses forward's statistics."""
    ranks = scenario("ddp_checkpoint")
    assert_matches_one_process(ranks)
    for counts in ranks:
        assert counts["async_calls"] == counts["waits"] == counts["forwards"]


def test_a_forward_without_backward_on_one_rank_communicates_nothing(scenario) -> None:
    """Rank 0 runs an extra training-mode forward each step (a logging pass through the
    unwrapped model): no collective for it (it used to hang or kill the group), exact steps."""
    ranks = scenario("ddp_extra_forward")
    assert_matches_one_process(ranks)
    for counts in ranks:
        assert counts["async_calls"] == counts["waits"] == counts["forwards"]


@pytest.mark.parametrize("name", ["ddp_two_views", "ddp_tied"])
def test_two_views_and_tied_weights_follow_the_single_process_rule(scenario, name: str) -> None:
    """Each call with its own statistics, summed over the ranks; a tied weight's other use
    plain: the same gradient as one process on the whole batch."""
    assert_matches_one_process(scenario(name))


@pytest.mark.parametrize(
    "name", ["ddp_defer_no_sync", "ddp_defer_no_sync_linear", "ddp_defer_on_step"]
)
def test_defer_no_sync_accumulation_equals_one_big_batch(scenario, name: str) -> None:
    """3 uneven micro-batches per rank (first two under no_sync), precondition_ once per step."""
    ranks = scenario(name)
    assert_matches_one_process(ranks)
    for counts in ranks:
        # None during forward and backward; one per step in precondition_, waited at once.
        assert counts["unwaited_after_forward"] == 0
        assert counts["async_calls"] == counts["waits"] == counts["steps"]
        assert counts["blocking_calls"] == 0
        assert counts["latest_work_held"]


#: FSDP2 fails inside torch on gloo up to 2.6 (trainact refuses it there)
needs_fsdp2 = pytest.mark.skipif(
    compat.torch_version() < compat.MINIMUM_TORCH["FSDP2"][0], reason="FSDP2 needs torch>=2.7"
)


@pytest.mark.parametrize(
    "name", ["ddp_missed_precondition", pytest.param("fsdp_missed_precondition", marks=needs_fsdp2)]
)
def test_step_without_precondition_raises(scenario, name: str) -> None:
    assert all(measured["raised"] for measured in scenario(name))


@needs_fsdp2
@pytest.mark.parametrize("name", ["fsdp", "fsdp_defer"])
def test_fsdp2_sharded_first_layer_equals_one_process(scenario, name: str) -> None:
    """fully_shard on the first layer (5 rows: shards of 3 and 2) and on the model."""
    assert_matches_one_process(scenario(name))


@pytest.mark.parametrize(
    "name",
    [
        "ddp_defer_bucket_view_synced",
        "ddp_defer_bucket_view_no_sync",
        "ddp_defer_bucket_view_static_graph",
    ],
)
def test_deferred_statistics_survive_ddp_bucket_views(scenario, name: str) -> None:
    """gradient_as_bucket_view=True replaces weight.grad by a view of DDP's bucket: not a
    clearing. Micro-batches that all synchronize, no_sync, static_graph: the big batch (the
    synchronized ones used to drop the earlier micro-batches' statistics, 5e-2 off)."""
    ranks = scenario(name)
    assert_matches_one_process(ranks)
    assert not any(measured["tract_warnings"] for measured in ranks)


@pytest.mark.parametrize(
    "name",
    [
        "ddp_defer_bucket_view_discarded",
        pytest.param("fsdp_defer_discarded", marks=needs_fsdp2),
        pytest.param("fsdp_defer_discarded_zeros", marks=needs_fsdp2),
    ],
)
def test_a_discarded_backward_leaves_nothing_under_bucket_views_and_fsdp2(scenario, name) -> None:
    """A probing backward whose gradient is cleared (zero_grad(), or zeroed in place) before the
    step's micro-batches: its statistics go with it, under DDP's bucket views and under FSDP2
    (where the gradient lives in the sharded parameter between passes), and no TrAct warning."""
    ranks = scenario(name)
    assert_matches_one_process(ranks)
    assert not any(measured["tract_warnings"] for measured in ranks)


def test_defer_with_a_weight_used_outside_the_layer_is_refused_on_every_rank(scenario) -> None:
    """A tied decoder (F.linear(h, encoder.weight.T)) with defer=True: refused at precondition_
    on both ranks, also on the rank whose first batch is empty (its share alone looks fine)."""
    for measured in scenario("ddp_defer_tied"):
        assert "encoder.weight" in measured["raised"] and "defer=False" in measured["raised"]


def test_ddp_join_is_refused_at_the_first_step_naming_tract(scenario) -> None:
    """join() cannot shadow TrAct's all-reduce (it used to hang or fail with "connection reset"):
    both ranks refuse at the first step with what to do; process_group=None trains under join."""
    for measured in scenario("ddp_join"):
        assert "TrAct" in measured["raised"] and "join()" in measured["raised"]
        assert "process_group=None" in measured["raised"]
    for measured in scenario("ddp_join_per_process_statistics"):
        assert measured["raised"] == ""


def test_clipping_before_precondition_warns_after_ddp_averaging(scenario) -> None:
    """precondition_on_step with clipping before optimizer.step(): the gradient DDP averaged was
    clipped before TrAct, and each rank warns once naming precondition_. precondition_ first,
    then clipping: no warning (DDP's averaging is not mistaken for a clip)."""
    for measured in scenario("ddp_defer_on_step_clipped"):
        assert len(measured["tract_warnings"]) == 1
        assert "trainact.precondition_(model)" in measured["tract_warnings"][0]
    for measured in scenario("ddp_defer_clipped_after"):
        assert measured["tract_warnings"] == []
