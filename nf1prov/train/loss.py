"""Class-weighted BCE with logits whose class weights follow an exponential moving average.

Upstream (DESIGN 4): per-pixel BCE with logits, averaged per class, then summed with class
weights. The weights start as the normalised inverse pixel counts of a random sample of training
targets and, during training, follow an exponential moving average over batches:

    w <- alpha * w + (1 - alpha) * w_batch

where ``w_batch = initial_class_weights(target of the batch)``. The update happens *before* the
batch's loss is computed (the batch's own pixel counts already count), and only when
``forward(..., update=True)`` (training batches); validation batches use the weights as they are.
Both ``w`` and ``w_batch`` sum to 1, so ``w`` always sums to 1.

Data-parallel (``ranks``, `nf1prov.train.distributed`): each rank holds a shard of the global
batch. ``w_batch`` comes from the global batch's pixel counts and the returned loss has the
global batch's value; its gradient is this rank's share, scaled so that DDP's average over
ranks is the gradient of the global loss.
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
    return weights_from_counts(targets.sum(dim=(0, 2, 3), dtype=torch.float64))


def weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """`initial_class_weights` from per-class pixel counts (C,)."""
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0),
                          torch.full_like(counts, EMPTY_CLASS_WEIGHT))
    return (inverse / inverse.sum()).to(torch.float32)


class WeightedBCELoss(nn.Module):
    """sum_c w_c * mean_{n,h,w} BCEWithLogits(logits[n,c,h,w], target[n,c,h,w]).

    The weights are a buffer, so they travel with ``.to(device)`` and ``state_dict()`` (the
    checkpoint keeps them). All work stays on the device: no host synchronisation per batch.
    """

    def __init__(self, initial_weights: torch.Tensor, alpha: float, ranks=None) -> None:
        from nf1prov.train.distributed import SINGLE

        super().__init__()
        self.ranks = ranks if ranks is not None else SINGLE
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {alpha}")
        self.alpha = float(alpha)
        self.register_buffer("weights", initial_weights.detach().to(torch.float32).clone())

    @torch.no_grad()
    def _follow(self, counts: torch.Tensor) -> None:
        """The EMA step towards the weights of a batch with per-class pixel ``counts`` (C,)."""
        self.weights.mul_(self.alpha).add_((1.0 - self.alpha) * weights_from_counts(counts))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, update: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits, target: (N, C, H, W). Returns (loss: float32 scalar, per_class_bce: (C,)).

        ``per_class_bce`` is detached (it is for metrics; distributed: this rank's shard, 0 for
        an empty shard); ``loss`` carries the gradient. With ``update=True`` the EMA step of the
        module docstring is applied first.
        """
        ranks, dims = self.ranks, (0, 2, 3)
        # BCE in float32 even under autocast: float16 logs of tiny probabilities underflow.
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        if not ranks.distributed:
            if update:
                self._follow(target.sum(dim=dims, dtype=torch.float64))
            per_class = bce.mean(dim=dims)
            return (self.weights * per_class).sum(), per_class.detach()
        sums = bce.sum(dim=dims)
        pixels = bce.numel() // bce.shape[1]
        classes = sums.shape[0]
        with torch.no_grad():  # one all-reduce: BCE sums, pixels and (training) class counts
            local = [sums.detach().double(), sums.new_tensor([pixels], dtype=torch.float64)]
            if update:
                local.append(target.sum(dim=dims, dtype=torch.float64))
            totals = ranks.sum_(torch.cat(local))
            if update:
                self._follow(totals[classes + 1:])
            value = (self.weights * (totals[:classes] / totals[classes])).sum().float()
        share = (self.weights * sums).sum() * (ranks.world_size / float(totals[classes]))
        # the value of the global loss with the gradient of this rank's share
        loss = share + (value - share).detach()
        return loss, (sums / max(pixels, 1)).detach()
