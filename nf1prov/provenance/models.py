"""A trained model ready to predict, found by codename, run ID, ``models:/`` URI or local folder,
with the settings it was trained with (input slices, tile size, normalisation, instance
parameters).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nf1prov.devices import pick_device
from nf1prov.errors import UserError
from nf1prov.segment.instances import (
    PARAM_PREFIX,
    PARAM_PREFIX_3D,
    POSTPROCESS_ARTIFACT,
    POSTPROCESS_ARTIFACT_3D,
    PostProcess,
)
from nf1prov.segment.predict import predict_stack
from nf1prov.weights import load as load_weights
from nf1prov.weights import read_architecture


@dataclass
class LoadedModel:
    """A model ready to predict, with the training settings it must be used with.

    ``config`` is the run's resolved training config (``config/config.toml``) as a nested dict;
    ``run_id``/``codename``/``sha`` are None for a local folder that is not tied to a run (one
    `nf1prov checkout` wrote is: its `RUN_RECORD`).
    ``postprocess``: the instance parameters the model was given at the end of training
    (`nf1prov.segment.instances`), what `predict` and `evaluate` use unless told otherwise;
    ``postprocess3d`` those of cells as 3-D objects (`instance_params`).
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
    postprocess3d: PostProcess | None = None

    def instance_params(self, dims: int) -> PostProcess:
        """The instance parameters for per-slice labels (``dims`` 2) or 3-D cells (3); a model
        without 3-D ones (trained before) uses its per-slice ones with ``dims=3``."""
        if dims == 2:
            return self.postprocess
        return self.postprocess3d or self.postprocess.replace(dims=3)

    @property
    def z_ratio(self) -> float:
        """The z step over the xy pixel size of stacks that do not say (``postprocess.z_ratio``
        of the model's config; 1 in configs from before)."""
        return float(self.config.get("postprocess", {}).get("z_ratio", 1.0))

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


RUN_RECORD = "run.json"  # beside model/ in a folder `nf1prov checkout` wrote: the model's run


def write_run_record(folder: Path, *, codename: str, run_id: str, sha: str | None,
                     experiment_id: str) -> None:
    """Say which run a checked-out model folder holds, so that predictions made from the folder
    name their model (codename, commit, run ID) as they do from the store."""
    from nf1prov.atomic import write_atomic

    record = {"codename": codename, "run_id": run_id, "commit": sha,
              "experiment_id": experiment_id}
    write_atomic(Path(folder) / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def read_run_record(model_dir: Path) -> dict:
    """The `RUN_RECORD` beside a local model folder ({} when there is none or it is unreadable:
    the folder then names no run, which loses nothing the model needs to predict)."""
    try:
        record = json.loads((Path(model_dir).parent / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {key: str(value) for key, value in record.items() if value} \
        if isinstance(record, dict) else {}


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
    """Load a model by local model folder, codename, run ID or ``models:/`` URI.

    A path that exists is a local folder holding ``weights.pt`` and ``architecture.json`` (the
    run artifact ``model/``, e.g. ``.nf1prov/models/<codename>/model`` after ``nf1prov
    checkout``), with its config beside it (`find_local_config`); anything else is resolved
    through the tracking store (``client``, else ``tracking_uri``, else the environment's
    ``MLFLOW_TRACKING_URI``) with `nf1prov.provenance.resolve.resolve_model` (``run_id`` picks
    one of several runs of a codename) and its ``model/`` and ``config/config.toml`` artifacts are
    downloaded. The weights are tensors only; the architecture's code is the installed one when
    it is the code the model was trained with, else the model's own from the git repository
    around the working directory (`nf1prov.weights`).
    """
    torch_device = pick_device(device)
    repo = enclosing_repo()
    path = Path(ref).expanduser()
    if path.exists():
        read_architecture(path, ref)  # a clear error for a folder of another kind, before config
        config_path = find_local_config(path)
        config = read_config_file(config_path)
        run = read_run_record(path)
        model = load_weights(path, ref=ref, device=torch_device, repo=repo,
                             codename=run.get("codename"))
        chosen = config_path.parent / Path(POSTPROCESS_ARTIFACT).name
        chosen3d = config_path.parent / Path(POSTPROCESS_ARTIFACT_3D).name
        loaded = LoadedModel(model, config, str(path), torch_device, run_id=run.get("run_id"),
                             codename=run.get("codename"), sha=run.get("commit"),
                             postprocess=model_postprocess(config, chosen_file=chosen),
                             postprocess3d=model_postprocess(config, chosen_file=chosen3d,
                                                             dims=3))
    else:
        client = client or _store_client(ref, tracking_uri)
        import tempfile

        import mlflow.artifacts

        from nf1prov.provenance.resolve import resolve_model

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
        params = resolved.run.data.params
        loaded = LoadedModel(model, config, ref, torch_device, run_id=run_id,
                             codename=resolved.codename, sha=resolved.sha,
                             postprocess=model_postprocess(config, params=params),
                             postprocess3d=model_postprocess(config, params=params, dims=3))
    in_channels = getattr(loaded.model, "in_channels", None)
    if in_channels is not None and in_channels != loaded.input_slices:
        raise UserError(f"Model {ref!r} takes {in_channels} input channels but its config says "
                        f"data.input_slices = {loaded.input_slices}; the config artifact does not "
                        "belong to this model.")
    return loaded


@dataclass(frozen=True)
class ModelReference:
    """How another process (a Dask worker, `nf1prov.segment.cluster`) loads the same model
    itself: a local folder by its absolute path, or a codename / run ID with the store's URI and
    the run it resolved to here. A task carries this, a few short strings, and never the
    weights; it is hashable, so a worker keeps one loaded model per reference."""

    ref: str
    tracking_uri: str | None = None
    run_id: str | None = None
    device: str = "auto"

    def load(self) -> LoadedModel:
        import os

        # MLflow's download progress bars would fill the worker's log.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return load_model(self.ref, tracking_uri=self.tracking_uri, run_id=self.run_id,
                          device=self.device)


def _store_client(ref: str, tracking_uri: str | None):
    """A read-only client of ``tracking_uri``, else of ``MLFLOW_TRACKING_URI``."""
    import os

    from nf1prov import tracking

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"{ref!r} is not a local model folder, and no MLflow tracking store was "
                        "given to look it up as a codename or run ID: pass tracking_uri= (or a "
                        "client), or set MLFLOW_TRACKING_URI.")
    return tracking.client(uri, read_only=True)


def enclosing_repo() -> Path | None:
    """The git work tree around the working directory, if any: where an old model's
    architecture source is looked up."""
    from nf1prov import git

    try:
        return git.repo_root(Path.cwd())
    except UserError:
        return None


def model_postprocess(config: dict, *, params: dict | None = None,
                      chosen_file: Path | None = None, dims: int = 2) -> PostProcess:
    """The instance parameters a model uses: those chosen at the end of its training (run params
    ``instances.*``, or the ``config/instances.json`` artifact beside a local model folder), else
    its config's ``[postprocess]`` values, else the argmax rule of models trained before.
    ``dims=3``: those of 3-D cells (``instances3d.*``, ``config/instances3d.json``), else, for a
    model trained before they were chosen, its per-slice ones with ``dims=3``."""
    if dims == 3:
        chosen = PostProcess.from_mapping(params or {}, prefix=PARAM_PREFIX_3D)
        if chosen is None and chosen_file is not None and chosen_file.is_file():
            chosen = _read_chosen(chosen_file)
        if chosen is not None:
            return chosen.replace(dims=3)
        flat_file = chosen_file.with_name(Path(POSTPROCESS_ARTIFACT).name) if chosen_file else None
        return model_postprocess(config, params=params, chosen_file=flat_file).replace(dims=3)
    chosen = PostProcess.from_mapping(params or {}, prefix=PARAM_PREFIX)
    if chosen is None and chosen_file is not None and chosen_file.is_file():
        chosen = _read_chosen(chosen_file)
    if chosen is None:
        chosen = PostProcess.from_mapping(config.get("postprocess", {}))
    return (chosen or PostProcess()).replace(dims=2)


def _read_chosen(path: Path) -> PostProcess | None:
    """The instance parameters of a ``config/instances*.json`` file."""
    try:
        return PostProcess.from_mapping(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read the model's instance parameters {path}: {exc}. "
                        "Delete the file to use the config's [postprocess] values.") from None


