"""trainact: TrAct (Training Activations; Petersen, Borgelt, Ermon, NeurIPS 2024) for PyTorch.

The first layer's weight gradient G becomes G·(XᵀX/n + λI)⁻¹, with X the layer's input patches:
a gradient step on the layer's activations, mapped back to the weights in closed form.

    >>> import torch, trainact
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU())
    >>> trainact.apply(model, lam=0.1)
    '0'
"""

from trainact.api import (
    TrAct,
    apply,
    enabled_layers,
    is_enabled,
    precondition_,
    precondition_on_step,
    remove,
    summary,
)

__all__ = [
    "TrAct",
    "apply",
    "enabled_layers",
    "is_enabled",
    "precondition_",
    "precondition_on_step",
    "remove",
    "summary",
]
__version__ = "0.2.0"
