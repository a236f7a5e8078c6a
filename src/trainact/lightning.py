"""Lightning: a callback that trains a LightningModule's first layer with TrAct.

    >>> import lightning as L
    >>> from trainact.lightning import TrActCallback
    >>> trainer = L.Trainer(callbacks=[TrActCallback(lam=0.1)], accumulate_grad_batches=4)

Works with the Trainer of ``lightning.pytorch`` (the ``lightning`` package) and of the older
``pytorch_lightning`` package (the callback subclasses the first one installed; Lightning calls
callback hooks by name). ``import trainact`` itself never imports either.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

import trainact
from trainact import distributed, wording

try:
    import lightning.pytorch as pl
except ImportError:  # the package's older name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]  # the same API
    except ImportError as err:
        raise ImportError(
            "trainact.lightning needs Lightning: pip install lightning (or pytorch_lightning)"
        ) from err

__all__ = ["TrActCallback"]

logger = logging.getLogger("trainact")

#: apply()'s keywords in the callback's words, for its errors
_KEYWORDS = {
    "Pass example_inputs=": "Set the LightningModule's example_input_array = ",
    "example_inputs": "example_input_array",
    "layer=": "TrActCallback's layer=",
}


class TrActCallback(pl.Callback):
    """Enable TrAct on the LightningModule's first layer for the duration of ``trainer.fit``.

    - ``setup`` (stage "fit") enables it with :func:`trainact.apply`, or, for a module that
      builds its layers in ``configure_model()``, right after Lightning calls that hook; both
      run before Lightning wraps the model (DDP, ...) and before it restores a checkpoint
      (``fit(ckpt_path=...)``), which loads into the same layer: TrAct needs no state in the
      checkpoint, and the ``state_dict`` is the plain model's.
    - ``on_before_optimizer_step`` calls :func:`trainact.precondition_`: Lightning runs it after
      the last micro-batch's backward (and after AMP's unscaling) and before gradient clipping
      and ``optimizer.step()``.
    - ``teardown`` (stage "fit") removes TrAct: after ``fit`` the module is the plain model
      again, with the trained weights.

    With gradient accumulation (``accumulate_grad_batches > 1`` or a
    ``GradientAccumulationScheduler``) the layer always uses deferred statistics, summed over
    the micro-batches and applied once per optimizer step, so k micro-batches of B train
    exactly like one batch of k·B; per-micro-batch preconditioning would not. Manual
    optimization that accumulates by stepping every k batches needs ``defer=True``.

    Args:
        lam: λ > 0 (the paper's default 0.1).
        layer: dotted name within the LightningModule (e.g. ``"net.conv1"``); None finds the
            first layer (:func:`trainact.apply`): by one forward run on the module's
            ``example_input_array`` when it has one (a tensor, a tuple of positional
            arguments or a dict of keyword arguments, as Lightning defines it), else by
            tracing its ``forward`` with torch.fx.
        defer: use deferred statistics even without gradient accumulation.
        statistics_dtype: as for :func:`trainact.apply` (None: accurate at any input scale).
        process_group: as for :func:`trainact.apply`; the default sums statistics over all
            processes of a distributed run.

    Raises:
        RuntimeError (in setup): TrAct is already enabled on the module (remove it, or
            drop this callback). (on a training batch): accumulation was switched on without
            deferred statistics by something other than ``accumulate_grad_batches`` or a
            ``GradientAccumulationScheduler``; pass ``defer=True``.
    """

    def __init__(
        self,
        lam: float = 0.1,
        *,
        layer: str | None = None,
        defer: bool = False,
        statistics_dtype: torch.dtype | None = None,
        process_group: distributed.ProcessGroupArg = "auto",
    ) -> None:
        self.lam = lam
        self.statistics_dtype = statistics_dtype
        self.layer = layer
        self.defer = defer
        self.process_group = process_group
        self.layer_name: str | None = None  # the layer TrAct is enabled on during fit
        self._deferred = defer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainact.is_enabled(pl_module):
            names = [name for name, _ in trainact.enabled_layers(pl_module)]
            raise RuntimeError(
                f"TrAct is already enabled on {names} of {type(pl_module).__name__}; "
                "TrActCallback enables it itself: call trainact.remove(module) first"
            )
        hook = _builds_layers_later(pl_module)
        if hook is None:
            self._enable(trainer, pl_module)
            return
        # Lightning calls the hook after every callback's setup and before it wraps the model:
        # TrAct is enabled right after it, when the layers exist.
        configure = getattr(pl_module, hook)

        def configure_then_enable() -> None:
            configure()
            del pl_module.__dict__[hook]
            self._enable(trainer, pl_module)

        pl_module.__dict__[hook] = configure_then_enable

    def _enable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accumulates = trainer.accumulate_grad_batches > 1 or any(
            # (Lightning's callback connector sets trainer.callbacks; Trainer does not declare it)
            map(_schedules_accumulation, trainer.callbacks)  # type: ignore[attr-defined]
        )
        self._deferred = self.defer or accumulates
        with wording.keywords(_KEYWORDS):
            self.layer_name = trainact.apply(
                pl_module,
                self.lam,
                layer=self.layer,
                statistics_dtype=self.statistics_dtype,
                process_group=self.process_group,
                defer=self._deferred,
                example_inputs=pl_module.example_input_array if self.layer is None else None,
            )
        if accumulates and not self.defer:
            logger.info("TrAct statistics deferred to the optimizer step: gradients accumulate")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.accumulate_grad_batches > 1 and not self._deferred:
            raise RuntimeError(
                f"accumulate_grad_batches became {trainer.accumulate_grad_batches} during fit, "
                "but TrActCallback enabled TrAct without deferred statistics; each micro-batch "
                "would be preconditioned alone. Pass TrActCallback(defer=True)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's rank-zero log, beside its own lines: the model is on its device now
        pl.utilities.rank_zero_info(trainact.summary(pl_module))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        trainact.precondition_(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.layer_name is not None:
            layer: nn.Module = pl_module.get_submodule(self.layer_name)
            trainact.remove(layer)
            self.layer_name = None


def _builds_layers_later(pl_module: pl.LightningModule) -> str | None:
    """The hook in which the module builds its layers, after the callbacks' setup:
    ``configure_model`` (or the older ``configure_sharded_model``) where the module overrides
    it; None where its layers exist at setup."""
    for hook in ("configure_model", "configure_sharded_model"):
        for cls in type(pl_module).__mro__:  # (either package's LightningModule ends the search)
            if cls.__name__ == "LightningModule":
                break
            if hook in vars(cls):
                return hook
    return None


def _schedules_accumulation(callback: object) -> bool:
    """A GradientAccumulationScheduler of either package (or a subclass): matched by name, as
    ``lightning.pytorch`` and ``pytorch_lightning`` each define their own class."""
    return any(c.__name__ == "GradientAccumulationScheduler" for c in type(callback).__mro__)
