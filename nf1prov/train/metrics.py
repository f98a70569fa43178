"""Per-class segmentation metrics accumulated over an epoch (DESIGN 3.7 names).

A pixel is predicted positive for a class when sigmoid(logit) > 0.5, i.e. logit > 0. Over the
epoch we add up, per class c, on the device and without host synchronisation:

    tp_c   = #(pred & target)      pred_c = #pred      true_c = #target      bce_c = sum of BCE

and compute the scores once at the end (so they are epoch scores, not means of batch scores):

    dice_c = 2 tp / (pred + true)    iou_c = tp / (pred + true - tp)
    precision_c = tp / pred          recall_c = tp / true          bce_c = bce sum / pixels

A ratio whose denominator is 0 is 1.0: nothing was predicted and/or nothing was there, so no
pixel was wrong. ``_total`` scores pool all classes: the same formulas on tp, pred and true summed
over the three classes (a micro average over every (pixel, class) pair, so background dominates);
``bce_total`` is the mean BCE over every (pixel, class) pair, i.e. the mean of the per-class BCEs.
``<split>_loss`` is the mean of the batch losses weighted by batch size.
"""

from __future__ import annotations

import torch

from nf1prov.data.semantic import CLASS_NAMES

METRICS = ("dice", "iou", "bce", "precision", "recall")


def metric_names(split: str) -> list[str]:
    """Every name one epoch of ``split`` produces, e.g. ``val_dice_inner-cell``, ``val_loss``."""
    names = [f"{split}_{m}_{c}" for m in METRICS for c in (*CLASS_NAMES, "total")]
    return [*names, f"{split}_loss"]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    num, den = numerator.double(), denominator.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))


class EpochMetrics:
    """Sums for one split over one epoch. ``update`` per batch (device ops only), ``compute`` once.

    All sums are int64 counts or float64 BCE sums, so long epochs neither overflow nor lose
    precision, and the result does not depend on how the epoch was cut into batches (up to float
    rounding of the BCE sums).
    """

    def __init__(self, split: str, device: torch.device | str = "cpu",
                 num_classes: int = len(CLASS_NAMES)) -> None:
        self.split = split
        self.num_classes = num_classes
        zeros = {"dtype": torch.int64, "device": device}
        self.tp = torch.zeros(num_classes, **zeros)
        self.pred = torch.zeros(num_classes, **zeros)
        self.true = torch.zeros(num_classes, **zeros)
        self.pixels = torch.zeros((), **zeros)  # pixels per class (same for every class)
        self.bce = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = torch.zeros((), **zeros)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, per_class_bce: torch.Tensor,
               loss: torch.Tensor) -> None:
        """logits, target: (N, C, H, W) (already trimmed by the crop margin); per_class_bce: (C,)
        mean BCE of this batch per class; loss: scalar batch loss."""
        pred = logits > 0  # sigmoid(x) > 0.5
        true = target > 0.5
        n, _, h, w = logits.shape
        batch_pixels = n * h * w
        # A batch's counts in int32 (exact below 2**31 pixels per class; on the CPU the sum of
        # a bool tensor into int32 is several times faster than into int64), the epoch's int64.
        dims, count = (0, 2, 3), torch.int32 if batch_pixels < 2**31 else torch.int64
        self.tp += (pred & true).sum(dim=dims, dtype=count)
        self.pred += pred.sum(dim=dims, dtype=count)
        self.true += true.sum(dim=dims, dtype=count)
        self.pixels += batch_pixels
        self.bce += per_class_bce.double() * batch_pixels
        self.loss += loss.detach().double() * n
        self.samples += n

    def sum_across(self, ranks) -> None:
        """Add up the sums of every rank (`nf1prov.train.distributed.Ranks`) in place: one
        all-reduce, after which `compute` gives every rank the scores of the whole split."""
        if not ranks.distributed:
            return
        counts = torch.cat([self.tp, self.pred, self.true, self.pixels.reshape(1),
                            self.samples.reshape(1)])
        sums = torch.cat([self.bce, self.loss.reshape(1)])
        ranks.sum_(counts)
        ranks.sum_(sums)
        c = self.num_classes
        self.tp, self.pred, self.true = counts[:c], counts[c:2 * c], counts[2 * c:3 * c]
        self.pixels, self.samples = counts[3 * c], counts[3 * c + 1]
        self.bce, self.loss = sums[:c], sums[c]

    def compute(self) -> dict[str, float]:
        """Scores named ``<split>_<metric>_<class>``, ``<split>_<metric>_total``, ``<split>_loss``.

        One host transfer for the whole dict."""
        tp, pred, true = self.tp, self.pred, self.true
        per_class = {
            "dice": _ratio(2 * tp, pred + true),
            "iou": _ratio(tp, pred + true - tp),
            "bce": _ratio(self.bce, self.pixels.expand(self.num_classes)),
            "precision": _ratio(tp, pred),
            "recall": _ratio(tp, true),
        }
        tp_all, pred_all, true_all = tp.sum(), pred.sum(), true.sum()
        totals = {
            "dice": _ratio(2 * tp_all, pred_all + true_all),
            "iou": _ratio(tp_all, pred_all + true_all - tp_all),
            "bce": _ratio(self.bce.sum(), self.pixels * self.num_classes),
            "precision": _ratio(tp_all, pred_all),
            "recall": _ratio(tp_all, true_all),
        }
        stacked = torch.cat([torch.cat([per_class[m], totals[m].reshape(1)]) for m in METRICS]
                            + [_ratio(self.loss, self.samples).reshape(1)])
        values = stacked.cpu().tolist()
        names = metric_names(self.split)
        if self.num_classes != len(CLASS_NAMES):
            raise ValueError("metric names are defined for the three DESIGN 3.6 classes only")
        return dict(zip(names, values, strict=True))
