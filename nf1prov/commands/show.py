"""`nf1prov show CODENAME`: one model's state, commit, tags, params, metrics, notes and the
files changed since the previous model."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from nf1prov.commands.common import open_store, tracking_uri_option


def previous_model(client, run):
    """The newest model run with a commit that started before ``run`` (any experiment)."""
    from nf1prov import tracking

    start = run.info.start_time or 0
    for other in tracking.model_runs(client):  # newest first
        if (other.info.run_id != run.info.run_id and (other.info.start_time or 0) < start
                and other.data.tags.get(tracking.GIT_COMMIT)):
            return other
    return None


def changed_since_previous(root, client, run) -> list[str]:
    from nf1prov import tracking
    from nf1prov.provenance import git

    sha = run.data.tags.get(tracking.GIT_COMMIT)
    if root is None:
        return ["(not inside a git repository: cannot compare commits)"]
    if not sha or not git.SHA_RE.match(sha) or not git.commit_exists(root, sha):
        return [f"(commit {sha or 'unknown'} is not in this repository)"]
    prev = previous_model(client, run)
    if prev is None:
        return ["(first model: no previous model to compare with)"]
    prev_sha = prev.data.tags[tracking.GIT_COMMIT]
    if not git.SHA_RE.match(prev_sha) or not git.commit_exists(root, prev_sha):
        return [f"(previous model {prev.info.run_name}'s commit is not in this repository)"]
    lines = git.changed_files(root, prev_sha, sha)
    header = f"versus {prev.info.run_name} ({prev_sha[:10]}):"
    return [header] + ([f"  {line}" for line in lines] or ["  (no files changed)"])


def _time(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


@click.command("show")
@click.argument("codename")
@tracking_uri_option
def command(codename, tracking_uri) -> None:
    """Show one model: status, commit, tags, params, metrics, notes, files changed."""
    from nf1prov import tracking
    from nf1prov.provenance import liveness, train_flow

    root, uri, client = open_store(tracking_uri)
    run = train_flow.find_run(client, codename)
    tags, info = run.data.tags, run.info
    state = liveness.run_state(run)
    click.echo(f"{info.run_name}  ({tags.get(tracking.KIND, '?')})")
    click.echo(f"  status:      {state}"
               + (f" - {tags[tracking.FAILURE]}" if tracking.FAILURE in tags else ""))
    if state == liveness.CRASHED:
        click.echo(f"               {liveness.crash_reason(run)}; mark it FAILED with "
                   "`nf1prov list --reap`")
    click.echo(f"  run ID:      {info.run_id}  (experiment {info.experiment_id})")
    click.echo(f"  started:     {_time(info.start_time)}   ended: {_time(info.end_time)}")
    click.echo(f"  commit:      {tags.get(tracking.GIT_COMMIT, '-')}"
               + ("  (dirty)" if tags.get(tracking.GIT_DIRTY) == "true" else ""))
    click.echo(f"  git tag:     {tags.get(tracking.GIT_TAG, '-')}")
    click.echo(f"  branch:      {tags.get(tracking.GIT_BRANCH, '-')}")
    notes = json.loads(tags.get(tracking.NOTES, "[]"))
    if notes:
        click.echo("notes:")
        for note in notes:
            click.echo(f"  - {note}")
    click.echo("tags:")
    for key in sorted(tags):
        if key not in (tracking.NOTE_CONTENT, "mlflow.log-model.history"):
            click.echo(f"  {key} = {tags[key]}")
    click.echo("params:")
    for key in sorted(run.data.params):
        click.echo(f"  {key} = {run.data.params[key]}")
    click.echo("metrics (last value):")
    for key in sorted(run.data.metrics):
        click.echo(f"  {key} = {run.data.metrics[key]:.6g}")
    click.echo("files changed:")
    for line in changed_since_previous(root, client, run):
        click.echo(f"  {line}")
    if tags.get(tracking.NOTE_CONTENT):
        click.echo("description:")
        for line in tags[tracking.NOTE_CONTENT].splitlines():
            click.echo(f"  {line}")
    click.echo(f"MLflow UI: {tracking.ui_hint(uri)}")
