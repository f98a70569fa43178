"""`nf1prov list`: models (and --no-commit scratch runs) with status, SHA and best Dice.

The status column shows CRASHED for a RUNNING run whose process is gone
(`nf1prov.provenance.liveness`); `--reap` marks those runs FAILED for good. A run whose logging
waits in this clone's outbox (the store went away, `nf1prov.outbox`) shows as WAITING and is
not reaped: `nf1prov sync` ends it. The `remote` column
names the git remotes that hold the model's tag `model/<codename>` ("none": only this clone, or
nobody, has it; `train --push` or `git push origin model/<codename>` shares it), and is empty
when the repository has no remote.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from nf1prov.commands.common import open_store, read_store, tracking_uri_option

BEST_DICE = "best_val_dice_inner-cell"
COLUMNS = ["codename", "date", "status", "kind", "sha", BEST_DICE, "remote", "run_id",
           "experiment_id"]


def remote_column(root, runs, echo) -> dict[str, str]:
    """{codename: remotes holding its model tag, or 'none'} for the committed models."""
    from nf1prov import git, tracking

    if root is None or not git.remotes(root):
        return {}
    found, failed = git.remote_model_tags(root)
    if failed:
        echo(f"nf1prov: warning: the remote(s) {', '.join(failed)} did not answer; the remote "
             "column leaves them out.")
    column = {}
    for run in runs:
        if run.data.tags.get(tracking.KIND) != tracking.KIND_MODEL:
            continue
        tag = f"{git.MODEL_TAG_PREFIX}{run.info.run_name}"
        column[run.info.run_name] = ",".join(r for r, tags in found.items() if tag in tags) \
            or "none"
    return column


def rows(runs, remotes: dict[str, str] | None = None,
         waiting: set[str] = frozenset()) -> list[dict]:
    from nf1prov import tracking
    from nf1prov.provenance import liveness

    out = []
    for run in runs:
        tags = run.data.tags
        start = run.info.start_time
        out.append({
            "codename": run.info.run_name,
            "date": (datetime.fromtimestamp(start / 1000, UTC).strftime("%Y-%m-%d %H:%M")
                     if start else ""),
            "status": WAITING if run.info.run_id in waiting else liveness.run_state(run),
            "kind": tags.get(tracking.KIND, ""),
            "sha": tags.get(tracking.GIT_COMMIT, "") if tags.get(tracking.GIT_DIRTY) != "true"
            else tags.get(tracking.GIT_COMMIT, "") + "+dirty",
            BEST_DICE: run.data.metrics.get(BEST_DICE),
            "remote": (remotes or {}).get(run.info.run_name, ""),
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
        })
    return out


WAITING = "WAITING"  # shown for a run whose logging waits in this clone's outbox


def never_committed(run) -> bool:
    """A model run that ended (FAILED, KILLED) without its model commit: a training refused at
    the commit (a hook, a signing key) in a store older than nf1prov's deleting such runs. It
    is no model, so `list` leaves it out, as the catalogue does; a RUNNING one may yet commit."""
    from nf1prov import tracking

    tags = run.data.tags
    return (tags.get(tracking.KIND) == tracking.KIND_MODEL
            and not (tags.get(tracking.GIT_COMMIT) or "").strip()
            and run.info.status in ("FAILED", "KILLED"))


def waiting_runs(root) -> set[str]:
    """Run IDs whose logging waits in this clone's `.nf1prov/outbox` for `nf1prov sync`."""
    from nf1prov import outbox
    from nf1prov.provenance.preflight import CACHE_DIR

    if root is None:
        return set()
    return {spool.name for spool in outbox.saved(outbox.outbox_root(root / CACHE_DIR))}


def reap(client, runs, echo, waiting: set[str] = frozenset()) -> int:
    """Mark every CRASHED run FAILED with the crash reason (not one whose logging waits in
    this clone's outbox: it trained, and `nf1prov sync` ends it); returns how many."""
    from nf1prov import tracking
    from nf1prov.provenance import liveness

    count = 0
    for run in runs:
        if liveness.run_state(run) != liveness.CRASHED or run.info.run_id in waiting:
            continue
        reason = liveness.crash_reason(run)
        client.set_tag(run.info.run_id, tracking.FAILURE, reason)
        beat = liveness.last_heartbeat(run)
        client.set_terminated(run.info.run_id, status="FAILED",
                              end_time=int(beat * 1000) if beat else None)
        echo(f"reaped {run.info.run_name} ({run.info.run_id}): {reason}")
        count += 1
    return count


def render(table: list[dict], fmt: str) -> str:
    import pandas as pd

    frame = pd.DataFrame(table, columns=COLUMNS)
    if fmt == "json":
        return json.dumps(table, indent=2)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if frame.empty:
        return "No models yet: train one with `nf1prov train --config configs/demo.toml`."
    frame = frame.drop(columns=["experiment_id"])
    frame["sha"] = frame["sha"].str.slice(0, 10)
    frame[BEST_DICE] = frame[BEST_DICE].map(lambda v: "" if v is None or v != v else f"{v:.4f}")
    return frame.to_string(index=False)


@click.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format (csv/json keep full SHAs and run IDs).")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@click.option("--reap", "do_reap", is_flag=True,
              help="Mark RUNNING runs whose process is gone (CRASHED) as FAILED, with the time "
                   "of their last heartbeat as nf1prov.failure.")
@click.option("--all-kinds", is_flag=True, help="Include nested Optuna trial runs.")
@tracking_uri_option
def command(fmt, as_json, do_reap, all_kinds, tracking_uri) -> None:
    """List models, newest first: codename, date, status (incl. CRASHED), SHA, best val Dice.

    Scratch runs (trained with --no-commit) are listed with kind 'scratch'.
    """
    from nf1prov import tracking

    if as_json:
        fmt = "json"
    kinds = (tracking.KIND_MODEL, tracking.KIND_SCRATCH)
    if all_kinds:
        kinds += (tracking.KIND_TRIAL,)
    warn = lambda text: click.echo(text, err=True)  # noqa: E731
    if do_reap:  # writes: through MLflow
        root, _, client = open_store(tracking_uri)
        runs, waiting = tracking.model_runs(client, kinds), waiting_runs(root)
        if reap(client, runs, warn, waiting):
            runs = tracking.model_runs(client, kinds)
    else:  # MLflow not imported where the store is read directly (`read_store`)
        root, _, runs = read_store(tracking_uri,
                                   lambda _root, _uri, store: tracking.model_runs(store, kinds))
        waiting = waiting_runs(root)
    runs = [run for run in runs if not never_committed(run)]
    click.echo(render(rows(runs, remote_column(root, runs, warn), waiting), fmt))
    if waiting:
        warn(f"nf1prov: {len(waiting)} training(s) here ({WAITING}) trained while the tracking "
             "store was away and have logging waiting in .nf1prov/outbox: run `nf1prov sync`.")
