"""`nf1prov show CODENAME`: one model's state, commit, tags, params, metrics, notes and the
files changed since the previous model."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from nf1prov.commands.common import read_store, tracking_uri_option


def previous_model(client, run):
    """The newest model run with a commit that started before ``run`` (any experiment)."""
    from nf1prov import tracking

    start = run.info.start_time or 0
    for other in tracking.model_runs(client):  # newest first
        if (other.info.run_id != run.info.run_id and (other.info.start_time or 0) < start
                and other.data.tags.get(tracking.GIT_COMMIT)):
            return other
    return None


def changes_since_previous(root, client, run) -> dict:
    """{'previous': codename or None, 'previous_sha', 'files': git's name-status lines or None,
    'note': why there is nothing to compare, or None}."""
    from nf1prov import git, tracking

    result = {"previous": None, "previous_sha": None, "files": None, "note": None}
    sha = run.data.tags.get(tracking.GIT_COMMIT)
    if root is None:
        return {**result, "note": "not inside a git repository: cannot compare commits"}
    if not sha or not git.SHA_RE.match(sha) or not git.commit_exists(root, sha):
        return {**result, "note": f"commit {sha or 'unknown'} is not in this repository"}
    prev = previous_model(client, run)
    if prev is None:
        return {**result, "note": "first model: no previous model to compare with"}
    prev_sha = prev.data.tags[tracking.GIT_COMMIT]
    result.update(previous=prev.info.run_name, previous_sha=prev_sha)
    if not git.SHA_RE.match(prev_sha) or not git.commit_exists(root, prev_sha):
        return {**result, "note": f"previous model {prev.info.run_name}'s commit is not in "
                                  "this repository"}
    return {**result, "files": git.changed_files(root, prev_sha, sha)}


def change_lines(changes: dict) -> list[str]:
    """`changes_since_previous` as the lines `show` prints."""
    if changes["files"] is None:
        return [f"({changes['note']})"]
    header = f"versus {changes['previous']} ({changes['previous_sha'][:10]}):"
    return [header] + ([f"  {line}" for line in changes["files"]] or ["  (no files changed)"])


def _time(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def _iso(ms) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat() if ms else None


def record(root, uri, client, run) -> dict:
    """Everything `show` says about a run, as plain data (``--json``)."""
    from nf1prov import tracking
    from nf1prov.description import readable_tags
    from nf1prov.provenance import liveness

    info, tags = run.info, readable_tags(run)  # long values whole; damage said on stderr
    state = liveness.run_state(run)
    return {
        "codename": info.run_name, "kind": tags.get(tracking.KIND), "status": state,
        "failure": tags.get(tracking.FAILURE),
        "crash_reason": liveness.crash_reason(run) if state == liveness.CRASHED else None,
        "run_id": info.run_id, "experiment_id": info.experiment_id,
        "start_time": _iso(info.start_time), "end_time": _iso(info.end_time),
        "commit": tags.get(tracking.GIT_COMMIT), "dirty": tags.get(tracking.GIT_DIRTY) == "true",
        "git_tag": tags.get(tracking.GIT_TAG), "branch": tags.get(tracking.GIT_BRANCH),
        "notes": tracking.read_notes(tags)[0],
        "description": tags.get(tracking.NOTE_CONTENT),
        "tags": {k: v for k, v in sorted(tags.items())  # notes are under "notes"
                 if k not in (tracking.NOTE_CONTENT, "mlflow.log-model.history")
                 and not tracking.is_note_tag(k)},
        "params": dict(sorted(run.data.params.items())),
        "metrics": dict(sorted(run.data.metrics.items())),
        "changes": changes_since_previous(root, client, run),
        "tracking_uri": tracking.ui_hint(uri),
        "run_url": tracking.run_url(uri, info.experiment_id, info.run_id),
    }


@click.command("show")
@click.argument("codename")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (for scripts) instead of the text below.")
@tracking_uri_option
def command(codename, as_json, tracking_uri) -> None:
    """Show one model: status, commit, tags, params, metrics, notes, files changed."""
    from nf1prov import tracking
    from nf1prov.provenance import train_flow

    def find_and_record(root, uri, store):  # MLflow not imported where the store is read
        run = train_flow.find_run(store, codename)  # directly (`read_store`)
        return run, record(root, uri, store, run)

    root, uri, (run, shown) = read_store(tracking_uri, find_and_record)
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(f"{shown['codename']}  ({shown['kind'] or '?'})")
    click.echo(f"  status:      {shown['status']}"
               + (f" - {shown['failure']}" if shown["failure"] else ""))
    if shown["crash_reason"]:
        click.echo(f"               {shown['crash_reason']}; mark it FAILED with "
                   "`nf1prov list --reap`")
    click.echo(f"  run ID:      {shown['run_id']}  (experiment {shown['experiment_id']})")
    click.echo(f"  started:     {_time(run.info.start_time)}   ended: {_time(run.info.end_time)}")
    click.echo(f"  commit:      {shown['commit'] or '-'}" + ("  (dirty)" if shown["dirty"] else ""))
    click.echo(f"  git tag:     {shown['git_tag'] or '-'}")
    click.echo(f"  branch:      {shown['branch'] or '-'}")
    if shown["notes"]:
        click.echo("notes:")
        for note in shown["notes"]:
            click.echo(f"  - {note}")
    click.echo("tags:")
    for key, value in shown["tags"].items():
        click.echo(f"  {key} = {value}")
    click.echo("params:")
    for key, value in shown["params"].items():
        click.echo(f"  {key} = {value}")
    click.echo("metrics (last value):")
    for key, value in shown["metrics"].items():
        click.echo(f"  {key} = {value:.6g}")
    click.echo("files changed:")
    for line in change_lines(shown["changes"]):
        click.echo(f"  {line}")
    if shown["description"]:
        click.echo("description:")
        for line in shown["description"].splitlines():
            click.echo(f"  {line}")
    click.echo(f"MLflow UI: {shown['tracking_uri']}")
    click.echo(f"run page:  {tracking.run_page_line(uri, run.info.experiment_id, run.info.run_id)}")
