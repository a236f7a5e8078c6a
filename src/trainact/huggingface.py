"""Hugging Face Trainer: TrAct on the model's first layer, preconditioned before clipping.

    >>> from trainact.huggingface import TrActTrainer
    >>> trainer = TrActTrainer(model=model, args=args, train_dataset=train,  # doctest: +SKIP
    ...                        tract_layer="vit.embeddings.patch_embeddings.projection")
    >>> trainer.train()  # doctest: +SKIP

The Trainer clips gradients (``max_grad_norm``) before it calls any callback's
``on_pre_optimizer_step``, so a callback would precondition clipped gradients. The
preconditioning therefore lives in ``training_step``, the Trainer's documented override point:
after the backward of the step's last micro-batch and before clipping. ``import trainact`` itself
never imports transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import trainact
from trainact import wording
from trainact.nn.compat import torch_version

if torch_version() < (2, 6):
    raise ImportError(
        f"trainact.huggingface needs torch>=2.6 (transformers 5 does); this is torch "
        f"{torch.__version__}"
    )
try:
    from transformers import Trainer
    from transformers.utils import logging as hf_logging
except ImportError as err:
    raise ImportError("trainact.huggingface needs transformers: pip install transformers") from err

__all__ = ["TrActMixin", "TrActTrainer"]

# The Trainer's own logger: the line saying where TrAct runs shows where the Trainer's do
# (``log_level="info"``, or ``transformers.logging.set_verbosity_info()``)
logger = hf_logging.get_logger("transformers.trainer")

#: apply()'s keywords in the mixin's words, for its errors
_KEYWORDS = {
    "layer=": "tract_layer=",
    "example_inputs": "tract_example_inputs",
    "lam": "tract_lam",
    "statistics_dtype": "tract_statistics_dtype",
}

# The mixin's base for the type checker: the Trainer whose methods it extends (at run time the
# mixin has no base of its own, so that it goes before any Trainer subclass).
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class TrActMixin(_TrainerBase):
    """TrAct for a ``transformers.Trainer`` or any subclass of it: ``class MyTrainer(TrActMixin,
    Seq2SeqTrainer)``. Its constructor takes the Trainer's arguments plus:

    Args:
        tract_lam: λ > 0 (the paper's default 0.1).
        tract_layer: dotted name of the layer in the model (e.g.
            ``"vit.embeddings.patch_embeddings.projection"``); None finds the first layer
            (:func:`trainact.apply`).
        tract_example_inputs: with ``tract_layer=None``, one input batch for finding the first
            layer by a forward run, e.g. ``{"pixel_values": images}``, on the device the
            model is on when passed in (torch.fx cannot trace most Hugging Face models).
        tract_statistics_dtype: as ``statistics_dtype`` of :func:`trainact.apply`.

    TrAct is enabled with deferred statistics (``defer=True``): the micro-batches of a step
    (``gradient_accumulation_steps``) sum their XᵀX and n, and :func:`trainact.precondition_`
    runs once after the last one's backward, before ``max_grad_norm`` clipping and the
    optimizer step. k micro-batches of B then train exactly like one batch of k·B. A model
    from ``model_init`` is enabled each time it is built. TrAct adds nothing to the
    ``state_dict``, so checkpoints and ``resume_from_checkpoint`` are the plain model's.

    Raises:
        RuntimeError: TrAct is already enabled on the model (the mixin enables it itself).
        NotImplementedError: DeepSpeed, which keeps gradients out of ``param.grad``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *args: Any,
        tract_lam: float = 0.1,
        tract_layer: str | None = None,
        tract_example_inputs: Any = None,
        tract_statistics_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        self.tract_lam, self.tract_layer = tract_lam, tract_layer
        self.tract_statistics_dtype = tract_statistics_dtype
        self.tract_example_inputs = tract_example_inputs
        self._tract_reported = False  # the summary is logged at the first training step
        if model is not None:  # before the Trainer moves it: still where the user built it
            self._enable_tract(model)  # (with model_init, call_model_init enables TrAct)
        super().__init__(model, *args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "TrAct with DeepSpeed: DeepSpeed keeps gradients in its own buffers, out of "
                "reach of trainact.precondition_"
            )

    def call_model_init(self, trial: Any = None) -> nn.Module:
        return self._enable_tract(super().call_model_init(trial))

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss: torch.Tensor = super().training_step(model, inputs, num_items_in_batch)
        if not self._tract_reported and self.model is not None:  # on its device now
            self._tract_reported = True
            logger.info(trainact.summary(self.model))
        if self.accelerator.sync_gradients:  # the last micro-batch: clipping and a step follow
            trainact.precondition_(model)
        return loss

    def _enable_tract(self, model: nn.Module) -> nn.Module:
        if trainact.is_enabled(model):
            names = [name for name, _ in trainact.enabled_layers(model)]
            raise RuntimeError(
                f"TrAct is already enabled on {names} of {type(model).__name__}; the Trainer "
                "enables it itself (tract_lam=, tract_layer=): call trainact.remove(model) first"
            )
        with wording.keywords(_KEYWORDS):
            trainact.apply(
                model,
                self.tract_lam,
                layer=self.tract_layer,
                statistics_dtype=self.tract_statistics_dtype,
                defer=True,
                example_inputs=self.tract_example_inputs,
            )
        self._tract_reported = False
        return model


class TrActTrainer(TrActMixin, Trainer):
    """``transformers.Trainer`` with TrAct; see :class:`TrActMixin` for the extra arguments."""
