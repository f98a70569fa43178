"""Class-weighted BCE with logits whose class weights follow an exponential moving average.

Upstream (DESIGN 4): per-pixel BCE with logits, averaged per class, then summed with class
weights. The weights start as the normalised inverse pixel counts of a random sample of training
targets and, during training, follow an exponential moving average over batches:

    w <- alpha * w + (1 - alpha) * w_batch

where ``w_batch = initial_class_weights(target of the batch)``. The update happens *before* the
batch's loss is computed (the batch's own pixel counts already count), and only when
``forward(..., update=True)`` (training batches); validation batches use the weights as they are.
Both ``w`` and ``w_batch`` sum to 1, so ``w`` always sums to 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

EMPTY_CLASS_WEIGHT = 1e-12  # inverse count given to a class with no pixels, before normalising


def initial_class_weights(targets: torch.Tensor) -> torch.Tensor:
    """Normalised inverse pixel counts of each class.

    targets: (N, 3, H, W) one-hot masks (any float or integer dtype, values 0/1).
    Returns float32 (3,) on the targets' device, summing to 1. A class with no pixels gets
    ``EMPTY_CLASS_WEIGHT`` instead of 1/0 before normalising.
    """
    counts = targets.sum(dim=(0, 2, 3), dtype=torch.float64)
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0),
                          torch.full_like(counts, EMPTY_CLASS_WEIGHT))
    return (inverse / inverse.sum()).to(torch.float32)


class WeightedBCELoss(nn.Module):
    """sum_c w_c * mean_{n,h,w} BCEWithLogits(logits[n,c,h,w], target[n,c,h,w]).

    The weights are a buffer, so they travel with ``.to(device)`` and ``state_dict()`` (the
    checkpoint keeps them). All work stays on the device: no host synchronisation per batch.
    """

    def __init__(self, initial_weights: torch.Tensor, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {alpha}")
        self.alpha = float(alpha)
        self.register_buffer("weights", initial_weights.detach().to(torch.float32).clone())

    def forward(self, logits: torch.Tensor, target: torch.Tensor, update: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits, target: (N, C, H, W). Returns (loss: float32 scalar, per_class_bce: (C,)).

        ``per_class_bce`` is detached (it is for metrics); ``loss`` carries the gradient. With
        ``update=True`` the EMA step of the module docstring is applied first.
        """
        # BCE in float32 even under autocast: float16 logs of tiny probabilities underflow.
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        per_class = bce.mean(dim=(0, 2, 3))
        if update:
            with torch.no_grad():
                batch_weights = initial_class_weights(target)
                self.weights.mul_(self.alpha).add_((1.0 - self.alpha) * batch_weights)
        loss = (self.weights * per_class).sum()
        return loss, per_class.detach()
