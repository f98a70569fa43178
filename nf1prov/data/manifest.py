"""The split manifest: every file a training used, its split, size and content hash; and the
holdout patients' files under the same data root (split ``holdout``), which training never reads
but `evaluate` scores, so that their content is on record too."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from nf1prov.data.cache import sha256_file
from nf1prov.data.layout import FieldOfView

HOLDOUT = "holdout"  # the split of the holdout patients' rows
COLUMNS = ["patient", "well", "site", "fov_id", "split", "image_path", "image_bytes",
           "image_sha256", "mask_path", "mask_bytes", "mask_sha256"]


def build_manifest(splits: dict[str, list[FieldOfView]],
                   cache_dir: Path | None = None) -> pd.DataFrame:
    """One row per field of view: patient, well, site, fov_id, split, paths, sizes, sha256."""
    rows = []
    for split, fields in splits.items():
        for f in fields:
            rows.append({
                "patient": f.patient, "well": f.well, "site": f.site, "fov_id": f.fov_id,
                "split": split,
                "image_path": str(f.image_path), "image_bytes": f.image_path.stat().st_size,
                "image_sha256": sha256_file(f.image_path, cache_dir),
                "mask_path": str(f.mask_path), "mask_bytes": f.mask_path.stat().st_size,
                "mask_sha256": sha256_file(f.mask_path, cache_dir),
            })
    return pd.DataFrame(rows, columns=COLUMNS).sort_values("fov_id", ignore_index=True)


def holdout_manifest(root: Path | str, holdout_patients: list[str],
                     cache_dir: Path | None = None) -> pd.DataFrame:
    """Rows (split `HOLDOUT`) for the holdout patients' fields of view under ``root``; none
    when they have no folder there (labs often keep them elsewhere)."""
    from nf1prov.data.layout import discover_holdout_fields

    return build_manifest({HOLDOUT: discover_holdout_fields(root, holdout_patients)}, cache_dir)


def training_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows of the fields a training used (every split but `HOLDOUT`)."""
    return manifest[manifest["split"] != HOLDOUT].reset_index(drop=True)


def holdout_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["split"] == HOLDOUT].reset_index(drop=True)


def compare_manifest(expected: pd.DataFrame, data_root: Path | str,
                     recorded_root: Path | str | None = None,
                     cache_dir: Path | None = None) -> list[str]:
    """Files of ``expected`` that are missing or whose content differs under ``data_root``.

    Paths are re-rooted: a recorded path under ``recorded_root`` (default: the common parent
    four levels above the images) is looked up at the same relative place under data_root.
    Returns human-readable problems, empty when everything matches.
    """
    data_root = Path(data_root)
    problems = []
    for row in expected.itertuples():
        for kind in ("image", "mask"):
            recorded = Path(getattr(row, f"{kind}_path"))
            relative = _relative_to_root(recorded, recorded_root, kind)
            local = data_root / relative
            if not local.is_file():
                problems.append(f"missing: {local}")
            elif sha256_file(local, cache_dir) != getattr(row, f"{kind}_sha256"):
                problems.append(f"content differs: {local}")
    return problems


def _relative_to_root(recorded: Path, recorded_root: Path | str | None, kind: str) -> Path:
    if recorded_root is not None:
        try:
            return recorded.relative_to(recorded_root)
        except ValueError:
            pass
    # <root>/<patient>/<zstack_images|segmentation_masks>/<fov>/<file>
    return Path(*recorded.parts[-4:])
