"""The MLflow Model Registry: one registered model per experiment, one version per model.

`register` adds a model (a committed model run that FINISHED with its ``model/`` artifact) as a
version of the registered model named after its experiment: source ``runs:/<run id>/model``,
version tags ``nf1prov.codename`` and ``nf1prov.commit``. Registering the same model again
finds its version instead of adding another. An alias (e.g. ``champion``) is moved to the
version: MLflow keeps one version per alias.

``models:/<name>@<alias>`` and ``models:/<name>/<version>`` name a model wherever a codename
does (`nf1prov.provenance.resolve.registered_run`). `labels_by_run` gives the catalogue what each
run is registered as.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nf1prov import tracking
from nf1prov.errors import UserError
from nf1prov.provenance.resolve import every_page, quoted

CODENAME_TAG = "nf1prov.codename"
COMMIT_TAG = "nf1prov.commit"
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

    def describe(self) -> str:
        what = "registered as" if self.created else "already registered as"
        alias = ""
        if self.alias:
            moved = f", moved from version {self.moved_from}" if self.moved_from else ""
            alias = f", alias @{self.alias} now on it{moved} (models:/{self.name}@{self.alias})"
        return f"{what} {self.name} version {self.version}{alias}"


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
    if not any(a.path == "model" for a in client.list_artifacts(resolved.run_id)):
        raise UserError(f"Model {name} has no model/ artifact (its logging may still wait in "
                        "an outbox: `nf1prov sync` in the clone that trained it).")
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
    if existing:
        version, created = str(existing[0].version), False
    else:
        tags = {CODENAME_TAG: name, COMMIT_TAG: resolved.sha or ""}
        made = client.create_model_version(registered, f"runs:/{resolved.run_id}/model",
                                           run_id=resolved.run_id, tags=tags)
        version, created = str(made.version), True
    moved_from = None
    if alias is not None:
        before = dict(client.get_registered_model(registered).aliases or {}).get(alias)
        moved_from = str(before) if before is not None and str(before) != version else None
        client.set_registered_model_alias(registered, alias, version)
    return Registration(registered, version, created, alias, moved_from)


def labels_by_run(client) -> dict[str, list[str]]:
    """``{run_id: ["<name> v<version> @alias ...", ...]}`` for every registered version that
    names a run."""
    labels: dict[str, list[str]] = {}
    for model in every_page(client.search_registered_models):
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for version in every_page(client.search_model_versions, f"name = '{quoted(model.name)}'"):
            if version.run_id:
                aliases = "".join(f" @{a}" for a in sorted(by_version.get(str(version.version),
                                                                          [])))
                labels.setdefault(version.run_id, []).append(
                    f"{model.name} v{version.version}{aliases}")
    return labels
