"""napari's view of `nf1prov predict`'s outputs: the reader contribution of the npe2 manifest
``nf1prov/napari.yaml`` (napari finds it through the ``napari.manifest`` entry point).

- ``*_labels.ome.tif``: a Labels layer (one colour per cell);
- ``*_classes.ome.tif``: a Labels layer coloured by class (inner-cell, cell-boundary; background
  transparent) in `nf1prov.segment.pictures.CLASS_COLOURS`, so hovering names the class value;
- ``*_probabilities.ome.tif`` / ``*_probabilities.tif`` (float16): one image layer per class,
  blended additively in the class colours, contrast 0..1 (background hidden at first);
- ``*_nf1prov.json`` (the sidecar): the input stack (grey) with the outputs it lists on top, all
  at the same scale: napari's own reader gives the input no scale, so it would not line up.

Each layer gets the physical scale (z, y, x) in micrometres from the file's sizes
(`nf1prov.segment.ome.scale_zyx`; napari's unit-less 1 when the file has none) and, as its
metadata, the model that made it and the sizes as written. napari itself is never imported:
the reader returns layer-data tuples, as npe2 asks, so napari stays an optional extra.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.segment.files import OUTPUT_ENDINGS, SIDECAR_ENDING, output_stem, read_stack
from nf1prov.segment.ome import model_annotation, ome_sizes, scale_zyx
from nf1prov.segment.pictures import CLASS_COLOURS, hex_colour

LayerData = tuple[object, dict, str]  # (data, layer keyword arguments, layer type)


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list] | None:
    """The reader of npe2's ``get_reader`` protocol: `read_outputs` when every path is an
    nf1prov output, else None (napari then asks other readers)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_reader_of(p) for p in paths):
        return None
    return read_outputs


def read_outputs(path: str | Sequence[str]) -> list[LayerData]:
    """Layer-data tuples of nf1prov output files (see the module docstring)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return [layer for p in paths for layer in _reader_of(p)(Path(p))]


def _reader_of(path) -> Callable[[Path], list[LayerData]] | None:
    name = Path(path).name
    return next((reader for ending, reader in READERS.items() if name.endswith(ending)), None)


def _open(path: Path, kind: str) -> tuple[np.ndarray, dict]:
    """The pixels and the layer keywords every layer gets: name (``<stem> <kind>``), scale and
    metadata."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        data = tif.series[0].asarray()
        if tif.is_ome:
            sizes, model = ome_sizes(tif.ome_metadata), model_annotation(tif.ome_metadata)
        else:  # a float16 "shaped" TIFF: the same in its JSON description
            shaped = (tif.shaped_metadata or ({},))[0]
            sizes = {k: v for k, v in shaped.items() if k.startswith("PhysicalSize")}
            model = dict(shaped.get("nf1prov") or {})
    stem = path.name[: path.name.rindex(f"_{kind}")]
    layer = {"name": f"{stem} {kind}", "metadata": {**model, "physical_sizes": sizes}}
    scale = scale_zyx(sizes)
    if scale is not None:
        layer["scale"] = scale
    return data, layer


def read_labels(path: Path) -> list[LayerData]:
    data, layer = _open(path, "labels")
    return [(_zyx(data), layer, "labels")]


def read_classes(path: Path) -> list[LayerData]:
    data, layer = _open(path, "classes")
    colours = {index: hex_colour(CLASS_COLOURS[name]) for index, name in enumerate(CLASS_NAMES)}
    colours[0] = "transparent"  # background: see the image through it
    return [(_zyx(data), {**layer, "colormap": {**colours, None: "transparent"}}, "labels")]


def read_probabilities(path: Path) -> list[LayerData]:
    data, layer = _open(path, "probabilities")
    if data.ndim == 3:  # the reader squeezed Z = 1 away: (C, Y, X) -> (C, 1, Y, X)
        data = data[:, None]
    stem = layer["name"].removesuffix(" probabilities")
    layer |= {"channel_axis": 0, "name": [f"{stem} {name}" for name in CLASS_NAMES],
              "colormap": [hex_colour(CLASS_COLOURS[name]) for name in CLASS_NAMES],
              "contrast_limits": [(0.0, 1.0)] * len(CLASS_NAMES), "blending": "additive",
              "visible": [name != "background" for name in CLASS_NAMES]}
    return [(data, layer, "image")]


def read_sidecar(path: Path) -> list[LayerData]:
    """The input the sidecar names (when it is still there) and the outputs it lists, bottom to
    top; probabilities and classes start hidden, so the labels lie on the image."""
    record = json.loads(path.read_text(encoding="utf-8"))
    sizes = record.get("physical_sizes") or {}
    layers = []
    source = Path(record.get("input") or "")
    if source.is_file():  # "percentile": any real dtype, as the model saw it or not
        layer = {"name": f"{output_stem(source)} input", "colormap": "gray",
                 "metadata": {"path": str(source), "physical_sizes": sizes}}
        if scale_zyx(sizes) is not None:
            layer["scale"] = scale_zyx(sizes)
        layers.append((read_stack(source, "percentile"), layer, "image"))
    for name in (record.get("outputs") or {}).values():
        output = path.parent / name
        if output.is_file() and name.endswith(OUTPUT_ENDINGS):
            for data, layer, kind in _reader_of(output)(output):
                if not name.endswith("_labels.ome.tif"):
                    hidden = layer.get("visible", True)
                    layer["visible"] = [False] * len(hidden) if isinstance(hidden, list) else False
                layers.append((data, layer, kind))
    return layers


def _zyx(data: np.ndarray) -> np.ndarray:
    return data[None] if data.ndim == 2 else data  # a one-slice stack squeezed to (Y, X)


READERS = {"_labels.ome.tif": read_labels, "_classes.ome.tif": read_classes,
           "_probabilities.ome.tif": read_probabilities, "_probabilities.tif": read_probabilities,
           SIDECAR_ENDING: read_sidecar}
