"""`nf1prov search-join CODENAME [--workers N] [--data-root DIR] [--tracking-uri URI]`: run
trials of a model's hyper-parameter search on this machine, while the model trains elsewhere.

The model run must be RUNNING and searching in a database this machine can reach (its tag
`nf1prov.search.study`; a sqlite study only from the machine that trains the model), this
repository's HEAD must be the model's commit (`nf1prov checkout CODENAME`), and the data must
give the run's own split manifest. Then N worker processes (`nf1prov.train.search_worker`) run
trials into the model's study, as nested runs of the model run, from a snapshot of the model's
commit (so an uncommitted edit never trains), until the study holds its `train.trials` trials.
The model run picks the best trial, whichever machine trained it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import click

from nf1prov.commands.common import open_store, tracking_uri_option
from nf1prov.errors import Nf1provError, UserError

POLL_S = 1.0


class JoinFailed(Nf1provError):
    """Every worker process of this machine failed; their messages say why. Exit 1."""

    exit_code = 1


@click.command("search-join")
@click.argument("codename")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trial processes to run on this machine (the CPUs are shared out).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="This machine's copy of the data (default: the logged config's data.root, "
                   "relative to the repository root).")
@click.option("--run-id", default=None, help="Pick one run when the codename is ambiguous.")
@tracking_uri_option
def command(codename: str, workers: int, data_root: Path | None, run_id: str | None,
            tracking_uri: str | None) -> None:
    """Run trials of a model's running hyper-parameter search on this machine.

    CODENAME is a model whose `nf1prov train` (train.trials > 1) runs now, with its Optuna
    study in a shared database ($NF1PROV_SEARCH_STORAGE or train.search_storage, e.g.
    postgresql+psycopg2://user@host/optuna). Check out the model's commit first (`nf1prov
    checkout CODENAME`); set NF1PROV_SEARCH_STORAGE to the study's URL when it needs a password.

    Example: nf1prov search-join fearless-eel-256 --workers 2
    """
    root, uri, client = open_store(tracking_uri)
    if root is None:
        raise UserError("nf1prov search-join must run inside a clone of the repository that "
                        "holds the model's commit (`nf1prov checkout CODENAME` there first).")
    join_search(root, client, uri, codename, workers=workers, data_root=data_root,
                run_id=run_id, echo=click.echo)


def join_search(root: Path, client, tracking_uri: str, ref: str, *, workers: int = 1,
                data_root: Path | str | None = None, run_id: str | None = None,
                echo=print) -> list[int]:
    """Run trials of model ``ref``'s search here until its study holds its trials; returns the
    numbers of the trials this machine trained. Refusals are UserErrors, checked before any
    trial starts."""
    from nf1prov import git, tracking
    from nf1prov.provenance import code_snapshot
    from nf1prov.provenance.preflight import CACHE_DIR, resolve_data_root
    from nf1prov.provenance.resolve import resolve_model
    from nf1prov.train import search_worker as sw

    model = resolve_model(client, ref, run_id=run_id, repo_root=root)
    run, name = model.run, model.codename
    tags = run.data.tags
    if tags.get(tracking.KIND) != tracking.KIND_MODEL:
        raise UserError(f"{name} (run {model.run_id}) was trained with --no-commit: its code is "
                        "in no commit, so no other machine can run the same code. Train the "
                        "model with a commit to let other machines join its search.")
    if run.info.status != "RUNNING":
        raise UserError(f"{name} (run {model.run_id}) is {run.info.status}, not RUNNING: its "
                        "search is over and takes no more trials. Join the search of a model "
                        "that is training now (`nf1prov list` shows RUNNING ones).")
    study_name = tags.get(sw.STUDY_TAG)
    if not study_name:
        raise UserError(f"{name} (run {model.run_id}) has no {sw.STUDY_TAG} tag: it runs no "
                        "hyper-parameter search another machine can join (train.trials is 1, "
                        "or its code predates shared studies). Train with train.trials > 1 "
                        "to search.")
    head = git.head_sha(root)
    if head != model.sha:
        raise UserError(f"This repository's HEAD ({(head or 'no commit')[:12]}) is not "
                        f"{name}'s commit {model.sha[:12]}: its trials must run the model's own "
                        f"code. Run `nf1prov checkout {name}` (or `nf1prov checkout {name} "
                        "--worktree PATH` and join from PATH), then join again.")
    url = study_storage(tags, name)
    config = logged_config(client, model.run_id, name)
    data_path = resolve_data_root(root, config, str(data_root) if data_root else None)
    cache_dir = root / CACHE_DIR
    check_manifest(client, model.run_id, name, config, data_path, cache_dir)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=sw.open_storage(url))
    except KeyError:
        raise UserError(f"The storage {sw.masked(url)} holds no study {study_name} (the study "
                        f"{name}'s run names): set {sw.STORAGE_ENV} to the database the model "
                        "trains with, or unset it.") from None
    wanted = int(study.user_attrs.get(sw.TRIALS_ATTR, 0))
    if sw.trial_count(study) >= wanted:
        echo(f"{name}'s study {study_name} already holds its {wanted} trials: nothing to join.")
        return []

    threads = sw.threads_per_worker(workers, config["train"].get("threads", 0))
    echo(f"Joining {name}'s search (study {study_name} in {sw.masked(url)}): {workers} "
         f"worker(s), {threads} torch thread(s) each.")
    with code_snapshot.snapshot(root, model.sha) as code_root:
        spec = sw.WorkerSpec(tracking_uri=tracking_uri, storage=url, study_name=study_name,
                             parent_run_id=model.run_id, config=config,
                             data_root=str(data_path), cache_dir=str(cache_dir),
                             code_root=str(code_root), threads=threads, parent_pid=os.getpid())
        processes = sw.launch(spec, workers)
        try:
            while any(p.poll() is None for p in processes):
                time.sleep(POLL_S)
        finally:
            sw.stop(processes)
    pids = {p.pid for p in processes}
    ran = sorted(t.number for t in study.get_trials(deepcopy=False)
                 if t.user_attrs.get(sw.HOST_ATTR) == socket.gethostname()
                 and t.user_attrs.get(sw.PID_ATTR) in pids and sw.RUN_ID_ATTR in t.user_attrs)
    codes = [p.returncode for p in processes]
    if not ran and any(codes):
        raise JoinFailed(f"The search worker(s) of this machine failed (exit codes "
                         f"{', '.join(map(str, codes))}) before training a trial of {name}: "
                         "their messages above say why.")
    echo(f"This machine trained trial(s) {', '.join(map(str, ran)) or 'none'} of {name}; the "
         f"study holds {sw.trial_count(study)} of its {wanted} trials. {name}'s own training "
         "picks the best trial when all have ended.")
    return ran


def study_storage(tags: dict, name: str) -> str:
    """The study's storage URL for this machine, from the model run's tag and
    $NF1PROV_SEARCH_STORAGE (which may add the password the tag masks)."""
    from sqlalchemy.engine import make_url

    from nf1prov import tracking
    from nf1prov.train import search_worker as sw

    recorded = tags.get(sw.STORAGE_TAG, "")
    if recorded.startswith("sqlite"):
        host, here = tags.get(tracking.HOST), socket.gethostname()
        db = sw.sqlite_file(recorded)
        if host != here or db is None or not db.is_file():
            raise UserError(
                f"{name}'s search keeps its trials in a sqlite file on the machine that trains "
                f"it ({host or 'unknown host'}: {db}), which another machine cannot share. Train "
                f"the model with its study in a shared database instead: "
                f"`{sw.STORAGE_ENV}=postgresql+psycopg2://user@db-host/optuna nf1prov train "
                "...` (docs/training.md, \"Searching with several workers / machines\"), then "
                "join that model's search.")
        return recorded
    given = os.environ.get(sw.STORAGE_ENV, "").strip()
    if given and sw.masked(given) != recorded:
        raise UserError(f"{sw.STORAGE_ENV} is {sw.masked(given)}, but {name}'s study is in "
                        f"{recorded}: set {sw.STORAGE_ENV} to that database's URL (with its "
                        "password), or unset it.")
    url = given or recorded
    if make_url(url).password == "***":
        raise UserError(f"{name}'s study is in {recorded}, whose password is not recorded: set "
                        f"{sw.STORAGE_ENV} to the full URL, password included, then join "
                        "again.")
    return url


def logged_config(client, run_id: str, name: str) -> dict:
    """The model run's resolved config (`config/config.toml`), loaded and validated."""
    from nf1prov.config import load_config

    with tempfile.TemporaryDirectory(prefix="nf1prov-join-") as tmp:
        try:
            path = client.download_artifacts(run_id, "config/config.toml", tmp)
        except Exception as exc:  # noqa: BLE001 - missing artifact or unreachable store
            raise UserError(f"Cannot read {name}'s config/config.toml (run {run_id}): "
                            f"{exc}.") from None
        return load_config(path)


def check_manifest(client, run_id: str, name: str, config: dict, data_root: Path,
                   cache_dir: Path) -> None:
    """Refuse data whose split manifest (fields of view, their splits and file contents)
    differs from the one the model run logged."""
    import pandas as pd

    from nf1prov.data.manifest import training_rows
    from nf1prov.train.trainer import prepare_data

    with tempfile.TemporaryDirectory(prefix="nf1prov-join-") as tmp:
        try:
            path = client.download_artifacts(run_id, "manifest/split_manifest.csv", tmp)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"Cannot read {name}'s manifest/split_manifest.csv (run {run_id}): "
                            f"{exc}.") from None
        recorded = training_rows(pd.read_csv(path, dtype=str))  # holdout rows: not trained on
    local = prepare_data(config, data_root, cache_dir).manifest.astype(str)
    problems = manifest_differences(recorded, local)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more"
                                           if len(problems) > 8 else "")
        raise UserError(f"The data under {data_root} does not give {name}'s split manifest "
                        f"(its run's manifest/split_manifest.csv): {shown}. Point --data-root "
                        "at a copy of the data the model trains on (same files, same "
                        "content).")


MANIFEST_KEYS = ("split", "image_sha256", "mask_sha256")


def manifest_differences(recorded, local) -> list[str]:
    """What differs between two split manifests, field of view by field of view."""
    a = recorded.set_index("fov_id")
    b = local.set_index("fov_id")
    problems = [f"{fov} missing" for fov in sorted(set(a.index) - set(b.index))]
    problems += [f"{fov} not in the model's data" for fov in sorted(set(b.index) - set(a.index))]
    for fov in sorted(set(a.index) & set(b.index)):
        changed = [key for key in MANIFEST_KEYS if str(a.at[fov, key]) != str(b.at[fov, key])]
        if changed:
            problems.append(f"{fov}: {', '.join(changed)} differ")
    return problems
