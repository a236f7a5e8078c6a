"""TrAct inside a layer's forward: an identity on the weight whose backward preconditions.

The layer's own kernels still compute the forward, the input and bias gradients and the plain
weight gradient G; :class:`PreconditionWeight` sits between the parameter and the layer, so
autograd hands it exactly the G of this call and pairs it with this call's input statistics
(several calls per step, checkpoint recomputation and torch.compile all keep that pairing).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainact import distributed
from trainact.maths import (
    gram_of_chunks,
    patch_matrix,
    precondition_with_gram,
    precondition_with_patches,
)
from trainact.nn.adapters import Adapter, adapter_for


def statistics_dtype(weight: Tensor) -> torch.dtype:
    """At least float32; float64 layers keep float64."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def unpack_gram(stats: Tensor, groups: int, dim: int) -> tuple[Tensor, Tensor]:
    """Packed statistics ``[XᵀX (groups·d·d), n]`` as (XᵀX, n): one tensor, one all-reduce."""
    return stats[:-1].view(groups, dim, dim), stats[-1]


class PreconditionWeight(torch.autograd.Function):
    """Identity on the weight in forward; in backward, G becomes G·(XᵀX/n + λI)⁻¹ per group.

    ``stats`` is either the packed Gram statistics or, where n < d, the patch matrix itself.
    With ``owner.defer`` the statistics are handed to ``owner`` and G passes through unchanged.
    """

    @staticmethod
    def forward(ctx, weight, stats, owner, work, use_patches):  # noqa: D102
        # Kept on ctx, not saved: non-reentrant checkpointing would otherwise hand backward the
        # recomputed statistics, whose all-reduce is not the ``work`` waited on below.
        ctx.stats, ctx.owner, ctx.work, ctx.use_patches = stats, owner, work, use_patches
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        stats, owner = ctx.stats, ctx.owner
        if ctx.work is not None:
            ctx.work.wait()  # the all-reduce started in forward, overlapped with the step
        if owner.defer:
            owner.accumulate(stats)
            return grad, None, None, None, None
        groups, dim = owner.adapter.groups, owner.adapter.dim
        grouped = grad.reshape(groups, -1, dim)
        if ctx.use_patches:
            out = precondition_with_patches(grouped, stats, owner.lam)
        else:
            gram, count = unpack_gram(stats, groups, dim)
            out = precondition_with_gram(grouped, gram, count, owner.lam)
        return out.reshape(grad.shape), None, None, None, None


class TrActForward:
    """A layer's forward with TrAct, kept on the layer as its ``forward`` attribute.

    A plain callable object (not a closure) so that ``copy.deepcopy``, pickling and
    ``torch.save(model)`` carry it along; deleting the attribute restores the class's forward.
    It holds no tensors in the module's state: ``state_dict()`` is unchanged, and DDP, which
    broadcasts buffers, never overwrites deferred statistics.
    """

    def __init__(
        self,
        layer: nn.Module,
        lam: float,
        process_group: distributed.ProcessGroupArg,
        defer: bool,
    ) -> None:
        self.layer = layer
        self.adapter: Adapter = adapter_for(layer)
        self.lam = lam
        self.process_group = process_group
        self.defer = defer
        self.pending: Tensor | None = None  # deferred statistics, summed over backward passes
        # (parameter, its version) once the backward that gathered them has finished
        self.pending_version: tuple[Tensor, int] | None = None

    def __call__(self, input: Tensor) -> Tensor:
        layer, weight = self.layer, self.layer.weight
        if not (layer.training and torch.is_grad_enabled() and weight.requires_grad):
            return self.adapter.forward(input, weight)  # eval, no_grad, frozen: no extra work
        if self.defer or distributed.resolve(self.process_group) is not None:
            return self._eager_forward(input, weight)
        return self._preconditioned_forward(input, weight)

    @torch.compiler.disable
    def _eager_forward(self, input: Tensor, weight: Tensor) -> Tensor:
        """Deferred sums (Python state) and asynchronous collectives (Work handles) do not
        trace: under torch.compile this layer then runs eagerly, the rest stays compiled."""
        if self.defer:
            self._refuse_missed_precondition()
        return self._preconditioned_forward(input, weight)

    def _preconditioned_forward(self, input: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(input.device.type, enabled=False):
            stats, work, use_patches = self._statistics(input.detach(), weight)
        routed = PreconditionWeight.apply(weight, stats, self, work, use_patches)
        return self.adapter.forward(input, routed)

    def _statistics(self, x: Tensor, weight: Tensor) -> tuple[Tensor, object, bool]:
        """This call's statistics, and the all-reduce that sums them when distributed."""
        adapter, dtype = self.adapter, statistics_dtype(weight)
        n, groups, dim = adapter.num_patches(x), adapter.groups, adapter.dim
        group = None if self.defer else distributed.resolve(self.process_group)
        if group is None and not self.defer and 0 < n < dim:
            return patch_matrix(adapter.chunks(x, dtype), dtype), None, True
        stats = torch.zeros(groups * dim * dim + 1, dtype=dtype, device=x.device)
        gram, count = unpack_gram(stats, groups, dim)
        gram_of_chunks(adapter.chunks(x, dtype), gram)
        count.fill_(n)
        work = None if group is None else distributed.all_reduce_async(stats, group)
        return stats, work, False

    def accumulate(self, stats: Tensor) -> None:
        """Add one backward pass's statistics to the deferred sum (``defer=True``)."""
        self.pending = stats.clone() if self.pending is None else self.pending.add_(stats)
        torch.autograd.Variable._execution_engine.queue_callback(self._record_weight_version)

    def _record_weight_version(self) -> None:
        """At the end of backward, when FSDP2 has put the sharded parameter back on the layer:
        its version is the one an optimizer step bumps (the unsharded one's never changes)."""
        weight = self.layer.weight
        self.pending_version = (weight, weight._version)

    def _refuse_missed_precondition(self) -> None:
        if self.pending is None or self.pending_version is None:
            return
        weight, version = self.pending_version
        if weight._version != version:
            raise RuntimeError(
                f"TrAct (defer=True) on {type(self.layer).__name__}: the weight changed while "
                "accumulated statistics were pending, so an optimizer step ran on a gradient "
                "that trainact.precondition_(model) never preconditioned. Call it after the "
                "last backward of each step, before clipping and optimizer.step() "
                "(or use trainact.precondition_on_step)."
            )

    def __repr__(self) -> str:
        return f"TrActForward(lam={self.lam}, defer={self.defer})"
