"""Which torch device to run on: one rule for training (``train.device``) and prediction
(``--device``)."""

from __future__ import annotations

from nf1prov.errors import UserError

CHOICES = ("auto", "cpu", "cuda")


def pick_device(name: str | None = "auto", *, setting: str = "--device"):
    """torch.device for 'auto' or None (CUDA when available), 'cpu' or 'cuda'.

    ``setting`` names where the choice came from (``--device``, ``train.device``) in the error
    raised for an unknown name or for 'cuda' on a machine without CUDA."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"{setting} must be auto, cpu or cuda, not {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting} is cuda but no CUDA device is available here: set "
                        f"{setting} to cpu or auto.")
    return torch.device(name)
