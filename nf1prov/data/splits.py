"""Train/val/test split by field of view from a stable 64-bit hash (same on every machine)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from nf1prov.data.layout import DataError, FieldOfView

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def fov_hash(fov_id: str) -> int:
    """Stable unsigned 64-bit hash: the first 8 bytes of SHA-256, big-endian (not hash())."""
    return int.from_bytes(hashlib.sha256(fov_id.encode("utf-8")).digest()[:8], "big")


def hash_position(fov_id: str) -> float:
    """The hash mapped to [0, 1)."""
    return fov_hash(fov_id) / 2**64


def assign_split(fov_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    position = hash_position(fov_id)
    train_end, val_end = fractions[0], fractions[0] + fractions[1]
    if position < train_end:
        return "train"
    return "val" if position < val_end else "test"


def split_fields(fields: Sequence[FieldOfView],
                 fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[FieldOfView]]:
    """{'train': [...], 'val': [...], 'test': [...]} by each field's hash position.

    A field goes to train when its hash position (in [0, 1)) is below fractions[0], to val
    when below fractions[0] + fractions[1], else to test; the order of ``fields`` does not
    matter. Validation is never empty: with few fields, the field whose hash lies nearest the
    validation range moves there (logged as a warning), and training is never empty either.
    Fewer than two fields of view is a DataError naming the data root.
    """
    if len(fields) < 2:
        where = fields[0].image_path.parents[3] if fields else "the data root"
        raise DataError(
            f"Only {len(fields)} field of view found under {where}: training needs at least two "
            "(one to train on, one to validate). Add data or hold out fewer patients."
        )
    splits: dict[str, list[FieldOfView]] = {name: [] for name in SPLITS}
    for field in fields:
        splits[assign_split(field.fov_id, fractions)].append(field)
    if not splits["val"]:
        low, high = fractions[0], fractions[0] + fractions[1]

        def distance(field: FieldOfView) -> float:
            p = hash_position(field.fov_id)
            return low - p if p < low else p - high

        chosen = min(fields, key=distance)  # nearest the validation range, from train or test
        origin = assign_split(chosen.fov_id, fractions)
        splits[origin].remove(chosen)
        splits["val"].append(chosen)
        log.warning(
            "Only %d fields of view: none hashed into the validation range [%.2f, %.2f), so %s "
            "(hash position %.3f, nearest that range) moves from %s to validation.",
            len(fields), low, high, chosen.fov_id, hash_position(chosen.fov_id), origin)
    if not splits["train"]:
        donor = "test" if splits["test"] else "val"
        chosen = min(splits[donor], key=lambda f: hash_position(f.fov_id))
        splits[donor].remove(chosen)
        splits["train"].append(chosen)
        log.warning("Only %d fields of view: none hashed into training, so %s (lowest hash "
                    "position in %s) moves to training.", len(fields), chosen.fov_id, donor)
    return splits
