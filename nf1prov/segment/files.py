"""Files for prediction: which inputs, reading z-stacks from TIFF, writing the outputs.

`predict_files` runs a loaded model (anything with ``predict(stack, ...)``, ``normalisation``
and ``postprocess``, e.g. `nf1prov.provenance.models.LoadedModel`) over files, folders and glob
patterns, checking every file's header before predicting any. Every output keeps the input's
physical pixel sizes and names the model in its OME-XML (`nf1prov.segment.ome`); the
``<stem>_nf1prov.json`` sidecar beside them (`write_sidecar`) is written last, so its presence
means the stack is done; a rerun skips a stack whose sidecar says it was made the same way
(`done_before`). `stack_jobs` and `predict_file` are what `nf1prov.segment.cluster` runs on a
Dask cluster, one stack per task.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from nf1prov import __version__
from nf1prov.atomic import write_atomic
from nf1prov.data.cache import sha256_file
from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.errors import UserError
from nf1prov.segment.ome import Sizes, output_metadata, physical_sizes, resolution_tags
from nf1prov.segment.ome import z_ratio as sizes_z_ratio
from nf1prov.segment.predict import class_map

TIFF_SUFFIXES = (".tif", ".tiff")
# What `write_outputs` names its files: a folder of earlier predictions is not an input.
# (The `SIDECAR_ENDING` and `_preview.png` files beside them are not TIFFs, so never inputs.)
OUTPUT_ENDINGS = ("_probabilities.tif", "_probabilities.ome.tif", "_classes.ome.tif",
                  "_labels.ome.tif")
SIDECAR_ENDING = "_nf1prov.json"


def expand_inputs(inputs: Iterable[str]) -> list[tuple[Path, Path]]:
    """(file, base) pairs from files, folders and glob patterns; ``base`` is the folder the
    outputs mirror the file's relative location from.

    A folder contributes the ``*_TRANS.tif`` files under it (recursively), or, when it has none,
    every .tif/.tiff under it except the outputs of an earlier `predict` (`OUTPUT_ENDINGS`).
    Raises UserError for an input that matches nothing.
    """
    import glob

    found: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*_TRANS.tif"))
            if not files:
                files = sorted(p for p in path.rglob("*")
                               if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES
                               and not p.name.endswith(OUTPUT_ENDINGS))
            if not files:
                raise UserError(f"Input folder {path} holds no *_TRANS.tif or .tif/.tiff files "
                                "(other than the outputs of an earlier `nf1prov predict`).")
            found.extend((f, path) for f in files)
        elif path.is_file():
            found.append((path, path.parent))
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not files:
                raise UserError(f"Input pattern {text!r} matches no files.")
            found.extend((f, f.parent) for f in files)
        else:
            raise UserError(f"Input {path} does not exist. Pass z-stack files (.tif), folders "
                            "of them, or glob patterns.")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError("No input files given.")
    return unique


def check_stack(path: Path, shape: tuple[int, ...], dtype, axes: str,
                normalisation: str = "dtype_max") -> tuple[int, int, int]:
    """The (Z, H, W) shape a file of this ``shape``/``dtype``/``axes`` is predicted as.

    Raises UserError naming the file for RGB/multi-channel images, more than three non-singleton
    dimensions, empty images, and dtypes the model's ``normalisation`` cannot scale (only
    unsigned integers have a dtype maximum; ``percentile`` takes any real dtype).
    """
    dtype = np.dtype(dtype)
    # Interleaved samples (axes ending in S: Y, X, RGB) are colour. A planar 'SYX' file is what
    # tifffile writes for a plain (3, H, W) array by default, so it is read as a 3-slice stack.
    if axes.endswith("S") and shape[-1] > 1:
        raise UserError(f"{path} is an RGB/multi-sample image (axes {axes}, shape {shape}); "
                        "the model takes single-channel brightfield z-stacks (Z, H, W). Save the "
                        "brightfield channel alone.")
    squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else tuple(shape)
    if len(squeezed) == 2:
        squeezed = (1, *squeezed)
    if len(squeezed) != 3:
        raise UserError(f"{path} has shape {tuple(shape)} (axes {axes}); the model takes a "
                        "(Z, H, W) z-stack or a 2-D (H, W) image.")
    if min(squeezed) < 1:
        raise UserError(f"{path} is empty (shape {tuple(shape)}).")
    if normalisation == "dtype_max" and dtype.kind != "b" and \
            not np.issubdtype(dtype, np.unsignedinteger):
        raise UserError(f"{path} has dtype {dtype}; the model was trained on unsigned integer "
                        "images normalised by their dtype maximum (uint8/uint16). Convert the "
                        "file to uint8 or uint16.")
    if dtype.kind not in "biuf":
        raise UserError(f"{path} has dtype {dtype}, which is not a real-valued image type.")
    return squeezed


def _open_series(path: Path, read: bool):
    """(shape, dtype, axes, pixels or None, physical sizes) of the file's first series."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return (series.shape, series.dtype, series.axes,
                    series.asarray() if read else None, physical_sizes(tif))
    except Exception as exc:
        raise UserError(f"Cannot read {path} as a TIFF image: {exc}.") from None


def read_stack(path: Path, normalisation: str = "dtype_max") -> np.ndarray:
    """A brightfield image file as a (Z, H, W) array; a 2-D image becomes Z = 1.

    Raises UserError naming the file when a model normalising with ``normalisation`` cannot
    take it (see `check_stack`).
    """
    return read_stack_and_sizes(path, normalisation)[0]


def read_stack_and_sizes(path: Path, normalisation: str = "dtype_max") -> tuple[np.ndarray,
                                                                                 Sizes]:
    """`read_stack` and the file's physical pixel sizes (`nf1prov.segment.ome`)."""
    shape, dtype, axes, data, sizes = _open_series(path, read=True)
    return data.reshape(check_stack(path, shape, dtype, axes, normalisation)), sizes


def output_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class PredictionFiles:
    probabilities: Path
    classes: Path
    labels: Path
    n_cells: int
    skipped: bool = False  # made by an earlier run the same way (`done_before`), left untouched


def output_paths(outdir: Path, stem: str, probabilities_dtype: str) -> tuple[Path, Path, Path]:
    """Where `write_outputs` writes one stack's probabilities, classes and labels."""
    probabilities = "_probabilities.tif" if probabilities_dtype == "float16" else \
        "_probabilities.ome.tif"
    return (outdir / f"{stem}{probabilities}", outdir / f"{stem}_classes.ome.tif",
            outdir / f"{stem}_labels.ome.tif")


def write_outputs(outdir: Path, stem: str, prob: np.ndarray, labels: np.ndarray,
                  probabilities_dtype: str = "float32", *, sizes: Sizes | None = None,
                  model: dict[str, str] | None = None,
                  made_from: str | None = None) -> PredictionFiles:
    """Write one stack's predictions under ``outdir``:

    - ``<stem>_probabilities.ome.tif``: float32 (C, Z, Y, X) OME-TIFF, channels named by class;
      with float16 (half the size) ``<stem>_probabilities.tif`` instead, because OME-XML has
      no half-float pixel type: a tifffile "shaped" TIFF whose JSON description holds the axes
      ``CZYX``, the sizes and, under ``"nf1prov"``, the model (``TiffFile.shaped_metadata``).
      ImageJ's TIFF opener refuses float16 files, hence float32 by default;
    - ``<stem>_classes.ome.tif``: uint8 (Z, Y, X) class map (argmax), OME-TIFF;
    - ``<stem>_labels.ome.tif``: uint16/uint32 (Z, Y, X) instance labels, OME-TIFF.

    Each keeps ``sizes`` (the input's physical pixel sizes: OME PhysicalSize*, and X/Y as
    resolution tags in pixels per centimetre) and names ``model`` in an OME MapAnnotation
    (`nf1prov.segment.ome`). ``made_from`` (the input's sha256, with the model and parameters
    as they make the same outputs): each OME file's UUID is derived from it and the file's
    name (`ome_uuid`), so the same stack made the same way is the same bytes, here or on a
    cluster; without it the UUIDs are tifffile's (time-based).
    """
    import tifffile

    sizes = sizes or {}
    tags = resolution_tags(sizes)
    outdir.mkdir(parents=True, exist_ok=True)
    prob_path, classes_path, labels_path = output_paths(outdir, stem, probabilities_dtype)
    if probabilities_dtype == "float16":
        # page by page: no float16 copy of the whole stack (the same bytes as writing one)
        pages = (page.astype(np.float16) for page in prob.reshape(-1, *prob.shape[-2:]))
        tifffile.imwrite(prob_path, pages, shape=prob.shape, dtype=np.float16, **tags,
                         metadata={"axes": "CZYX", **sizes, **({"nf1prov": model} if model
                                                               else {})})
    else:
        tifffile.imwrite(prob_path, np.asarray(prob, np.float32), ome=True, **tags,
                         metadata=output_metadata(sizes, model, axes="CZYX",
                                                  Channel={"Name": list(CLASS_NAMES)})
                         | ome_uuid(made_from, prob_path))
    files = PredictionFiles(prob_path, classes_path, labels_path, int(labels.max(initial=0)))
    tifffile.imwrite(files.classes, class_map(prob), ome=True, compression="zlib", **tags,
                     metadata=output_metadata(sizes, model, axes="ZYX")
                     | ome_uuid(made_from, files.classes))
    tifffile.imwrite(files.labels, labels, ome=True, compression="zlib", **tags,
                     metadata=output_metadata(sizes, model, axes="ZYX")
                     | ome_uuid(made_from, files.labels))
    return files


def ome_uuid(made_from: str | None, path: Path) -> dict[str, str]:
    """The ``UUID`` of an OME output (tifffile's metadata key): a name-based UUID (uuid5) of
    what the file was made from and its name; {} (tifffile's own) without ``made_from``."""
    import uuid

    if made_from is None:
        return {}
    return {"UUID": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{made_from}/{path.name}')}"}


def model_record(loaded, postprocess, z_ratio: float | None = None) -> dict[str, str]:
    """What the outputs say of the model that made them: its codename, commit, run ID, where it
    was loaded from (a folder as an absolute path) and the instance parameters, as text
    (``instances.*``, or ``instances3d.*`` with the ``z_ratio`` used for 3-D cells); what is
    unknown (a local folder not from `nf1prov checkout`) is left out."""
    source = str(getattr(loaded, "source", "") or "")
    if source and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    known = {"codename": getattr(loaded, "codename", None), "commit": getattr(loaded, "sha", None),
             "run_id": getattr(loaded, "run_id", None), "model": source}
    made = {"instances3d.z_ratio": f"{z_ratio:g}"} if postprocess.dims == 3 else {}
    return {key: str(value) for key, value in known.items() if value} | postprocess.params() \
        | made


def sidecar_path(outdir: Path, stem: str) -> Path:
    return Path(outdir) / f"{stem}{SIDECAR_ENDING}"


MODEL_KEYS = ("codename", "commit", "run_id", "model")  # the sidecar's keys naming the model


def instances_record(postprocess, z_ratio: float | None) -> dict:
    """The sidecar's ``instances``: the parameters used, with ``dims`` (and the 3-D z ratio)."""
    return {"dims": postprocess.dims, **postprocess.values()} | (
        {"z_ratio": z_ratio} if postprocess.dims == 3 else {})


def write_sidecar(path: Path, files: PredictionFiles, input_path: Path, sizes: Sizes,
                  model: dict[str, str], postprocess, others: dict[str, Path] | None = None,
                  z_ratio: float | None = None, input_sha256: str | None = None) -> None:
    """Write ``path`` (`sidecar_path`) atomically: the model (codename, commit, run ID, its
    source; null when unknown), the instance parameters (``dims`` 2: per slice; 3: cells through
    the stack, with the ``z_ratio`` used), nf1prov's version, the input's absolute
    path and sha256, the file names of the outputs (and ``others``, e.g. the preview), the
    physical sizes, the number of cells and the time (UTC). Written last: its presence means
    the stack is done. ``input_sha256``: the input's, when already known."""
    outputs = {f.name: getattr(files, f.name).name for f in fields(files)
               if isinstance(getattr(files, f.name), Path)}
    outputs |= {kind: Path(other).name for kind, other in (others or {}).items()}
    record = {key: model.get(key) for key in MODEL_KEYS} | {
        "instances": instances_record(postprocess, z_ratio),
        "nf1prov_version": __version__,
        "input": str(Path(input_path).resolve()),
        "input_sha256": input_sha256 or sha256_file(input_path),
        "outputs": outputs,
        "physical_sizes": sizes,
        "n_cells": files.n_cells,
        "written": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def predict_files(loaded, inputs: Iterable[str], outdir: Path, *,
                  postprocess=None, batch_size: int = 8,
                  overlap: int | None = None, probabilities_dtype: str = "float32",
                  progress: bool = True, preview: bool = False, postprocess3d=None,
                  instances: str = "3d", z_ratio: float | None = None, overwrite: bool = True,
                  ) -> Iterator[tuple[Path, PredictionFiles]]:
    """Predict every input file and write its outputs; yields (input, PredictionFiles).

    ``postprocess``: instance parameters per slice (default: the model's,
    ``loaded.postprocess``); ``postprocess3d``: those of cells as 3-D objects (default the
    model's, `LoadedModel.instance_params`). ``instances``: ``"3d"`` labels the cells of a stack
    of several slices through the stack (a single slice or 2-D image gets per-slice labels),
    ``"2d"`` labels each slice on its own. ``z_ratio``: z step / xy pixel size for 3-D cells
    (`stack_z_ratio`; None: each stack's own).
    ``preview``: also write ``<stem>_preview.png`` (`nf1prov.segment.pictures.write_preview`).
    ``overwrite=False``: a stack made the same way before (`done_before`) is yielded with
    ``skipped`` set and its files left untouched.
    Outputs mirror each input's location relative to the folder it was found in, so
    same-named stacks of different patients do not overwrite each other.
    """
    if probabilities_dtype not in ("float16", "float32"):
        raise UserError(f"--probabilities-dtype must be float16 or float32, "
                        f"not {probabilities_dtype!r}.")
    postprocess = postprocess or loaded.postprocess
    if instances == "3d":
        postprocess3d = postprocess3d or loaded.instance_params(3)
    elif instances != "2d":
        raise UserError(f"--instances must be 2d or 3d, not {instances!r}.")
    jobs = stack_jobs(inputs, outdir)
    for path, _ in jobs:  # check every header before predicting any: a bad file fails fast
        check_header(path, loaded.normalisation)
    for path, folder in jobs:
        yield path, predict_file(loaded, path, folder,
                                 postprocess=postprocess, batch_size=batch_size,
                                 overlap=overlap, probabilities_dtype=probabilities_dtype,
                                 progress=progress, preview=preview,
                                 postprocess3d=postprocess3d if instances == "3d" else None,
                                 z_ratio=z_ratio, overwrite=overwrite)


def stack_jobs(inputs: Iterable[str], outdir: Path) -> list[tuple[Path, Path]]:
    """(input file, its output folder) for every input (`expand_inputs`): the folder mirrors the
    file's location relative to the folder it was found in."""
    return [(path, Path(outdir) / path.parent.relative_to(base))
            for path, base in expand_inputs(inputs)]


def check_header(path: Path, normalisation: str) -> tuple[tuple[int, int, int], Sizes]:
    """The (Z, H, W) shape a file is predicted as and its physical sizes, from its header alone
    (`check_stack`: UserError naming the file when the model cannot take it)."""
    shape, dtype, axes, _, sizes = _open_series(path, read=False)
    return check_stack(path, shape, dtype, axes, normalisation), sizes


def stack_z_ratio(sizes: Sizes, given: float | None, default: float) -> float:
    """The z step over the xy pixel size 3-D cells are made with: ``given`` (``--z-ratio``),
    else the stack's physical sizes, else ``default`` (the model's ``postprocess.z_ratio``)."""
    return given or sizes_z_ratio(sizes) or default


def stack_instances(loaded, depth: int, sizes: Sizes, postprocess, postprocess3d,
                    z_ratio: float | None):
    """(instance parameters, z ratio) a stack of ``depth`` slices is labelled with: the 3-D ones
    with the stack's z ratio (`stack_z_ratio`) when given and the stack has depth, else the
    per-slice ones (one slice has no depth)."""
    if postprocess3d is not None and depth > 1:
        return postprocess3d, stack_z_ratio(sizes, z_ratio, getattr(loaded, "z_ratio", 1.0))
    return postprocess, z_ratio


def done_before(loaded, path: Path, outdir: Path, *, postprocess, postprocess3d=None,
                z_ratio: float | None = None, probabilities_dtype: str = "float32",
                preview: bool = False) -> PredictionFiles | None:
    """The outputs of an earlier run that made this stack the way these arguments would, or
    None (redo it). Done means: its sidecar exists and names the same model (codename, commit,
    run ID; a folder of no run by its path), the same instance parameters (with the z ratio
    this stack gets), the input's current sha256 and the output files these arguments write,
    which are all there. Tiling (``overlap``, ``batch_size``), the device and the torch threads
    are not recorded and not compared: after changing them, pass ``--overwrite``."""
    stem = output_stem(path)
    try:
        record = json.loads(sidecar_path(outdir, stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    (depth, _, _), sizes = check_header(path, loaded.normalisation)
    chosen, ratio = stack_instances(loaded, depth, sizes, postprocess, postprocess3d, z_ratio)
    model = model_record(loaded, chosen, ratio)
    files = output_paths(outdir, stem, probabilities_dtype)
    wanted = {"probabilities": files[0].name, "classes": files[1].name, "labels": files[2].name}
    if preview:
        wanted["preview"] = f"{stem}_preview.png"
    named = ("codename", "commit", "run_id") if model.get("run_id") else MODEL_KEYS
    same = (isinstance(record, dict)
            and all(record.get(key) == model.get(key) for key in named)
            and record.get("instances") == instances_record(chosen, ratio)
            and record.get("outputs") == wanted
            and all((outdir / name).is_file() for name in wanted.values())
            and record.get("input_sha256") == sha256_file(path))
    return PredictionFiles(*files, int(record.get("n_cells", 0)), skipped=True) if same else None


def predict_file(loaded, path: Path, outdir: Path, *, postprocess, batch_size: int,
                 overlap: int | None, probabilities_dtype: str,
                 progress: bool, preview: bool = False, postprocess3d=None,
                 z_ratio: float | None = None, overwrite: bool = True) -> PredictionFiles:
    """One stack's prediction, instance labels and output files, then its sidecar. The stack as
    read is dropped once predicted (with ``preview``, once its preview is drawn), and nothing of
    one file outlives its call (memory: one stack at a time). The serial path and each task on
    a Dask cluster (`nf1prov.segment.cluster`) run this same function.

    ``overwrite=False``: a stack made the same way before (`done_before`) is returned with
    ``skipped`` set and its files left untouched.
    The sidecar comes last, so its presence means the stack is done: an earlier run's is
    removed before anything is written, and a failure on the way leaves none."""
    if not overwrite:
        earlier = done_before(loaded, path, outdir, postprocess=postprocess,
                              postprocess3d=postprocess3d, z_ratio=z_ratio,
                              probabilities_dtype=probabilities_dtype, preview=preview)
        if earlier is not None:
            return earlier
    stem = output_stem(path)
    done = sidecar_path(outdir, stem)
    done.unlink(missing_ok=True)
    stack, sizes = read_stack_and_sizes(path, loaded.normalisation)
    prob = loaded.predict(stack, overlap=overlap,
                          batch_size=batch_size, progress=progress, description=path.name)
    image = stack if preview else None
    postprocess, z_ratio = stack_instances(loaded, len(stack), sizes, postprocess,
                                           postprocess3d, z_ratio)
    del stack
    labels = postprocess.segment(prob, z_ratio or 1.0)
    others = {}
    if image is not None:  # before the sidecar that says "done"
        from nf1prov.segment.pictures import write_preview

        others["preview"] = outdir / f"{stem}_preview.png"
        write_preview(others["preview"], image, labels, name=path.name, model=loaded.label)
        del image
    model = model_record(loaded, postprocess, z_ratio)
    input_sha256 = sha256_file(path)
    made_from = json.dumps([input_sha256, model], sort_keys=True)
    files = write_outputs(outdir, stem, prob, labels, probabilities_dtype, sizes=sizes,
                          model=model, made_from=made_from)
    write_sidecar(done, files, path, sizes, model, postprocess, others=others, z_ratio=z_ratio,
                  input_sha256=input_sha256)
    return files
