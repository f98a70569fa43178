"""A trained model as a bioimage.io model package (``rdf.yaml`` format 0.5, DESIGN 3.9):
`nf1prov export CODENAME --format bioimageio -o OUT.zip`.

What goes into the zip (docs/sharing.md has the reader's side):

- weights twice: ``pytorch_state_dict`` (the run's ``model/weights.pt`` as logged, with the
  architecture's source file read from the model's own commit, checked against the git blob
  recorded beside the weights) and ``torchscript`` (the same model scripted on the CPU in eval
  mode, parent ``pytorch_state_dict``);
- one input ``raw``: axes batch, channel (the ``input_slices`` z-slices around the predicted
  slice, named ``z-1, z, z+1``), y, x of any size that is a multiple of 16; preprocessing that
  repeats the model's ``data.normalisation`` (`preprocessing`);
- one output ``probabilities``: batch, channel (background, inner-cell, cell-boundary), y, x
  sized from the input; postprocessing ``sigmoid``, as nf1prov turns logits into
  probabilities (`nf1prov.segment.predict`);
- test tensors cut from one validation stack of the model's own split manifest
  (`make_test_tensors`) and the expected output computed with nf1prov's own prediction
  (`predict_stack`);
- ``README.md`` from the catalogue entry (`documentation`), the git author of the model commit as
  author, licence and citation from the model's ``[export]`` config, the training config as an
  attachment, and in ``config.nf1prov`` the codename, commit SHA, run ID, tracking URI and the
  sha256 of the logged split manifest.

Array functions state shapes and dtypes; `export_model` is the whole flow. The zip is written
beside ``OUT`` under a temporary name and renamed into place last, so a failure leaves no file
(and an existing ``OUT`` untouched).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from nf1prov import catalog, git, tracking
from nf1prov.data.inputs import PERCENTILES, dtype_maximum, normalise, slice_windows
from nf1prov.data.manifest import sha256_file
from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.errors import CheckFailed, UserError
from nf1prov.provenance.models import model_postprocess
from nf1prov.provenance.resolve import ResolvedModel
from nf1prov.segment.files import read_stack
from nf1prov.segment.predict import predict_stack
from nf1prov.weights import WEIGHTS_FILE, model_files

INSTALL_HINT = ("pip install -e '.[export]' in the nf1prov repository (or: pip install "
                "'bioimageio.core>=0.11' 'pydantic<2.12') into the environment nf1prov runs in")
INPUT_ID = "raw"
OUTPUT_ID = "probabilities"
SIZE_STEP = 16  # the UNet halves its input four times
TEST_SIZE = 64  # largest side of the test tensors (smaller when the crop size or image is)
SCALE_RANGE_EPS = 1e-6  # bioimage.io's default; scale_range needs one > 0
ARTIFACTS = ("model", "config", "manifest")
MANIFEST_ARTIFACT = Path("manifest") / "split_manifest.csv"
CONFIG_ARTIFACT = Path("config") / "config.toml"
# bioimage.io tags of every nf1prov model (one per category it knows, where one fits)
TAGS = ("semantic-segmentation", "cells", "transmission-light-microscopy", "2d", "pytorch",
        "unet", "brightfield", "organoids", "nf1", "nf1prov")
IO_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
             "float32", "float64")


def require_bioimageio() -> None:
    """Raise UserError saying how to install bioimageio.core when it is missing."""
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise UserError(f"nf1prov export needs bioimageio.core, which is not installed here "
                        f"({exc}). Install the optional extra: {INSTALL_HINT}.") from None
    import pydantic

    spec, ours = bioimageio.spec.__version__, pydantic.VERSION
    if spec.startswith("0.5.12") and tuple(int(p) for p in ours.split(".")[:2]) >= (2, 12):
        raise UserError(f"bioimageio.spec {spec} cannot write packages under pydantic {ours} "
                        "(its serializers break from pydantic 2.12 on; fixed in bioimageio.spec "
                        "0.5.14, which bioimageio.core 0.11 does not accept yet): run "
                        "`pip install 'pydantic<2.12'` (nf1prov's [export] extra pins it).")


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------

def channel_names(input_slices: int) -> list[str]:
    """Names of the input channels, the slices around the predicted one: ``["z-1", "z", "z+1"]``
    for 3 (``["z"]`` for 1)."""
    half = input_slices // 2
    return [f"z{k:+d}" if k else "z" for k in range(-half, half + 1)]


def crop_side(height: int, width: int, crop_size: int, limit: int = TEST_SIZE) -> int:
    """The side of the square test tensors: the largest multiple of 16 that fits the image and
    is at most ``limit`` and the training crop size. Raises UserError for an image smaller than
    16 pixels."""
    side = min(limit, crop_size, height, width) // SIZE_STEP * SIZE_STEP
    if side < SIZE_STEP:
        raise UserError(f"The validation image is {height}x{width} pixels: a test tensor needs "
                        f"at least {SIZE_STEP}x{SIZE_STEP}.")
    return side


def centre_window(stack: np.ndarray, input_slices: int, size: int) -> np.ndarray:
    """The model's input window of a (Z, H, W) stack's centre slice, cropped at the centre:
    (input_slices, size, size), dtype kept. A window reaching past the stack repeats its
    first/last slice, as nf1prov's prediction does (`slice_windows`)."""
    if stack.ndim == 2:
        stack = stack[None]
    depth, height, width = stack.shape
    top, left = (height - size) // 2, (width - size) // 2
    window = stack[slice_windows(depth, input_slices)[depth // 2]]
    return np.ascontiguousarray(window[:, top:top + size, left:left + size])


def make_test_tensors(model, window: np.ndarray, *,
                      normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """The test input and the output nf1prov expects from it.

    ``model``: a torch module on the CPU mapping (N, S, h, w) to (N, 3, h, w) logits.
    ``window``: (S, h, w) raw image slices (h, w multiples of 16), as read from the file.
    Returns the input, the window as (1, S, h, w) with its dtype, and float32 (1, 3, h, w)
    probabilities of its centre slice computed the way `nf1prov predict` does: each slice
    normalised with ``normalisation``, one pass (no tiling), sigmoid of the logits.
    """
    slices = window.shape[0]
    prob = predict_stack(model, window, input_slices=slices, tile_size=None,
                         normalisation=normalisation, slices=[slices // 2], device="cpu")
    return window[None], np.ascontiguousarray(prob[:, 0][None], dtype=np.float32)


def torchscript(model, example: np.ndarray):
    """``model`` compiled with TorchScript on the CPU in eval mode (``torch.jit.script``, else
    ``torch.jit.trace`` on ``example``, a float32 (N, S, h, w) input), checked to give the same
    logits as the module on ``example``. Raises UserError when neither works."""
    import warnings

    import torch

    module = copy.deepcopy(model).to("cpu").eval()
    inputs = torch.from_numpy(np.asarray(example, dtype=np.float32))
    with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern
        warnings.simplefilter("ignore")
        try:
            compiled = torch.jit.script(module)
        except Exception:
            with torch.no_grad():
                compiled = torch.jit.trace(module, inputs, check_trace=False)
    with torch.no_grad():
        expected, got = module(inputs), compiled(inputs)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise UserError("The model's TorchScript version does not reproduce its outputs "
                        f"(largest difference {float((expected - got).abs().max()):.3g}); its "
                        "architecture uses something TorchScript cannot express.")
    return compiled


def cover(image: np.ndarray, prob: np.ndarray, title: str = "", min_side: int = 256
          ) -> np.ndarray:
    """The package's cover: uint8 RGB (s, 2s, 3), the float (h, w) input slice in grey beside
    the argmax class map of its (3, h, w) probabilities in nf1prov's class colours, enlarged by
    a whole factor to at least ``min_side`` pixels, under ``title`` and the class legend
    (`nf1prov.segment.pictures.cover_picture`, the colours of every nf1prov picture)."""
    from nf1prov.segment.pictures import cover_picture

    return np.asarray(cover_picture(image, prob, title=title, min_side=min_side))


def save_cover(path: Path, image: np.ndarray, prob: np.ndarray, title: str = "") -> None:
    """Write `cover` of ``image`` and ``prob`` as a PNG."""
    from PIL import Image

    Image.fromarray(cover(image, prob, title)).save(path)


# ---------------------------------------------------------------------------------------------
# bioimage.io descriptions
# ---------------------------------------------------------------------------------------------

def preprocessing(normalisation: str, dtype: np.dtype) -> list:
    """bioimage.io preprocessing steps equal to nf1prov's ``normalisation`` of an image of
    ``dtype`` (`nf1prov.data.inputs`), each slice (channel) on its own:

    - ``dtype_max``: ``scale_linear`` with gain 1 / the dtype's maximum (e.g. 1/65535);
    - ``percentile``: ``scale_range`` over y and x per sample and channel, percentiles 1 and 99.8,
      no clipping; bioimage.io adds ``eps`` (1e-6) to the range (docs/sharing.md).
    Each list starts and ends with ``ensure_dtype`` float32.
    """
    from bioimageio.spec.model import v0_5

    float32 = v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))
    if normalisation == "dtype_max":
        scale = v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(
            gain=1.0 / dtype_maximum(dtype), offset=0.0))
    elif normalisation == "percentile":
        scale = v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
            axes=[v0_5.AxisId("y"), v0_5.AxisId("x")], min_percentile=PERCENTILES[0],
            max_percentile=PERCENTILES[1], eps=SCALE_RANGE_EPS))
    else:
        raise UserError(f"The model's data.normalisation {normalisation!r} has no bioimage.io "
                        "equivalent in this version of nf1prov.")
    return [float32, scale, copy.deepcopy(float32)]


def input_descr(input_slices: int, dtype: np.dtype, normalisation: str, test_file: Path,
                sample_file: Path):
    """The input tensor ``raw``: (batch, channel = slices, y, x), y and x any multiple of 16;
    ``test_file`` (.npy) and ``sample_file`` (.tif) hold the test input."""
    from bioimageio.spec.model import v0_5

    dtype = np.dtype(dtype)
    if dtype.name not in IO_DTYPES:
        raise UserError(f"The validation image has dtype {dtype}, which bioimage.io cannot "
                        f"describe (it takes {', '.join(IO_DTYPES)}).")
    top = dtype_maximum(dtype) if normalisation == "dtype_max" else None
    size = v0_5.ParameterizedSize(min=SIZE_STEP, step=SIZE_STEP)
    return v0_5.InputTensorDescr(
        id=v0_5.TensorId(INPUT_ID),
        description=(f"{input_slices} consecutive brightfield z-slices, the predicted slice in "
                     "the middle (repeat the first/last slice at the stack's ends)"),
        axes=[v0_5.BatchAxis(),
              v0_5.ChannelAxis(channel_names=channel_names(input_slices)),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=copy.deepcopy(size))],
        test_tensor=v0_5.FileDescr(source=test_file),
        sample_tensor=v0_5.FileDescr(source=sample_file),
        data=v0_5.IntervalOrRatioDataDescr(type=dtype.name,
                                           range=(0.0 if top else None, top)),
        preprocessing=preprocessing(normalisation, dtype),
    )


def output_descr(test_file: Path, sample_file: Path):
    """The output tensor ``probabilities``: (batch, channel = the three classes, y, x) sized
    like the input; per-class sigmoid probabilities (they need not sum to 1)."""
    from bioimageio.spec.model import v0_5

    def same_as_input(axis: str):
        return v0_5.SpaceOutputAxis(id=v0_5.AxisId(axis), size=v0_5.SizeReference(
            tensor_id=v0_5.TensorId(INPUT_ID), axis_id=v0_5.AxisId(axis)))

    return v0_5.OutputTensorDescr(
        id=v0_5.TensorId(OUTPUT_ID),
        description="per-class probabilities (sigmoid of the logits) of the centre slice",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(CLASS_NAMES)),
              same_as_input("y"), same_as_input("x")],
        test_tensor=v0_5.FileDescr(source=test_file),
        sample_tensor=v0_5.FileDescr(source=sample_file),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[v0_5.SigmoidDescr(),
                        v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))],
    )


def check_licence(licence: str) -> None:
    """Raise UserError unless bioimage.io knows ``licence`` as an SPDX id."""
    from bioimageio.spec.model import v0_5

    for kind in (v0_5.LicenseId, v0_5.DeprecatedLicenseId):
        try:
            kind(licence)
            return
        except ValueError:
            continue
    raise UserError(f"export.license {licence!r} is not an SPDX licence id bioimage.io knows "
                    "(https://spdx.org/licenses/, e.g. MIT, BSD-3-Clause, CC-BY-4.0): pass one "
                    "with --set export.license=ID.")


def required_settings(settings: dict, where: str) -> None:
    """Raise UserError naming every ``[export]`` key a package needs that is empty, with the
    ``--set`` of each."""
    missing = [key for key in ("license", "cite_text") if not settings[key]]
    if not settings["cite_doi"] and not settings["cite_url"]:
        missing.append("cite_doi")
    if not missing:
        check_licence(settings["license"])
        return
    examples = {"license": "export.license=MIT",
                "cite_text": '"export.cite_text=Our lab, NF1 organoid segmentation (2025)"',
                "cite_doi": "export.cite_doi=10.5281/zenodo.1234567 (or export.cite_url=URL)"}
    raise UserError(
        f"{where} has no {', '.join('export.' + k for k in missing)}, which a bioimage.io "
        f"package requires. Pass {'it' if len(missing) == 1 else 'them'} to this command: "
        f"{' '.join('--set ' + examples[k] for k in missing)}; add an [export] section to the "
        "config of future models to record it with them. Nothing was written.")


def commit_author(root: Path, sha: str) -> tuple[str, str]:
    """(name, email) of the git author of commit ``sha``."""
    out = git.git("log", "-1", "--format=%an%x00%ae", git.validate_sha(sha), "--", cwd=root)
    name, _, email = out.stdout.strip().partition("\0")
    return name, email


def architecture_source(root: Path, sha: str, arch) -> bytes:
    """The bytes of the architecture's source file in the model's commit ``sha``, checked
    against the git blob recorded with the weights (``arch``: `nf1prov.weights.Architecture`)."""
    from nf1prov.weights import blob_hash

    spec = f"{git.validate_sha(sha)}:{arch.source_path}"
    # The bytes, hashed here: the recorded blob is a SHA-1 one, whatever the repository's
    # object format (a SHA-256 repository names the same blob otherwise).
    proc = git.git("cat-file", "blob", spec, cwd=root, check=False, text=False)
    blob = blob_hash(proc.stdout) if proc.returncode == 0 else None
    if blob != arch.source_blob:
        found = f"holds blob {blob[:12]} as" if blob else "has no"
        raise UserError(f"The model's commit {sha[:12]} {found} {arch.source_path}, but its "
                        f"weights were trained with blob {arch.source_blob[:12]}: the package's "
                        "architecture must be that code. Check the model's tag and run "
                        "(`nf1prov show CODENAME`).")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestData:
    fov_id: str  # "<patient>/<well>-<site>"
    image: Path  # the stack the test tensors were cut from
    input: np.ndarray  # (1, S, h, w), the file's dtype
    output: np.ndarray  # float32 (1, 3, h, w)


@dataclass(frozen=True)
class Exported:
    path: Path
    codename: str
    sha: str
    run_id: str
    test: TestData
    status: str | None  # bioimage.io's test_model verdict (`check_package`), None when not run


def validation_image(manifest_path: Path, root: Path, data_root: Path | None) -> tuple[str, Path]:
    """(fov id, local image path) of the first validation field of a split manifest, its bytes
    checked against the recorded sha256. ``data_root`` re-roots the recorded paths (the data
    moved, or the model was trained on another machine)."""
    import pandas as pd

    manifest = pd.read_csv(manifest_path)
    val = manifest[manifest["split"] == "val"].sort_values("fov_id")
    if val.empty:
        raise UserError(f"The model's split manifest ({MANIFEST_ARTIFACT}) has no validation "
                        "field of view to cut the test tensors from.")
    row = val.iloc[0]
    recorded = Path(row["image_path"])
    if data_root is not None:  # <root>/<patient>/zstack_images/<fov>/<file> (DESIGN 3.5)
        path = Path(data_root).joinpath(*recorded.parts[-4:])
    else:
        path = recorded if recorded.is_absolute() else root / recorded
    if not path.is_file():
        raise UserError(f"The model's validation image {path} (field {row['fov_id']}) is not "
                        "here: the test tensors are cut from it. Pass --data-root DIR pointing "
                        "at the data the model was trained on.")
    if sha256_file(path) != row["image_sha256"]:
        raise UserError(f"{path} is not the file the model was trained on (its sha256 differs "
                        "from the split manifest's): point --data-root at the original data.")
    return str(row["fov_id"]), path


def documentation(entry_md: str, provenance: dict, test: TestData, settings: dict) -> str:
    """The package's README.md: the catalogue entry (``entry_md``, rendered Markdown), what the
    tensors hold, what is approximate, validation, provenance (``provenance``: the rdf's
    ``config.nf1prov``), licence and citation (``settings``: the ``[export]`` values)."""
    codename, input_slices = provenance["codename"], provenance["input_slices"]
    normalisation = provenance["normalisation"]
    names = ", ".join(channel_names(input_slices))
    if normalisation == "dtype_max":
        norm = ("each slice divided by its dtype's maximum (65535 for uint16, 255 for uint8): "
                "`scale_linear`, exact. Give the model images of the dtype it was trained on "
                f"({test.input.dtype}).")
    else:
        norm = (f"each slice mapped from its {PERCENTILES[0]:g} % .. {PERCENTILES[1]:g} % "
                "percentiles to 0..1, not clipped: `scale_range` over y and x. bioimage.io adds "
                f"eps = {SCALE_RANGE_EPS:g} to the range, and computes the percentiles on the "
                "tensor it is given, where nf1prov uses the whole slice: give whole slices, not "
                "tiles, for the same values.")
    cite = f"https://doi.org/{settings['cite_doi']}" if settings["cite_doi"] else \
        settings["cite_url"]
    run_line = f" ([MLflow UI]({provenance['run_url']}))" if provenance.get("run_url") else ""
    return f"""# NF1 organoid cell segmentation: {codename}

A UNet trained with nf1prov on brightfield z-stacks of NF1 patient-derived organoids. It
predicts, for one z-slice, three classes: background, inner-cell and cell-boundary (per-class
probabilities).

## The model (nf1prov catalogue)

{entry_md.strip()}

## Inputs and outputs

- **Input `{INPUT_ID}`** (batch, channel, y, x): {input_slices} consecutive z-slices ({names}),
  the predicted slice in the middle; at the first and last slices of a stack, repeat the edge
  slice. y and x: any multiple of 16 (nf1prov reflect-pads an image to one).
- **Preprocessing**: {norm}
- **Output `{OUTPUT_ID}`** (batch, channel, y, x): background, inner-cell, cell-boundary. The
  network's logits go through a sigmoid (postprocessing), as in nf1prov: the three
  probabilities need not sum to 1; the class map is their argmax.

## What differs from `nf1prov predict`

- nf1prov predicts a whole slice in tiles of the training crop size overlapping by half, blended
  with raised-cosine ramps; a bioimage.io consumer tiles (or not) in its own way, so results
  differ slightly near tile borders.
- Instance labels (one label per cell) are nf1prov's own post-processing of these
  probabilities (`nf1prov predict`); they are not part of this package.

## Validation

The validation and holdout Dice above are nf1prov's per-class scores at threshold 0.5 (holdout
scores appear once `nf1prov evaluate` has run). The test tensors come from the validation field
of view `{test.fov_id}` (centre slice, {test.input.shape[-2]}x{test.input.shape[-1]} centre
crop); the expected output is nf1prov's own prediction of that crop. To validate on new data,
compare the argmax class map with instance masks converted to the three classes
(`nf1prov.data.semantic.instance_to_semantic`) or run `nf1prov evaluate`.

## Provenance

- Codename: `{codename}`
- Commit: `{provenance['commit']}` (git tag `{provenance['git_tag']}`); `nf1prov checkout
  {codename}` gets its code
- MLflow run: `{provenance['run_id']}`{run_line}, tracking store `{provenance['tracking_uri']}`
- Split manifest sha256: `{provenance['data_manifest_sha256']}`
- Training config: `config.toml` (attached)

## Licence and citation

{settings['license']}. Cite: {settings['cite_text']}{f' ({cite})' if cite else ''}.
"""


def export_model(root: Path, client, tracking_uri: str, model: ResolvedModel, output: Path, *,
                 overrides: tuple[str, ...] = (), data_root: Path | None = None,
                 test: bool = True) -> Exported:
    """Write ``model`` (resolved against the repository ``root``) as a bioimage.io package at
    ``output``; see the module docstring. ``test``: check the zip with bioimage.io's
    `test_model` before it takes the name ``output`` (`write_package`). Raises UserError (or
    CheckFailed) with nothing written."""
    from nf1prov.config import export_settings
    from nf1prov.provenance.models import load_model, read_config_file
    from nf1prov.weights import read_architecture

    require_bioimageio()
    output = Path(output)
    if not output.parent.is_dir():
        raise UserError(f"The folder of -o {output} does not exist: create it first.")
    if model.sha is None:
        raise UserError(f"Model {model.codename} (run {model.run_id}) records no commit: only "
                        "committed models can be exported.")
    with tempfile.TemporaryDirectory(prefix="nf1prov-export-") as tmp:
        artifacts = download_model(client, model, Path(tmp) / "artifacts")
        where = (f"The model's logged config ({CONFIG_ARTIFACT} of run {model.run_id}, "
                 f"model {model.codename})")
        config = read_config_file(artifacts / CONFIG_ARTIFACT)
        settings = export_settings(config, overrides, source=where)
        required_settings(settings, where)

        loaded = load_model(str(artifacts / "model"), device="cpu")
        arch = read_architecture(artifacts / "model", model.codename)
        source = architecture_source(root, model.sha, arch)
        fov_id, image = validation_image(artifacts / MANIFEST_ARTIFACT, root, data_root)
        stack = read_stack(image, loaded.normalisation)
        size = crop_side(*stack.shape[-2:], crop_size=loaded.tile_size)
        window = centre_window(stack, loaded.input_slices, size)
        data = TestData(fov_id, image, *make_test_tensors(loaded.model, window,
                                                     normalisation=loaded.normalisation))

        files = write_files(Path(tmp) / "package", loaded=loaded, data=data, artifacts=artifacts,
                            source_name=Path(arch.source_path).name, source=source,
                            codename=model.codename)
        entry_md, entry = catalog.render_entry(model.run, tracking_uri,
                                               catalog.template_dirs(root, None))
        provenance = {
            "codename": model.codename, "commit": model.sha,
            "git_tag": git.model_tag(model.codename), "run_id": model.run_id,
            "experiment_id": model.experiment_id,
            "tracking_uri": tracking.public_uri(tracking_uri),
            **({"run_url": entry["url"]} if entry.get("url") else {}),
            "data_manifest_sha256": sha256_file(artifacts / MANIFEST_ARTIFACT),
            "test_field": fov_id, "input_slices": loaded.input_slices,
            "normalisation": loaded.normalisation, "tile_size": loaded.tile_size,
            "instances": model_postprocess(config, params=model.run.data.params).values(),
        }
        files["readme"].write_text(documentation(entry_md, provenance, data, settings),
                                   encoding="utf-8")
        descr = model_descr(
            model=model, root=root, loaded=loaded, arch=arch, files=files, settings=settings,
            entry=entry, provenance=provenance, dtype=data.input.dtype)
        status = write_package(descr, output, test=test)
    return Exported(output, model.codename, model.sha, model.run_id, data, status)


def download_model(client, model: ResolvedModel, destination: Path) -> Path:
    """The run's ``model/``, ``config/`` and ``manifest/`` artifacts under ``destination``
    (`nf1prov.provenance.checkout.download_artifacts`); UserError when one that export needs
    is missing."""
    from nf1prov.provenance.checkout import download_artifacts

    download_artifacts(client, model.run, destination, ARTIFACTS)
    for needed in (CONFIG_ARTIFACT, MANIFEST_ARTIFACT, Path("model")):
        if not (destination / needed).exists():
            raise UserError(f"Model {model.codename} (run {model.run_id}) has no {needed} "
                            "artifact; it cannot be exported.")
    return destination


def write_files(package: Path, *, loaded, data: TestData, artifacts: Path, source_name: str,
                source: bytes, codename: str = "") -> dict[str, Path]:
    """The package's files (all but README.md and rdf.yaml) in a new folder ``package``; returns
    them by role. ``codename`` titles the cover."""
    package.mkdir()
    files = {
        "input": package / "test_input.npy", "output": package / "test_output.npy",
        "sample_input": package / "sample_input.tif",
        "sample_output": package / "sample_output.tif",
        "weights": package / "weights.pt", "torchscript": package / "torchscript.pt",
        "architecture": package / source_name, "config": package / "config.toml",
        "readme": package / "README.md", "cover": package / "cover.png",
    }
    np.save(files["input"], data.input)
    np.save(files["output"], data.output)
    tifffile.imwrite(files["sample_input"], data.input)
    tifffile.imwrite(files["sample_output"], data.output)
    example = normalise(data.input[0], loaded.normalisation)[None]  # what the network sees
    save_cover(files["cover"], example[0, loaded.input_slices // 2], data.output[0],
               title=f"{codename or loaded.label}: test input slice ({data.fov_id}) and "
                     "predicted classes")
    shutil.copyfile(model_files(artifacts / "model") / WEIGHTS_FILE, files["weights"])
    shutil.copyfile(artifacts / CONFIG_ARTIFACT, files["config"])
    files["architecture"].write_bytes(source)
    torchscript(loaded.model, example).save(str(files["torchscript"]))
    return files


def model_descr(*, model: ResolvedModel, root: Path, loaded, arch, files: dict, settings: dict,
                entry: dict, provenance: dict, dtype: np.dtype):
    """The bioimage.io ``ModelDescr`` (format 0.5) of the package files in ``files``."""
    import torch
    from bioimageio.spec.model import v0_5

    name, email = commit_author(root, model.sha)
    try:
        author = v0_5.Author(name=name, email=email or None)
    except ValueError:  # an address bioimage.io's validator refuses: the name alone
        author = v0_5.Author(name=name)
    cite = v0_5.CiteEntry(text=settings["cite_text"], **{
        key: settings[f"cite_{key}"] for key in ("doi", "url") if settings[f"cite_{key}"]})
    state_dict = v0_5.PytorchStateDictWeightsDescr(
        source=files["weights"], pytorch_version=v0_5.Version(torch.__version__),
        architecture=v0_5.ArchitectureFromFileDescr(
            source=files["architecture"], callable=v0_5.Identifier(arch.class_name),
            kwargs=dict(arch.args)))
    scripted = v0_5.TorchscriptWeightsDescr(
        source=files["torchscript"], pytorch_version=v0_5.Version(torch.__version__),
        parent="pytorch_state_dict")
    summary = next((f["text"] for f in entry["fields"]
                    if f.get("text") and f.get("label") in ("Summary", "Task")), "")
    description = (f"{summary.rstrip('.')}. " if summary else "") + (
        "Three-class segmentation (background, inner-cell, cell-boundary) of brightfield "
        f"z-stacks of NF1 organoids; nf1prov model {model.codename}.")
    started = model.run.info.start_time
    remote = git.remote_url(root) or ""
    repo = tracking.public_uri(remote) if remote.startswith(("https://", "http://")) else None
    tags = list(dict.fromkeys([*TAGS, *settings["tags"]]))
    parameters = sum(p.numel() for p in loaded.model.parameters())
    fields = dict(
        name=f"NF1 organoid cell segmentation {model.codename}",
        description=description[:512],
        authors=[author],
        cite=[cite],
        license=settings["license"],
        documentation=v0_5.FileDescr(source=files["readme"]),
        attachments=[v0_5.FileDescr(source=files["config"])],
        tags=tags,
        covers=[v0_5.FileDescr(source=files["cover"])],
        inputs=[input_descr(loaded.input_slices, dtype, loaded.normalisation, files["input"],
                            files["sample_input"])],
        outputs=[output_descr(files["output"], files["sample_output"])],
        weights=v0_5.WeightsDescr(pytorch_state_dict=state_dict, torchscript=scripted),
        config=v0_5.Config(
            bioimageio=v0_5.BioimageioConfig(
                architecture_type="UNet", modality="brightfield (transmission light)",
                target_structure=["cells"], task="semantic segmentation",
                model_parameter_count=parameters),
            nf1prov=provenance),
    )
    if started:
        fields["timestamp"] = dt.datetime.fromtimestamp(started / 1000, dt.UTC)
    if repo:
        fields["git_repo"] = repo
    try:
        return v0_5.ModelDescr(**fields)
    except ValueError as exc:
        raise UserError(f"bioimage.io refuses the description of {model.codename}: {exc}") \
            from None


def write_package(descr, output: Path, *, test: bool = True) -> str | None:
    """Zip ``descr`` and its files to ``output`` through a temporary file beside it; with
    ``test``, run bioimage.io's `test_model` on that zip first (on the CPU, where the expected
    outputs were computed) and raise CheckFailed, writing nothing, unless it passes. Returns the
    test's status ("passed") or None."""
    from bioimageio.spec import save_bioimageio_package

    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".zip")
    os.close(fd)
    status = None
    try:
        os.unlink(tmp)  # the packager creates the file
        save_bioimageio_package(descr, output_path=Path(tmp))
        if test:
            status = check_package(Path(tmp), output)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return status


def check_package(path: Path, name: Path) -> str:
    """bioimage.io's `test_model` on the zip at ``path`` (to be written as ``name``): its
    status and the weight formats whose outputs it reproduced ("passed for pytorch_state_dict
    and torchscript weights"), or CheckFailed with its report."""
    from bioimageio.core import test_model

    summary = test_model(path, devices=["cpu"])
    if summary.status != "passed":
        raise CheckFailed(f"bioimage.io's test_model did not pass the package for {name} "
                          f"(status {summary.status}); nothing was written. Its report:\n"
                          f"{summary.format()}")
    tested = [weights for weights in ("pytorch_state_dict", "torchscript")
              if any(weights in detail.name for detail in summary.details)]
    return f"{summary.status} for {' and '.join(tested)} weights" if tested else summary.status
