"""Find (brightfield, mask) pairs in the upstream layout and check them before training.

    <root>/<patient>/zstack_images/<well>-<site>/<well>-<site>_TRANS.tif     (Z, H, W)
    <root>/<patient>/segmentation_masks/<well>-<site>/cell_mask.tiff          (Z, H, W) labels

Validation reads TIFF headers (shape, dtype, strip offsets), not pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nf1prov.errors import UserError

IMAGE_DIR = "zstack_images"
MASK_DIR = "segmentation_masks"
IMAGE_SUFFIX = "_TRANS.tif"
MASK_NAME = "cell_mask.tiff"
FOV_RE = re.compile(r"^(?P<well>[^-]+)-(?P<site>.+)$")


class DataError(UserError):
    """A problem with the data on disk; the message names the file and the fix."""


@dataclass(frozen=True)
class FieldOfView:
    patient: str
    well: str
    site: str
    image_path: Path
    mask_path: Path

    @property
    def fov_id(self) -> str:
        return f"{self.patient}/{self.well}-{self.site}"


def is_held_out(patient: str, holdout_patients: Iterable[str]) -> bool:
    """True when ``patient`` is a holdout entry or starts with '<entry>_' (NF0014 -> NF0014_T1)."""
    return any(patient == h or patient.startswith(h + "_") for h in holdout_patients)


def discover_fields(root: Path | str, holdout_patients: Sequence[str] = ()) -> list[FieldOfView]:
    """All fields of view under ``root`` whose patient is not held out, sorted by fov_id.

    Raises DataError for a missing/empty root, a field with an image but no mask (or the
    reverse), and when no field is left after removing the holdout patients.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Data root {root} does not exist or is not a directory. Pass --data-root DIR "
            "(or set data.root in the config); `nf1prov demo-data DIR` writes a demo dataset."
        )
    fields: list[FieldOfView] = []
    seen_patients: list[str] = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        image_root, mask_root = patient_dir / IMAGE_DIR, patient_dir / MASK_DIR
        if not image_root.is_dir() and not mask_root.is_dir():
            continue  # not a patient folder
        seen_patients.append(patient_dir.name)
        if is_held_out(patient_dir.name, holdout_patients):
            continue
        fields.extend(_patient_fields(patient_dir))
    if not seen_patients:
        raise DataError(
            f"No patient folders under {root}: expected <patient>/{IMAGE_DIR}/<well>-<site>/"
            f"<well>-<site>{IMAGE_SUFFIX} and <patient>/{MASK_DIR}/<well>-<site>/{MASK_NAME}. "
            "Check --data-root."
        )
    if not fields:
        kept = [p for p in seen_patients if not is_held_out(p, holdout_patients)]
        if kept:  # patient folders without any <well>-<site> folder
            raise DataError(
                f"No fields of view under {root}: the patient folders {', '.join(kept)} hold no "
                f"<well>-<site> folders in {IMAGE_DIR}/ and {MASK_DIR}/. Check --data-root."
            )
        raise DataError(
            f"No fields of view left under {root} after holding out {list(holdout_patients)} "
            f"(patients found: {', '.join(seen_patients)}). Change data.holdout_patients."
        )
    return sorted(fields, key=lambda f: f.fov_id)


def discover_holdout_fields(root: Path | str,
                            holdout_patients: Sequence[str]) -> list[FieldOfView]:
    """The fields of view of the holdout patients' folders under ``root`` (those
    `discover_fields` leaves out), sorted by fov_id; [] when there are none. Raises DataError
    for a field with an image but no mask (or the reverse)."""
    root = Path(root)
    held = [p for p in sorted(root.iterdir()) if p.is_dir() and is_held_out(p.name,
                                                                             holdout_patients)]
    fields = [f for patient_dir in held for f in _patient_fields(patient_dir)]
    return sorted(fields, key=lambda f: f.fov_id)


def select_fields(fields: Sequence[FieldOfView], ids: Sequence[str],
                  root: Path | str | None = None) -> list[FieldOfView]:
    """The fields whose ``fov_id`` is in ``ids`` (config ``data.fields``), in the order of
    ``fields``; all of ``fields`` when ``ids`` is empty.

    Raises DataError naming every id that is not among ``fields`` (not under the data root, or
    a holdout patient's).
    """
    if not ids:
        return list(fields)
    wanted = set(ids)
    missing = sorted(wanted - {f.fov_id for f in fields})
    if missing:
        where = f"under {root}" if root is not None else "in the data"
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                           if len(missing) > 10 else "")
        raise DataError(
            f"data.fields names {len(missing)} field(s) of view not found {where} (or held out "
            f"by data.holdout_patients): {shown}. Each id is <patient>/<well>-<site>, the "
            f"folders <patient>/{IMAGE_DIR}/<well>-<site>/; fix data.fields or --data-root."
        )
    return [f for f in fields if f.fov_id in wanted]


def discover_training_fields(root: Path | str, data: dict) -> list[FieldOfView]:
    """The fields of view a training uses: those `discover_fields` finds under ``root`` less
    the holdout patients, narrowed to ``data['fields']`` when that list is not empty.
    ``data`` is a config's [data] section."""
    fields = discover_fields(root, holdout_patients=tuple(data["holdout_patients"]))
    return select_fields(fields, data.get("fields", ()), root)


def _subfolders(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def _patient_fields(patient_dir: Path) -> list[FieldOfView]:
    image_root, mask_root = patient_dir / IMAGE_DIR, patient_dir / MASK_DIR
    fields = []
    for name in sorted(_subfolders(image_root) | _subfolders(mask_root)):
        image_path = image_root / name / f"{name}{IMAGE_SUFFIX}"
        mask_path = mask_root / name / MASK_NAME
        if not image_path.is_file():
            raise DataError(
                f"Missing brightfield image {image_path} for field of view {patient_dir.name}/"
                f"{name}. Add the z-stack there as {name}{IMAGE_SUFFIX}, or remove the folder "
                f"{name} from {image_root} and {mask_root}."
            )
        if not mask_path.is_file():
            raise DataError(
                f"Missing segmentation mask {mask_path} for image {image_path}. Add the instance "
                f"mask as {MASK_NAME} or move the image out of the data root."
            )
        match = FOV_RE.match(name)
        if not match:
            raise DataError(
                f"Folder {image_root / name} is not named <well>-<site> (e.g. C4-2). Rename it."
            )
        fields.append(FieldOfView(patient_dir.name, match["well"], match["site"], image_path,
                                  mask_path))
    return fields


@dataclass(frozen=True)
class StackHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def read_header(path: Path) -> StackHeader:
    """Shape and dtype of the first series of a TIFF, read from its header; checks that the
    file holds every byte its header points at (a truncated copy fails here, not mid-training).
    """
    import tifffile

    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            end = _data_end(tif, series)
            if end > size:
                raise DataError(
                    f"{path} is truncated: it has {size} bytes but its header points at data up "
                    f"to byte {end}. Copy the file again."
                )
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise DataError(f"Cannot read TIFF {path} (damaged or truncated: {exc}). Check the "
                        "file is a complete TIFF: copy it again, or re-export it.") from None
    if len(shape) == 2:
        shape = (1, *shape)
    return StackHeader(shape, dtype)


def _data_end(tif, series) -> int:
    """The largest byte offset the TIFF's header says holds image data; raises DataError when
    the chain of page directories breaks off before the last slice (a truncated file)."""
    pages = len(tif.pages)
    page_pixels = int(np.prod(series.keyframe.shape)) or 1
    pages_expected = max(1, int(np.prod(series.shape)) // page_pixels)
    # Large ImageJ hyperstacks legitimately hold one directory for all slices.
    if pages < pages_expected and not (tif.is_imagej and pages == 1):
        raise DataError(f"{tif.filehandle.path} is truncated: its header describes "
                        f"{pages_expected} slices but only {pages} can be read. "
                        "Copy the file again.")
    end = 0
    for page in tif.pages:  # parses every page directory: a cut-off one raises here
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            end = max(end, offset + count)
    if series.dataoffset is not None:  # contiguous data (tifffile, ImageJ): one range
        end = max(end, int(series.dataoffset + series.nbytes))
    return end


def validate_fields(fields: Sequence[FieldOfView], input_slices: int, crop_size: int, *,
                    normalisation: str = "dtype_max", edge_slices: str = "skip") -> None:
    """Check every field can produce training crops; raise DataError naming the first bad file.

    ``normalisation`` and ``edge_slices`` are the config's ``data`` values: ``dtype_max`` needs
    unsigned integer images; ``skip`` needs at least ``input_slices`` slices."""
    for field in fields:
        image, mask = read_header(field.image_path), read_header(field.mask_path)
        for path, header in ((field.image_path, image), (field.mask_path, mask)):
            if len(header.shape) != 3:
                raise DataError(f"{path} has shape {header.shape}; expected a (Z, H, W) "
                                "single-channel z-stack. Save one channel, one slice per page.")
        if normalisation == "dtype_max" and not np.issubdtype(image.dtype, np.unsignedinteger):
            # Inputs are divided by their dtype's maximum (DESIGN 4), which only unsigned
            # integer images have.
            raise DataError(
                f"{field.image_path} has dtype {image.dtype}; with data.normalisation = "
                "'dtype_max' brightfield stacks must be unsigned integers (uint8/uint16), which "
                "are divided by their dtype's maximum. Convert the stack to uint16, or set "
                "data.normalisation = 'percentile'."
            )
        if image.dtype.kind not in "buif":
            raise DataError(f"{field.image_path} has dtype {image.dtype}, not a real-valued "
                            "image type. Convert the stack to uint16.")
        if image.shape != mask.shape:
            raise DataError(
                f"Shape mismatch: image {field.image_path} is {image.shape} but mask "
                f"{field.mask_path} is {mask.shape}. They must match slice for slice."
            )
        if not np.issubdtype(mask.dtype, np.integer):
            raise DataError(
                f"Mask {field.mask_path} has dtype {mask.dtype}; instance masks must hold integer "
                "labels (0 = background). Re-export it as uint16/uint32."
            )
        if edge_slices == "skip" and image.shape[0] < input_slices:
            raise DataError(
                f"{field.image_path} has {image.shape[0]} slices, fewer than the input window of "
                f"{input_slices} (data.input_slices). Lower data.input_slices, set "
                "data.edge_slices = 'clamp' (repeat edge slices), or drop this stack."
            )
        if min(image.shape[1:]) < crop_size:
            raise DataError(
                f"{field.image_path} is {image.shape[1]}x{image.shape[2]} pixels, smaller than a "
                f"{crop_size}x{crop_size} crop (data.crop_size). Lower data.crop_size."
            )
