"""What prediction files say besides their pixels: the physical pixel sizes of the input they
came from, and the model that made them.

Sizes are kept under OME's own attribute names (``PhysicalSizeX``, ``PhysicalSizeXUnit``, ...,
``Z``), the form every output's OME-XML and the ``<stem>_nf1prov.json`` sidecar carry. They are
read from the input (`physical_sizes`): its OME-XML; else an ImageJ hyperstack's calibration
(XResolution/YResolution in pixels per ``unit``, ``spacing`` for Z); else TIFF resolution tags
in pixels per centimetre (inch resolutions are left out: they are a printer's dots per inch far
more often than a microscope's scale). What the input does not say is left out, never invented.

The model is an OME MapAnnotation (namespace `MODEL_NAMESPACE`) linked to the image: plain
key/value text that Fiji (Bio-Formats), OMERO and ``tifffile`` show.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from nf1prov import __version__

AXES = ("X", "Y", "Z")
MICROMETRE = "µm"  # OME's symbol, and its default unit for a size given without one
MODEL_NAMESPACE = "nf1prov/model"
CREATOR = f"nf1prov {__version__}"

# OME UnitsLength symbols a size converts from, in micrometres (resolution tags, napari scale)
IN_MICROMETRES = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, MICROMETRE: 1.0, "nm": 1e-3,
                  "pm": 1e-6, "Å": 1e-4, "in": 25400.0}
# ImageJ's spellings of a unit -> OME's symbol; anything else ("pixel", "") is no calibration
IMAGEJ_UNITS = {**{name: MICROMETRE for name in ("micron", "microns", "um", "µm", "μm",
                                                 "\\u00B5m", "micrometer", "micrometre")},
                "nm": "nm", "nanometer": "nm", "mm": "mm", "millimeter": "mm", "cm": "cm",
                "m": "m", "meter": "m", "inch": "in", "in": "in", "Å": "Å", "angstrom": "Å"}

Sizes = dict[str, float | str]  # {"PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm", ...}


def physical_sizes(tif) -> Sizes:
    """The physical pixel sizes a ``tifffile.TiffFile`` states (see the module docstring)."""
    return ome_sizes(tif.ome_metadata if tif.is_ome else None) or imagej_sizes(tif) \
        or centimetre_sizes(tif.pages.first)


def _size(axis: str, value: float, unit: str) -> Sizes:
    # 9 significant digits: a rational resolution tag read back gives 0.65 as 0.6499999999...
    return {f"PhysicalSize{axis}": float(f"{value:.9g}"), f"PhysicalSize{axis}Unit": unit}


def _first(root, tag: str):
    return root.find(f"{{*}}{tag}") if root is not None else None


def ome_sizes(xml: str | None) -> Sizes:
    """PhysicalSizeX/Y/Z (and units) of the first Image of an OME-XML text."""
    if not xml:
        return {}
    try:
        pixels = _first(_first(ElementTree.fromstring(xml), "Image"), "Pixels")
    except ElementTree.ParseError:
        return {}
    sizes: Sizes = {}
    for axis in AXES:
        value = _number(None if pixels is None else pixels.get(f"PhysicalSize{axis}"))
        if value:
            sizes |= _size(axis, value, pixels.get(f"PhysicalSize{axis}Unit", MICROMETRE))
    return sizes


def imagej_sizes(tif) -> Sizes:
    """An ImageJ hyperstack's calibration: 1 / X/YResolution and ``spacing`` in its units."""
    meta = tif.imagej_metadata or {}
    unit = IMAGEJ_UNITS.get(str(meta.get("unit", "")).strip())
    if unit is None:
        return {}
    page = tif.pages.first
    sizes: Sizes = {}
    for axis, per_unit in zip("XY", page.resolution, strict=True):
        axis_unit = IMAGEJ_UNITS.get(str(meta.get(f"{axis.lower()}unit", "")).strip(), unit)
        if _number(per_unit):
            sizes |= _size(axis, 1 / per_unit, axis_unit)
    spacing = _number(meta.get("spacing"))
    if spacing:
        sizes |= _size("Z", spacing, IMAGEJ_UNITS.get(str(meta.get("zunit", "")).strip(), unit))
    return sizes


def centimetre_sizes(page) -> Sizes:
    """X and Y sizes from resolution tags in pixels per centimetre, in micrometres."""
    import tifffile

    if page.resolutionunit != tifffile.RESUNIT.CENTIMETER:
        return {}
    sizes: Sizes = {}
    for axis, per_cm in zip("XY", page.resolution, strict=True):
        if _number(per_cm):
            sizes |= _size(axis, 1e4 / per_cm, MICROMETRE)
    return sizes


def _number(value) -> float | None:
    """A positive finite size, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < float("inf") else None


def in_micrometres(sizes: Sizes, axis: str) -> float | None:
    value = sizes.get(f"PhysicalSize{axis}")
    factor = IN_MICROMETRES.get(str(sizes.get(f"PhysicalSize{axis}Unit", MICROMETRE)))
    return None if value is None or factor is None else float(value) * factor


def z_ratio(sizes: Sizes) -> float | None:
    """The z step over the xy pixel size (the mean of X and Y) that the sizes give, or None
    when they lack Z, or X and Y, or a unit converts to no length."""
    z = in_micrometres(sizes, "Z")
    xy = [size for size in (in_micrometres(sizes, axis) for axis in "XY") if size]
    return z / (sum(xy) / len(xy)) if z and xy else None


def resolution_tags(sizes: Sizes) -> dict:
    """``tifffile.imwrite`` arguments writing X/Y sizes as pixels per centimetre too, for
    readers of plain TIFF tags (ImageJ's own opener); none when X or Y is unknown."""
    x, y = in_micrometres(sizes, "X"), in_micrometres(sizes, "Y")
    if not (x and y):
        return {}
    return {"resolution": (1e4 / x, 1e4 / y), "resolutionunit": "CENTIMETER"}


def output_metadata(sizes: Sizes, model: dict[str, str] | None, **ome) -> dict:
    """``tifffile.imwrite(metadata=...)`` of an OME output: ``ome`` (axes, channel names...),
    the sizes, nf1prov as Creator, and ``model`` as a MapAnnotation linked to the image."""
    metadata = {**ome, **sizes, "Creator": CREATOR}
    if model:
        metadata["MapAnnotation"] = {"Namespace": MODEL_NAMESPACE, **model}
    return metadata


def model_annotation(xml: str | None) -> dict[str, str]:
    """The keys and values of nf1prov's MapAnnotation in an OME-XML text ({} when none)."""
    if not xml:
        return {}
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return {}
    for annotation in root.iterfind(".//{*}MapAnnotation"):
        if annotation.get("Namespace") == MODEL_NAMESPACE:
            return {m.get("K"): m.text or "" for m in annotation.iterfind(".//{*}M")}
    return {}


def scale_zyx(sizes: Sizes) -> tuple[float, float, float] | None:
    """(z, y, x) pixel sizes for a viewer: in micrometres when every known size converts, else
    as written; 1 for an axis the sizes do not give; None when they give none."""
    known = [axis for axis in "ZYX" if f"PhysicalSize{axis}" in sizes]
    if not known:
        return None
    converted = {axis: in_micrometres(sizes, axis) for axis in known}
    if None in converted.values():
        converted = {axis: float(sizes[f"PhysicalSize{axis}"]) for axis in known}
    return tuple(converted.get(axis, 1.0) for axis in "ZYX")
