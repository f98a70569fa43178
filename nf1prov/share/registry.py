"""The MLflow Model Registry: one registered model per experiment, one version per model.

`register` adds a model (a committed model run that FINISHED with its ``model/`` artifact) as a
version of the registered model named after its experiment: its source is the run's MLflow
logged model (``models:/<model_id>``, DESIGN 3.11), version tags ``nf1prov.codename`` and
``nf1prov.commit``. A model trained before nf1prov logged MLflow models gets one first, made from
its ``model/`` and config artifacts (`ensure_logged_model`), without retraining. Registering the
same model again finds its version instead of adding another. An alias (e.g. ``champion``) is
moved to the version: MLflow keeps one version per alias.

``models:/<name>@<alias>`` and ``models:/<name>/<version>`` name a model wherever a codename
does (`nf1prov.provenance.resolve.registered_run`). `labels_by_run` gives the catalogue what each
run is registered as.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nf1prov import store_read, tracking
from nf1prov.errors import UserError
from nf1prov.provenance.resolve import every_page, quoted

UPGRADE_INPUT_DTYPE = "uint16"  # what JSON requests are read as for a model trained before

CODENAME_TAG = "nf1prov.codename"
COMMIT_TAG = tracking.MODEL_COMMIT
# MLflow's own rule for aliases, plus its reserved words (checked here for a clear message)
ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
RESERVED_ALIAS_RE = re.compile(r"(?i)latest|v\d+")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    created: bool  # False: the model was registered already
    alias: str | None = None
    moved_from: str | None = None  # the version the alias named before
    model_id: str | None = None  # the MLflow logged model the version is
    upgraded: bool = False  # the logged model was made now, for a model trained before
    replaced: tuple[str, ...] = ()  # this model's versions from before MLflow models

    def describe(self) -> str:
        what = "registered as" if self.created else "already registered as"
        text = f"{what} {self.name} version {self.version}"
        if self.replaced:
            text += (f" (replacing version {', '.join(self.replaced)}, registered before MLflow "
                     "models, which MLflow cannot load; its aliases moved here)")
        if self.alias:
            moved = f", moved from version {self.moved_from}" if self.moved_from else ""
            text += (f", alias @{self.alias} now on it{moved} "
                     f"(models:/{self.name}@{self.alias})")
        if self.model_id:
            made = "made now from its model/ artifact, " if self.upgraded else ""
            text += (f"; its MLflow model ({made}models:/{self.model_id}) loads with "
                     "mlflow.pyfunc.load_model")
        return text


def check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias) or RESERVED_ALIAS_RE.fullmatch(alias):
        raise UserError(f"Alias {alias!r} is not one MLflow accepts: use letters, digits, '_' "
                        "and '-' (not 'latest', nor 'v' followed by digits), e.g. champion.")
    return alias


def register(client, resolved, alias: str | None = None) -> Registration:
    """Register the model ``resolved`` (`nf1prov.provenance.resolve.ResolvedModel`); move
    ``alias``."""
    from mlflow.exceptions import MlflowException

    if alias is not None:
        check_alias(alias)
    run, name = resolved.run, resolved.codename
    if run.data.tags.get(tracking.KIND) != tracking.KIND_MODEL:
        raise UserError(f"{name} is a --no-commit scratch run, not a model: only committed "
                        "models are registered. Train it without --no-commit.")
    if run.info.status != "FINISHED":
        raise UserError(f"Model {name} is {run.info.status}, not FINISHED: only a finished "
                        "training has the weights to register.")
    model_id, upgraded = ensure_logged_model(client, resolved)
    registered = client.get_experiment(resolved.experiment_id).name
    try:
        client.get_registered_model(registered)
    except MlflowException:
        try:
            client.create_registered_model(
                registered, description=f"nf1prov models of MLflow experiment {registered}; "
                "each version is one model (tags nf1prov.codename and nf1prov.commit).")
        except MlflowException:  # another process created it meanwhile
            client.get_registered_model(registered)
    existing = client.search_model_versions(
        f"name = '{quoted(registered)}' and run_id = '{resolved.run_id}'")
    current = [v for v in existing if v.source == f"models:/{model_id}"]
    replaced: list[str] = []
    if current:
        version, created = str(current[0].version), False
    else:
        tags = {CODENAME_TAG: name, COMMIT_TAG: resolved.sha or ""}
        made = client.create_model_version(registered, f"models:/{model_id}",
                                           run_id=resolved.run_id, tags=tags, model_id=model_id)
        version, created = str(made.version), True
        link_version(client, model_id, registered, version)
        # versions registered before MLflow models (source runs:/<id>/model, which MLflow's
        # registry cannot load): their aliases move to the version that loads
        replaced = sorted((str(v.version) for v in existing), key=int)
        for old_alias, old_version in (client.get_registered_model(registered).aliases
                                       or {}).items():
            if str(old_version) in replaced and old_alias != alias:
                client.set_registered_model_alias(registered, old_alias, version)
    moved_from = None
    if alias is not None:
        before = dict(client.get_registered_model(registered).aliases or {}).get(alias)
        moved_from = str(before) if before is not None and str(before) != version else None
        client.set_registered_model_alias(registered, alias, version)
    return Registration(registered, version, created, alias, moved_from, model_id, upgraded,
                        tuple(replaced))


def link_version(client, model_id: str, name: str, version: str) -> None:
    """Name the registered version on its logged model (tag ``mlflow.modelVersions``, what
    MLflow's UI reads to show the model as registered; `mlflow.register_model` and a tracking
    server set it, `MlflowClient.create_model_version` on a local store does not)."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
                        or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == version for e in listed):
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            listed + [{"name": name, "version": int(version)}])})  # as MLflow writes it


def ensure_logged_model(client, resolved) -> tuple[str, bool]:
    """The ID of the run's MLflow logged model, made now (True) from its ``model/`` artifact
    (weights and architecture), its config and its instance parameters when the model was
    trained before nf1prov logged one; UserError when the run has no ``model/``."""
    import tempfile
    import uuid
    from pathlib import Path

    import mlflow.artifacts
    import numpy as np

    from nf1prov.provenance.models import enclosing_repo, model_postprocess, read_config_file
    from nf1prov.segment import mlflow_model

    existing = tracking.run_logged_model(client, resolved.run_id)
    if existing is not None:
        return existing.model_id, False
    run_id, name = resolved.run_id, resolved.codename
    if not any(a.path == "model" for a in client.list_artifacts(run_id)):
        raise UserError(f"Model {name} has no model/ artifact (its logging may still wait in "
                        "an outbox: `nf1prov sync` in the clone that trained it).")
    with tempfile.TemporaryDirectory(prefix="nf1prov-upgrade-") as tmp:
        fetched = {artifact: Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=tmp,
            tracking_uri=client.tracking_uri)) for artifact in ("model", "config/config.toml")}
        config = read_config_file(fetched["config/config.toml"])
        params = resolved.run.data.params
        settings = mlflow_model.settings(
            config, model_postprocess(config, params=params),
            input_dtype=np.dtype(UPGRADE_INPUT_DTYPE), codename=name, commit=resolved.sha,
            run_id=run_id, postprocess3d=model_postprocess(config, params=params, dims=3))
        example = np.zeros((settings["input_slices"], mlflow_model.EXAMPLE_SIZE,
                            mlflow_model.EXAMPLE_SIZE), UPGRADE_INPUT_DTYPE)
        saved = mlflow_model.save(fetched["model"], settings, Path(tmp) / "mlflow-model",
                                  example, repo=enclosing_repo())
        metrics = resolved.run.data.metrics
        linked = [(key, value, resolved.run.info.end_time or 0,
                   int(metrics.get("best_epoch", 0)))
                  for key, value in sorted(metrics.items())
                  if key.startswith("best_val_") or key.startswith("val_instance")]
        manifest = next((d.dataset for d in (resolved.run.inputs.dataset_inputs or [])
                         if d.dataset.name == "split_manifest"), None)
        model_id = tracking.log_logged_model(
            client, run_id, saved, upload=uuid.uuid4().hex, step=int(metrics.get("best_epoch", 0)),
            params=mlflow_model.params(settings), metrics=linked,
            tags={tracking.CODENAME: name, COMMIT_TAG: resolved.sha or ""},
            dataset=(manifest.name, manifest.digest) if manifest else None)
    return model_id, True


def labels_by_run(client) -> dict[str, list[str]]:
    """``{run_id: ["<name> v<version> @alias ...", ...]}`` for every registered version that
    names a run (``client``: an MlflowClient or a `tracking.reader`)."""
    labels: dict[str, list[str]] = {}
    for model in registered_models(client):
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            by_version.setdefault(version, []).append(alias)
        for version, run_id in model.versions:
            if run_id:
                aliases = "".join(f" @{a}" for a in sorted(by_version.get(version, [])))
                labels.setdefault(run_id, []).append(f"{model.name} v{version}{aliases}")
    return labels


def registered_models(client) -> list[store_read.RegisteredModel]:
    """Every registered model (prompts left out) with its aliases and versions, as MLflow's
    searches give them; a `tracking.reader` reads them without MLflow."""
    if isinstance(client, store_read.Store):
        return client.registered_models()
    return [store_read.RegisteredModel(
        model.name, {alias: str(v) for alias, v in (model.aliases or {}).items()},
        [(str(v.version), v.run_id or "") for v in every_page(
            client.search_model_versions, f"name = '{quoted(model.name)}'")])
        for model in every_page(client.search_registered_models)]
