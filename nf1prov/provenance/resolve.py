"""Turn what a user types (a codename, a run ID, a `model/<codename>` tag, or a registry URI
`models:/<name>@<alias>` / `models:/<name>/<version>`) into one model run and the commit that
trained it.

Every ref is validated before it reaches MLflow's filter language or git, so text such as
`--upload-pack=x` never becomes a git option.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from nf1prov import git, store_read, tracking
from nf1prov.errors import UserError

MODEL_KINDS = (tracking.KIND_MODEL, tracking.KIND_SCRATCH)


@dataclass(frozen=True)
class ResolvedModel:
    run: object  # mlflow.entities.Run
    run_id: str
    codename: str
    sha: str | None  # the model commit (None when MLflow recorded none)
    experiment_id: str


def resolve_model(client, ref: str, run_id: str | None = None,
                  repo_root: Path | None = None) -> ResolvedModel:
    """The one model run ``ref`` names, with its commit checked against ``repo_root`` if given.

    Raises UserError listing the closest codenames for an unknown name, every candidate (with run
    IDs) for an ambiguous one, and what to fetch when the commit is not in the local repository.
    """
    if run_id is not None:
        run = _get_run(client, git.validate_run_id(run_id))
        if ref and ref != run_id and ref.removeprefix(git.MODEL_TAG_PREFIX) != run.info.run_name:
            raise UserError(f"--run-id {run_id} is run {run.info.run_name!r}, not {ref!r}.")
    elif git.RUN_ID_RE.match(ref or ""):
        run = _get_run(client, ref)
    elif (ref or "").startswith(MODELS_PREFIX):  # models:/<name>@<alias> or /<version>
        run = _get_run(client, registered_run(client, ref))
    else:
        run = _run_by_codename(client, git.validate_codename(ref.removeprefix(
            git.MODEL_TAG_PREFIX)))
    resolved = ResolvedModel(run=run, run_id=run.info.run_id, codename=run.info.run_name,
                             sha=run.data.tags.get(tracking.GIT_COMMIT),
                             experiment_id=run.info.experiment_id)
    if repo_root is not None:
        resolved = _with_local_commit(resolved, Path(repo_root))
    return resolved


def _get_run(client, run_id: str):
    run = tracking.get_run(client, run_id)
    if run is None:
        raise UserError(f"No run with ID {run_id} in the tracking store. Check --tracking-uri "
                        "and the ID (`nf1prov list --format csv` shows them).")
    return run


def _run_by_codename(client, codename: str):
    runs = [r for r in tracking.runs_by_codename(client, codename)
            if r.data.tags.get(tracking.KIND) in MODEL_KINDS]
    if not runs:
        known = sorted({r.info.run_name for r in tracking.model_runs(client, MODEL_KINDS)})
        close = difflib.get_close_matches(codename, known, n=5, cutoff=0.5)
        hint = f" Closest known: {', '.join(close)}." if close else ""
        raise UserError(f"No model named {codename!r} in the tracking store.{hint} Run "
                        "`nf1prov list` to see every model (and check --tracking-uri).")
    # A committed model wins over --no-commit scratch runs of the same name.
    committed = [r for r in runs if r.data.tags.get(tracking.KIND) == tracking.KIND_MODEL]
    runs = committed or runs
    if len(runs) > 1:
        names = tracking.experiment_names(client)
        lines = "; ".join(f"run {r.info.run_id} in experiment "
                          f"{names.get(r.info.experiment_id, r.info.experiment_id)!r}"
                          for r in runs)
        raise UserError(f"Codename {codename!r} names {len(runs)} runs: {lines}. Pick one with "
                        "--run-id RUN_ID.")
    return runs[0]


def _with_local_commit(resolved: ResolvedModel, root: Path) -> ResolvedModel:
    """Check the model's commit is in ``root``; fall back to the model/<codename> tag, fetched
    from the remotes when the repository lacks it."""
    tag_name = git.model_tag(resolved.codename) if git.CODENAME_RE.match(resolved.codename) \
        else None
    if resolved.sha and git.SHA_RE.match(resolved.sha) and git.commit_exists(root, resolved.sha):
        return resolved
    tagged = git.tag_sha(root, tag_name) if tag_name else None
    if tagged and (resolved.sha is None or tagged == resolved.sha):
        return ResolvedModel(resolved.run, resolved.run_id, resolved.codename, tagged,
                             resolved.experiment_id)
    if resolved.sha is None:
        raise UserError(f"Model {resolved.codename} (run {resolved.run_id}) records no git "
                        "commit, so its code cannot be checked out.")
    if tag_name and not tagged:  # trained elsewhere and pushed (train --push): fetch its tag
        fetched = git.fetch_model_tag(root, resolved.codename)
        if fetched == resolved.sha:
            return resolved
    remote = git.remote_url(root)
    where = f" from {remote}" if remote else ""
    raise UserError(
        f"Model {resolved.codename}'s commit {resolved.sha} is not in the repository {root}. "
        f"Fetch it{where}: `git fetch origin tag {tag_name}` (or `git fetch --all --tags`), "
        "then retry."
    )


# --- the model registry: models:/<name>@<alias> and models:/<name>/<version> -----------------

MODELS_PREFIX = "models:/"
MODELS_URI_RE = re.compile(r"models:/(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))")
LOGGED_MODEL_URI_RE = re.compile(r"models:/(?P<model_id>m-[0-9a-f]{32})")


def quoted(text: str) -> str:
    return text.replace("'", "\\'")


def registered_run(client, uri: str) -> str:
    """The run ID behind ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or
    ``models:/<model_id>`` (an MLflow logged model, ``m-<hex>``)."""
    if isinstance(client, store_read.Store):  # the registry's lookups: through MLflow
        raise store_read.Unreadable(uri)
    from mlflow.exceptions import MlflowException

    logged = LOGGED_MODEL_URI_RE.fullmatch(uri)
    if logged:  # models:/<model_id>, an MLflow logged model: the run that made it
        try:
            run_id = client.get_logged_model(logged["model_id"]).source_run_id
        except MlflowException:
            raise UserError(f"{uri} names no logged model in {client.tracking_uri}.") from None
        if not run_id:
            raise UserError(f"{uri} was logged outside a run and is no nf1prov model: pass a "
                            "model's codename instead.")
        return run_id
    match = MODELS_URI_RE.fullmatch(uri)
    if not match:
        raise UserError(f"{uri!r} is not a model registry URI: use models:/<name>@<alias> or "
                        "models:/<name>/<version> (the catalogue's Registered lines show them; "
                        "'latest' is not supported: name an alias).")
    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"])
        else:
            version = client.get_model_version(name, match["version"])
    except MlflowException:
        raise UserError(f"{uri} names no model version in the registry of {client.tracking_uri}."
                        f"{_what_there_is(client, name)} Register a model with `nf1prov "
                        "register CODENAME --alias NAME`.") from None
    if not version.run_id:
        raise UserError(f"{uri} was registered outside nf1prov and names no run: pass the "
                        "model's codename instead.")
    return version.run_id


def _what_there_is(client, name: str) -> str:
    """A hint: the registered model's versions and aliases, or the registered models."""
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - only for a hint
        names = sorted(m.name for m in every_page(client.search_registered_models))
        return (f" Registered models: {', '.join(names)}." if names
                else " Nothing is registered there yet.")
    versions = sorted(int(v.version) for v in every_page(
        client.search_model_versions, f"name = '{quoted(name)}'"))
    aliases = ", ".join(f"@{a} (v{v})" for a, v in sorted((model.aliases or {}).items()))
    return (f" {name} has versions {', '.join(map(str, versions)) or 'none'}"
            f"{'; aliases ' + aliases if aliases else ''}.")


def every_page(search, *args) -> list:
    """Every page of an MLflow registry search."""
    found, token = [], None
    while True:
        page = search(*args, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found
