"""A trained model as an MLflow model that MLflow's own API loads and serves (DESIGN 3.11).

`save` writes, into a local folder, an MLflow pyfunc model built from code: the code is
`nf1prov.segment.mlflow_pyfunc` (this commit's file), the model's files its artifacts
(``weights.pt`` tensors only, ``architecture.json``, the architecture's source file and
``settings.json``), with a signature, an input example and the model's codename, commit and run
as metadata. `nf1prov.tracking.log_logged_model` then makes it the run's MLflow 3 logged model
``model`` (``runs:/<run_id>/model``, ``models:/<model_id>``), which `nf1prov register`
registers. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from nf1prov import weights

NAME = "model"  # the logged model's name: runs:/<run_id>/model
CODE_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
SETTINGS_FILE = "settings.json"
EXAMPLE_SIZE = 64  # pixels per side of the logged input example
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def settings(config: dict, postprocess, *, input_dtype: np.dtype, codename: str | None = None,
             commit: str | None = None, run_id: str | None = None,
             postprocess3d=None) -> dict:
    """What the pyfunc model needs besides its weights to predict as ``nf1prov predict`` does
    (``config``: the resolved training config; ``postprocess``: the model's
    `nf1prov.segment.instances.PostProcess`, ``postprocess3d`` its 3-D one when it has one),
    and which model it is."""
    data = config["data"]
    cells = {"instances3d": json.loads(postprocess3d.to_json())} if postprocess3d else {}
    return {"input_slices": int(data["input_slices"]), "tile_size": int(data["crop_size"]),
            "normalisation": str(data.get("normalisation", "dtype_max")),
            "input_dtype": np.dtype(input_dtype).name,
            "instances": json.loads(postprocess.to_json()), **cells,
            "codename": codename, "commit": commit, "run_id": run_id}


def params(model_settings: dict) -> dict[str, str]:
    """The settings as the logged model's params (MLflow's model page lists them): input
    slices, tile size, normalisation, input dtype and the instance parameters."""
    shown = {k: model_settings[k] for k in ("input_slices", "tile_size", "normalisation",
                                            "input_dtype")}
    for kind in ("instances", "instances3d"):
        shown |= {f"{kind}.{k}": v for k, v in model_settings.get(kind, {}).items()
                  if k != "dims"}
    return {k: "" if v is None else str(v) for k, v in shown.items()}


def example(stack: np.ndarray, input_slices: int) -> np.ndarray:
    """A small input example cut from a real ``stack`` ((Z, H, W)): the middle ``input_slices``
    slices, a centre crop of at most `EXAMPLE_SIZE` pixels per side, in the stack's dtype."""
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    z0 = max(0, (stack.shape[0] - input_slices) // 2)
    y0, x0 = (max(0, (n - EXAMPLE_SIZE) // 2) for n in stack.shape[1:])
    return np.ascontiguousarray(stack[z0:z0 + input_slices, y0:y0 + EXAMPLE_SIZE,
                                      x0:x0 + EXAMPLE_SIZE])


def signature():
    """Input: an image of any shape the model takes ((Z, H, W) or (H, W), integers; MLflow's
    tensor specs fix the number of dimensions and the dtype, so the input is declared as a
    tensor of objects and checked by the model, `mlflow_pyfunc.as_image`). Output: float32
    (3, Z, H, W)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (3, -1, -1, -1))]))


def requirements() -> list[str]:
    """The pip requirements MLflow records (what `mlflow models build-docker` or
    ``--env-manager virtualenv`` would install): nf1prov, and the torch and numpy it ran with."""
    import torch

    from nf1prov import __version__

    return [f"nf1prov=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}"]


def save(model_dir: Path, model_settings: dict, destination: Path,
         input_example: np.ndarray | None = None, *, repo: Path | None = None) -> Path:
    """Write the MLflow model of the model in ``model_dir`` (``weights.pt`` and
    ``architecture.json``, `nf1prov.weights`) into ``destination`` (which must not exist);
    returns it. The architecture's source file goes with it (`nf1prov.weights.source_text`:
    installed, shipped beside the weights, or from the git repository ``repo``), so that the
    model loads where the installed ``models`` package has moved on; UserError when none has
    it."""
    import mlflow.pyfunc

    files = weights.model_files(Path(model_dir))
    arch = weights.read_architecture(files, str(model_dir))
    codename = model_settings.get("codename")
    shipped = files / Path(arch.source_path).name
    source = weights.source_text(arch, repo=repo, codename=codename, source=shipped)
    if source is None:  # the same refusal, and advice, as loading the model
        weights.architecture_class(arch, ref=codename or str(model_dir), repo=repo,
                                   codename=codename, source=shipped)
    with tempfile.TemporaryDirectory(prefix="nf1prov-mlflow-model-") as tmp:
        settings_path = Path(tmp) / SETTINGS_FILE
        settings_path.write_text(json.dumps(model_settings, indent=2) + "\n", encoding="utf-8")
        source_path = Path(tmp) / Path(arch.source_path).name
        source_path.write_bytes(source.encode("utf-8"))
        artifacts = {"weights": str(files / weights.WEIGHTS_FILE),
                     "architecture": str(files / weights.ARCHITECTURE_FILE),
                     "architecture_source": str(source_path), "settings": str(settings_path)}
        with _quiet_mlflow():
            mlflow.pyfunc.save_model(
                str(destination), python_model=str(CODE_FILE), artifacts=artifacts,
                signature=signature(), input_example=input_example,
                pip_requirements=requirements(),
                metadata={"nf1prov": {k: model_settings.get(k)
                                      for k in ("codename", "commit", "run_id")}})
    # copied with the mode of the commit's checkout (read-only): a download over it must work
    (Path(destination) / CODE_FILE.name).chmod(0o644)
    return Path(destination)




@contextlib.contextmanager
def _quiet_mlflow():
    """Without MLflow's INFO line on checking the input example and its progress bars for
    copying the artifacts into the folder: the training's output stays ours."""
    logger = logging.getLogger("mlflow.pyfunc")
    level, bars = logger.level, os.environ.get(PROGRESS_BAR)
    logger.setLevel(logging.WARNING)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bars
