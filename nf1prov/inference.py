"""Whole-stack prediction with a trained segmenter, and loading a model with its settings.

Array functions (NumPy in, NumPy out; shapes and dtypes in each docstring):

- `normalise(stack, method)` -- (Z, H, W) -> float32, each slice normalised as in training
  (`nf1prov.data.inputs`: ``dtype_max``, upstream's, or ``percentile``).
- `slice_windows(depth, input_slices)` (from `nf1prov.data.inputs`) -- the input slices of each
  centre slice. Edge slices use **clamped** windows: a slice index outside the stack is replaced
  by the nearest slice (the first or last), so a stack of any depth Z >= 1 can be predicted, a
  single 2-D image included.
- `blend_window(tile_size)` -- the separable raised-cosine (Hann) weight of one tile.
- `predict_stack(model, stack, ...)` -- float32 (3, Z, H, W) per-class probabilities.

Tiling. Each slice is reflect-padded by ``overlap // 2`` on every side (so that image borders get
real context) and then at the bottom/right up to a whole tile grid of stride
``tile_size - overlap``; ``tile_size`` is the training crop size, a multiple of 16, so every
tile is a valid UNet input. Tiles of every slice are cut, run through the model in batches on its
device, weighted by a separable window ``w(i) = sin^2(pi (i + 0.5) / T)`` (smooth, strictly
positive, ~0 at tile edges where zero-padded convolutions are least reliable) and added up; the
sum is divided by the summed weights. With 50 % overlap the weights of the Hann window add up to
a constant, so tile borders leave no seams. ``tile_size=None`` predicts each whole slice in a
single pass (reflect-padded to a multiple of 16), the reference the tiling is tested against.

Probabilities are per-class sigmoids of the logits (the model is trained with per-class BCE,
DESIGN 4), so the three channels need not sum to 1; the class map is their argmax.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nf1prov.data.inputs import normalise, slice_windows
from nf1prov.errors import UserError
from nf1prov.instances import PARAM_PREFIX, POSTPROCESS_ARTIFACT, PostProcess
from nf1prov.weights import load as load_weights
from nf1prov.weights import read_architecture

CLASS_NAMES = ("background", "inner-cell", "cell-boundary")


# ---------------------------------------------------------------------------------------------
# Array functions
# ---------------------------------------------------------------------------------------------

def blend_window(tile_size: int) -> np.ndarray:
    """Separable raised-cosine tile weight: float32 (T, T), ``w(i) w(j)`` with
    ``w(i) = sin^2(pi (i + 0.5) / T)``; strictly positive, maximal at the centre."""
    w = np.sin(np.pi * (np.arange(tile_size) + 0.5) / tile_size) ** 2
    return np.outer(w, w).astype(np.float32)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one (H, W) slice go, in the coordinates of the padded slice.

    ``pad`` is ((top, bottom), (left, right)) reflect padding; ``origins`` int64 (N, 2) holds the
    (y, x) of each tile's top-left corner; the image occupies
    ``[top:top + H, left:left + W]`` of the padded slice.
    """

    tile_size: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    origins: np.ndarray
    padded_shape: tuple[int, int]


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> TileGrid:
    """The tile grid covering an (H, W) slice with square tiles of ``tile_size`` overlapping by
    ``overlap`` pixels (0 <= overlap < tile_size); see the module docstring."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), not {overlap}")
    stride = tile_size - overlap
    margin = overlap // 2
    pads, starts = [], []
    for size in (height, width):
        covered = size + 2 * margin
        n = max(1, math.ceil((covered - tile_size) / stride) + 1)
        total = (n - 1) * stride + tile_size
        pads.append((margin, total - size - margin))
        starts.append(np.arange(n) * stride)
    ys, xs = np.meshgrid(starts[0], starts[1], indexing="ij")
    origins = np.stack([ys.ravel(), xs.ravel()], axis=1)
    padded = (height + sum(pads[0]), width + sum(pads[1]))
    return TileGrid(tile_size, (pads[0], pads[1]), origins, padded)


def predict_stack(
    model,
    stack: np.ndarray,
    *,
    input_slices: int,
    tile_size: int | None,
    overlap: int | None = None,
    batch_size: int = 8,
    device=None,
    normalisation: str = "dtype_max",
    slices: Iterable[int] | None = None,
    progress: bool = False,
    description: str = "",
) -> np.ndarray:
    """Per-class probabilities of every slice of a z-stack.

    ``model``: a torch module mapping float32 (N, input_slices, h, w) with h, w multiples of 16
    to (N, 3, h, w) logits; it is put in eval mode. ``stack``: (Z, H, W) or (H, W) image,
    normalised slice by slice with ``normalisation`` (the model's ``data.normalisation``:
    ``dtype_max`` needs unsigned integers). ``tile_size``: the training crop size (a multiple
    of 16), or None for one pass per whole slice. ``overlap``: tile overlap in pixels (default
    ``tile_size // 2``). ``batch_size``: tiles per forward pass. ``device``: a torch device (default
    the model's; CUDA runs under autocast, as training does). ``slices``: the centre slices to
    predict (default all; their input windows still come from the whole stack). Returns float32
    (3, Z, H, W) sigmoid probabilities (Z = the number of ``slices``).
    """
    import torch

    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"stack must be (Z, H, W) or (H, W), not shape {stack.shape}")
    depth, height, width = stack.shape
    image = normalise(stack, normalisation)
    windows = slice_windows(depth, input_slices)
    if slices is not None:
        windows = windows[np.asarray(list(slices), dtype=np.int64)]
        depth = len(windows)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.eval()

    if tile_size is None:
        pad_h, pad_w = (-height) % 16, (-width) % 16
        grid = TileGrid(0, ((0, pad_h), (0, pad_w)), np.zeros((1, 2), np.int64),
                        (height + pad_h, width + pad_w))
        tile_h, tile_w = grid.padded_shape
        weight_tile = np.ones((tile_h, tile_w), np.float32)
    else:
        if tile_size % 16:
            raise ValueError(f"tile_size must be a multiple of 16, not {tile_size}")
        overlap = tile_size // 2 if overlap is None else overlap
        grid = tile_grid(height, width, tile_size, overlap)
        tile_h = tile_w = tile_size
        weight_tile = blend_window(tile_size)
    (top, bottom), (left, right) = grid.pad
    padded = np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")

    acc = np.zeros((3, depth, *grid.padded_shape), np.float32)
    weight_sum = np.zeros(grid.padded_shape, np.float32)
    for y, x in grid.origins:
        weight_sum[y:y + tile_h, x:x + tile_w] += weight_tile
    weight_t = torch.from_numpy(weight_tile).to(device)

    # Every (slice, tile) pair is one item; batches run across slice boundaries.
    n_tiles = len(grid.origins)
    items = np.stack(np.meshgrid(np.arange(depth), np.arange(n_tiles), indexing="ij"),
                     axis=-1).reshape(-1, 2)
    bar = _progress(len(items), description, progress)
    # Mixed precision on CUDA, as in training (DESIGN 4); exact float32 on the CPU.
    autocast = torch.autocast("cuda", enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            tiles = np.stack([
                padded[windows[z], y:y + tile_h, x:x + tile_w]
                for z, (y, x) in zip(batch[:, 0], grid.origins[batch[:, 1]], strict=True)
            ])
            inputs = torch.from_numpy(tiles).to(device)
            probs = (torch.sigmoid(model(inputs).float()) * weight_t).cpu().numpy()
            for prob, z, (y, x) in zip(probs, batch[:, 0], grid.origins[batch[:, 1]],
                                       strict=True):
                acc[:, z, y:y + tile_h, x:x + tile_w] += prob
            bar.update(len(batch))
    bar.close()
    acc /= weight_sum
    return np.ascontiguousarray(acc[:, :, top:top + height, left:left + width])


def class_map(prob: np.ndarray) -> np.ndarray:
    """uint8 argmax class map of (3, ...) probabilities: shape (...)."""
    return np.argmax(prob, axis=0).astype(np.uint8)


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description or None, unit="tile", disable=not enabled,
                leave=False)


# ---------------------------------------------------------------------------------------------
# Models: loading by codename, run ID or local folder
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to predict, with the training settings it must be used with.

    ``config`` is the run's resolved training config (``config/config.toml``) as a nested dict;
    ``run_id``/``codename`` are None for a local folder that is not tied to a run.
    ``postprocess``: the instance parameters the model was given at the end of training
    (`nf1prov.instances`), what `predict` and `evaluate` use unless told otherwise.
    """

    model: object
    config: dict
    source: str
    device: object
    run_id: str | None = None
    codename: str | None = None
    sha: str | None = None
    postprocess: PostProcess = field(default_factory=PostProcess)
    extra: dict = field(default_factory=dict)

    @property
    def input_slices(self) -> int:
        return int(self.config["data"]["input_slices"])

    @property
    def tile_size(self) -> int:
        return int(self.config["data"]["crop_size"])

    @property
    def normalisation(self) -> str:
        return str(self.config["data"].get("normalisation", "dtype_max"))

    @property
    def boundary_thickness(self) -> int:
        return int(self.config["data"]["boundary_thickness"])

    @property
    def label(self) -> str:
        return self.codename or self.run_id or self.source

    def predict(self, stack: np.ndarray, **options) -> np.ndarray:
        """`predict_stack` of ``stack`` the way the model was trained (input slices, tile size,
        normalisation) on its device; ``options``: overlap, batch_size, progress..."""
        return predict_stack(self.model, stack, input_slices=self.input_slices,
                             tile_size=self.tile_size, device=self.device,
                             normalisation=self.normalisation, **options)


def pick_device(name: str | None = "auto"):
    """torch.device for 'auto' (CUDA when available), 'cpu' or 'cuda'."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: "
                        "use --device cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {name!r}.")
    return torch.device(name)


def read_config_file(path: Path) -> dict:
    """The resolved training config logged with a model, as a nested dict.

    Only the keys inference needs are checked (``data.input_slices``, ``data.crop_size``); a
    config written by an older or newer nf1prov with other keys still loads.
    """
    try:
        config = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"Cannot read the model's training config {path}: {exc}. It should be "
                        "the run artifact config/config.toml.") from None
    data = config.get("data", {})
    for key in ("input_slices", "crop_size"):
        if not isinstance(data.get(key), int):
            raise UserError(f"The model's training config {path} has no integer data.{key}; "
                            "it is needed to predict the way the model was trained.")
    data.setdefault("boundary_thickness", 2)
    data.setdefault("holdout_patients", [])
    return config


def find_local_config(model_dir: Path) -> Path:
    """``config.toml`` beside an MLflow model folder, or ``../config/config.toml`` (the layout
    ``nf1prov checkout`` writes: ``.nf1prov/models/<codename>/{model,config}/``)."""
    for candidate in (model_dir / "config.toml", model_dir.parent / "config" / "config.toml"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"Model folder {model_dir} has no training config: expected {model_dir / 'config.toml'} "
        f"or {model_dir.parent / 'config' / 'config.toml'} (the run artifact config/config.toml). "
        "Copy it there, or pass the model's codename or run ID instead."
    )


def load_model(ref: str, *, client=None, tracking_uri: str | None = None,
               run_id: str | None = None, device: str | None = "auto") -> LoadedModel:
    """Load a model by local model folder, codename or run ID.

    A path that exists is a local folder holding ``weights.pt`` and ``architecture.json`` (the
    run artifact ``model/``, e.g. ``.nf1prov/models/<codename>/model`` after ``nf1prov
    checkout``), with its config beside it (`find_local_config`); anything else is resolved
    through the tracking store with `nf1prov.resolve.resolve_model` (``run_id`` picks one of
    several runs of a codename) and its ``model/`` and ``config/config.toml`` artifacts are
    downloaded. The weights are tensors only; the architecture's code is the installed one when
    it is the code the model was trained with, else the model's own from the git repository
    around the working directory (`nf1prov.weights`).
    """
    torch_device = pick_device(device)
    repo = _enclosing_repo()
    path = Path(ref).expanduser()
    if path.exists():
        read_architecture(path, ref)  # a clear error for a folder of another kind, before config
        config_path = find_local_config(path)
        config = read_config_file(config_path)
        model = load_weights(path, ref=ref, device=torch_device, repo=repo)
        chosen = config_path.parent / Path(POSTPROCESS_ARTIFACT).name
        loaded = LoadedModel(model, config, str(path), torch_device,
                             postprocess=model_postprocess(config, chosen_file=chosen))
    else:
        if client is None:
            raise UserError(f"{ref!r} is not a local model folder, and no MLflow tracking store "
                            "was given to look it up as a codename or run ID.")
        import tempfile

        import mlflow.artifacts

        from nf1prov.resolve import resolve_model

        resolved = resolve_model(client, ref, run_id=run_id)
        run_id = resolved.run_id
        uri = tracking_uri or client.tracking_uri
        with tempfile.TemporaryDirectory(prefix="nf1prov-model-") as tmp:
            downloaded = {}
            for artifact in ("config/config.toml", "model"):
                try:
                    downloaded[artifact] = Path(mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=artifact, dst_path=tmp,
                        tracking_uri=uri))
                except Exception as exc:
                    raise UserError(f"Model {ref!r} (run {run_id}) has no {artifact} artifact "
                                    f"({exc}); it cannot be used for prediction.") from None
            config = read_config_file(downloaded["config/config.toml"])
            model = load_weights(downloaded["model"], ref=ref, device=torch_device, repo=repo,
                                 codename=resolved.codename)
        loaded = LoadedModel(model, config, ref, torch_device, run_id=run_id,
                             codename=resolved.codename, sha=resolved.sha,
                             postprocess=model_postprocess(config, params=resolved.run.data.params))
    in_channels = getattr(loaded.model, "in_channels", None)
    if in_channels is not None and in_channels != loaded.input_slices:
        raise UserError(f"Model {ref!r} takes {in_channels} input channels but its config says "
                        f"data.input_slices = {loaded.input_slices}; the config artifact does not "
                        "belong to this model.")
    return loaded


def _enclosing_repo() -> Path | None:
    """The git work tree around the working directory, if any: where an old model's
    architecture source is looked up."""
    from nf1prov.provenance import git

    try:
        return git.repo_root(Path.cwd())
    except UserError:
        return None


def model_postprocess(config: dict, *, params: dict | None = None,
                      chosen_file: Path | None = None) -> PostProcess:
    """The instance parameters a model uses: those chosen at the end of its training (run params
    ``instances.*``, or the ``config/instances.json`` artifact beside a local model folder), else
    its config's ``[postprocess]`` values, else the argmax rule of models trained before."""
    chosen = PostProcess.from_mapping(params or {}, prefix=PARAM_PREFIX)
    if chosen is None and chosen_file is not None and chosen_file.is_file():
        try:
            chosen = PostProcess.from_mapping(json.loads(chosen_file.read_text("utf-8")))
        except (OSError, ValueError) as exc:
            raise UserError(f"Cannot read the model's instance parameters {chosen_file}: {exc}. "
                            "Delete the file to use the config's [postprocess] values.") from None
    if chosen is None:
        chosen = PostProcess.from_mapping(config.get("postprocess", {}))
    return chosen or PostProcess()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

TIFF_SUFFIXES = (".tif", ".tiff")
# What `write_outputs` names its files: a folder of earlier predictions is not an input.
OUTPUT_ENDINGS = ("_probabilities.tif", "_probabilities.ome.tif", "_classes.ome.tif",
                  "_labels.ome.tif")


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
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.shape, series.dtype, series.axes, (series.asarray() if read else None)
    except Exception as exc:
        raise UserError(f"Cannot read {path} as a TIFF image: {exc}.") from None


def read_stack(path: Path, normalisation: str = "dtype_max") -> np.ndarray:
    """A brightfield image file as a (Z, H, W) array; a 2-D image becomes Z = 1.

    Raises UserError naming the file when a model normalising with ``normalisation`` cannot
    take it (see `check_stack`).
    """
    shape, dtype, axes, data = _open_series(path, read=True)
    return data.reshape(check_stack(path, shape, dtype, axes, normalisation))


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


def write_outputs(outdir: Path, stem: str, prob: np.ndarray, labels: np.ndarray,
                  probabilities_dtype: str = "float16") -> PredictionFiles:
    """Write one stack's predictions under ``outdir``:

    - ``<stem>_probabilities.ome.tif``: float32 (C, Z, Y, X) OME-TIFF, channels named by class;
      with float16 (the default, half the size) ``<stem>_probabilities.tif`` instead, because
      OME-XML has no half-float pixel type: a tifffile "shaped" TIFF whose JSON description
      holds the axes ``CZYX`` (``tifffile.TiffFile(...).series[0].axes``);
    - ``<stem>_classes.ome.tif``: uint8 (Z, Y, X) class map (argmax), OME-TIFF;
    - ``<stem>_labels.ome.tif``: uint16/uint32 (Z, Y, X) instance labels, OME-TIFF.
    """
    import tifffile

    outdir.mkdir(parents=True, exist_ok=True)
    if probabilities_dtype == "float16":
        prob_path = outdir / f"{stem}_probabilities.tif"
        tifffile.imwrite(prob_path, prob.astype(np.float16), metadata={"axes": "CZYX"})
    else:
        prob_path = outdir / f"{stem}_probabilities.ome.tif"
        tifffile.imwrite(prob_path, prob.astype(np.float32), ome=True,
                         metadata={"axes": "CZYX", "Channel": {"Name": list(CLASS_NAMES)}})
    files = PredictionFiles(prob_path, outdir / f"{stem}_classes.ome.tif",
                            outdir / f"{stem}_labels.ome.tif", int(labels.max(initial=0)))
    tifffile.imwrite(files.classes, class_map(prob), ome=True, compression="zlib",
                     metadata={"axes": "ZYX"})
    tifffile.imwrite(files.labels, labels, ome=True, compression="zlib",
                     metadata={"axes": "ZYX"})
    return files


def predict_files(loaded: LoadedModel, inputs: Iterable[str], outdir: Path, *,
                  postprocess: PostProcess | None = None, batch_size: int = 8,
                  overlap: int | None = None, probabilities_dtype: str = "float16",
                  progress: bool = True) -> Iterator[tuple[Path, PredictionFiles]]:
    """Predict every input file and write its outputs; yields (input, PredictionFiles).

    ``postprocess``: instance parameters (default: the model's, ``loaded.postprocess``).
    Outputs mirror each input's location relative to the folder it was found in, so
    same-named stacks of different patients do not overwrite each other.
    """
    if probabilities_dtype not in ("float16", "float32"):
        raise UserError(f"--probabilities-dtype must be float16 or float32, "
                        f"not {probabilities_dtype!r}.")
    postprocess = postprocess or loaded.postprocess
    pairs = expand_inputs(inputs)
    for path, _ in pairs:  # check every header before predicting any: a bad file fails fast
        check_stack(path, *_open_series(path, read=False)[:3], loaded.normalisation)
    outdir = Path(outdir)
    for path, base in pairs:
        stack = read_stack(path, loaded.normalisation)
        rel = path.parent.relative_to(base)
        prob = loaded.predict(stack, overlap=overlap, batch_size=batch_size, progress=progress,
                              description=path.name)
        yield path, write_outputs(outdir / rel, output_stem(path), prob,
                                  postprocess.segment(prob), probabilities_dtype)
