"""`nf1prov train`: preflight, MLflow run, model commit + tag, contract tags, training.

The flow and its failure handling live in `nf1prov.provenance.train_flow`; this is the click
wrapper. Exit codes: 0 trained; 2 a user error (nothing created when preflight refused); 1 the
training itself failed (the run is FAILED with nf1prov.failure; commit and tag stay);
130/143 interrupted by Ctrl-C/SIGTERM (the run is KILLED).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import traceback

import click

from nf1prov.commands.common import stdout_to_stderr, tracking_uri_option
from nf1prov.errors import Nf1provError, UserError


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              metavar="PATH", help="Training config (TOML), e.g. configs/demo.toml. Optional "
              "with --resume (default: the config the run logged).")
@click.option("--data-root", default=None, metavar="DIR",
              help="Dataset folder (default: config data.root, relative to the repo root).")
@click.option("--experiment", default=None, metavar="NAME",
              help="MLflow experiment (default: config experiment.name).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=3 (repeatable).")
@click.option("--no-commit", is_flag=True,
              help="Train without committing: a 'scratch' run tagged with HEAD's SHA (and the "
                   "uncommitted diff as an artifact); it never enters the catalogue.")
@click.option("--resume", "resume_name", default=None, metavar="CODENAME",
              help="Continue a FAILED/KILLED/crashed model in the same run from its last "
                   "checkpoint, with the code of its own commit.")
@click.option("--max-file-mb", type=float, default=None, metavar="N",
              help="Refuse to commit files larger than N MB (default: config "
                   "experiment.max_commit_file_mb, 10).")
@click.option("--push", is_flag=True,
              help="Push the model's tag model/<codename> (and so its commit) to a git remote as "
                   "soon as it is committed, before training, so that collaborators (and "
                   "`search-join` on other machines) can check its code out.")
@click.option("--remote", default=None, metavar="NAME",
              help="The remote --push sends to (default: the branch's upstream remote, else "
                   "origin, else the only remote).")
@click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Data-parallel training in N processes on this machine (one GPU each on "
                   "CUDA; gloo on CPU); the same as --set train.nproc=N. train.batch_size stays "
                   "the global batch. See docs/training.md for several machines (torchrun).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Torch CPU threads of the training process (of each process with --nproc); "
                   "the same as --set train.threads=N. Default: OMP_NUM_THREADS when set, else "
                   "the CPUs this process may use (docs/training.md, CPU threads).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the outcome as one JSON object on standard output (codename, run ID, "
                   "commit, best epoch, validation Dice, instance parameters); everything else "
                   "goes to standard error.")
@tracking_uri_option
def command(config_path, data_root, experiment, overrides, no_commit, resume_name, max_file_mb,
            push, remote, nproc, threads, as_json, tracking_uri) -> None:
    """Train a model, commit its code and tag its MLflow run.

    Every change git does not ignore is committed as the model's one commit (subject
    'Model run codename: <codename> Run ID: <id> Experiment ID: <id>'), tagged model/<codename>,
    and the run is tagged with that SHA. Works in MLflow projects: `mlflow run . -e train`.
    """
    data_root = data_root or None  # MLproject passes '' for "not given"
    experiment = experiment or None
    if remote and not push:
        raise UserError("--remote names where --push sends the model: add --push.")
    from nf1prov import threads as cpu_threads
    from nf1prov.provenance import launched

    cpu_threads.watch_from_now()  # the preflight is the window: what else keeps the CPUs busy
    world = launched.world()
    if world is not None:  # started by torchrun: one of world.size ranks
        if nproc is not None or resume_name or no_commit:
            raise UserError("Under torchrun, --nnodes and --nproc-per-node set the processes "
                            "(not --nproc), and --resume and --no-commit are not supported: "
                            "resume a model on one machine with `nf1prov train --resume NAME "
                            "--nproc N`.")
        nproc = world.size
    if nproc is not None:
        overrides = (*overrides, f"train.nproc={nproc}")
    if threads is not None:
        overrides = (*overrides, f"train.threads={threads}")
    if world is not None and world.rank != 0:
        sys.exit(launched.follow(world.rank, data_root))
    if push:  # refused before anything exists, like every other preflight problem
        if no_commit:
            raise UserError("--push sends the model commit's tag, and --no-commit makes none: "
                            "drop one of the two.")
        from nf1prov import git

        remote = git.push_remote(git.repo_root("."), remote)
    try:
        if as_json:
            with stdout_to_stderr():
                record = lead(config_path, data_root, experiment, overrides, no_commit,
                              resume_name, max_file_mb, push, remote, tracking_uri, world,
                              echo=lambda text: click.echo(text, err=True))
            click.echo(json.dumps(record, indent=2))
            for failure in record["push_failures"]:
                click.echo(failure, err=True)
            print_health_warnings(record)
            if record["push_failures"]:
                sys.exit(1)
        else:
            lead(config_path, data_root, experiment, overrides, no_commit, resume_name,
                 max_file_mb, push, remote, tracking_uri, world)
    except BaseException as exc:
        if world is not None and not isinstance(exc, SystemExit):
            with contextlib.suppress(Exception):  # tell the waiting ranks, if not yet told
                launched.publish({"error": str(exc) or type(exc).__name__})
        raise


def lead(config_path, data_root, experiment, overrides, no_commit, resume_name, max_file_mb,
         push, remote, tracking_uri, world, echo=None) -> dict | None:
    """`nf1prov train` proper: on its own, or as rank 0 of torchrun's processes (``world``).
    With ``echo`` (``--json``), messages go through it and the outcome is returned as a dict
    (`outcome_record`) instead of printed."""
    as_json = echo is not None
    echo = echo or click.echo
    from nf1prov.provenance import launched, preflight, run_end, train_flow

    adopt = train_flow.adopted_run_id()
    tmp = None
    if resume_name:
        if no_commit or adopt:
            raise UserError("--resume continues an existing run: it cannot be combined with "
                            "--no-commit or run under `mlflow run`.")
        plan, run, checkpoint, tmp = train_flow.prepare_resume(
            name=resume_name, config_path=config_path or None, overrides=overrides,
            data_root=data_root, tracking_uri=tracking_uri)
        trained_with = int(run.data.params.get("train.nproc", "1"))
        if plan.config["train"]["nproc"] != trained_with:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"Model {resume_name} trained with train.nproc = {trained_with}: "
                            f"resume it with the same number of processes (--nproc "
                            f"{trained_with}), so that it goes on as it began.")
    else:
        if not config_path:
            raise UserError("Missing --config PATH: pass a training config such as "
                            "configs/demo.toml (or --resume CODENAME to continue a model).")
        try:
            plan = preflight.preflight(config_path=config_path, overrides=overrides,
                                       data_root=data_root, experiment=experiment,
                                       tracking_uri=tracking_uri, max_file_mb=max_file_mb,
                                       no_commit=no_commit, adopt_run_id=adopt)
        except UserError as exc:
            if adopt:  # `mlflow run` already made the run: say why it never trained
                train_flow.fail_adopted_run(adopt, tracking_uri, str(exc))
            raise
    progress = train_flow.Progress()
    push_failures: list[str] = []

    def push_now(done: train_flow.Progress) -> None:
        failure = push_model(done.codename, remote, echo)
        if failure:
            push_failures.append(failure)

    def after_commit(done: train_flow.Progress) -> None:
        if push:
            push_now(done)
        if world is not None:  # the other ranks wait for this to start training
            launched.publish(launched.describe(done, plan.config))

    try:
        with train_flow.sigterm_as_exception():
            if resume_name:
                outcome = train_flow.resume(plan, run, checkpoint, echo=echo,
                                            progress=progress)
            else:
                outcome = train_flow.train(plan, echo=echo, progress=progress,
                                           after_commit=after_commit)
    except (KeyboardInterrupt, train_flow.Interrupted) as exc:
        if world is not None:
            launched.blame_follower(plan.client, progress.run_id, world.size)
        reason = getattr(exc, "reason", "interrupted by Ctrl-C (SIGINT)")
        click.echo(f"nf1prov: training stopped ({reason}). {after_stop(progress, plan.client)}",
                   err=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except train_flow.TrainingFailed:
        raise  # the training process printed its traceback; the run says why
    except train_flow.LoggingPending:
        for failure in push_failures:
            click.echo(failure, err=True)
        raise
    except Nf1provError:
        if progress.run_id:
            click.echo(f"nf1prov: {after_stop(progress, plan.client)}", err=True)
        raise
    except Exception as exc:
        full = run_end.store_disk_full(exc, plan.client)
        if full is not None:
            click.echo(f"nf1prov: {after_stop(progress, plan.client)}", err=True)
            raise full from None
        traceback.print_exc(file=sys.stderr)
        raise train_flow.TrainingFailed(
            f"training failed: {type(exc).__name__}: {exc}. The run is marked FAILED "
            f"(nf1prov.failure); `nf1prov show {progress.codename or progress.run_id}` has the "
            "details.") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if push and resume_name:  # a resumed model's commit is older: push it now
        push_now(progress)
    record = outcome_record(outcome, plan.client)
    record["pushed_to"] = remote if push and not push_failures else None
    record["push_failures"] = push_failures
    if as_json:
        return record
    print_outcome(record)
    for failure in push_failures:  # the model is fine; the command did not do all it was asked
        click.echo(failure, err=True)
    print_health_warnings(record)
    if push_failures:
        sys.exit(1)
    return None


def push_model(codename: str, remote: str, echo=click.echo) -> str | None:
    """Push the model's tag; None, or the message that says how to push it later."""
    from nf1prov import git

    root = git.repo_root(".")
    try:
        git.push_model_tag(root, remote, codename)
    except git.GitError as exc:
        return (f"nf1prov: the model {codename} is committed and tagged here, but pushing its "
                f"tag to {remote} failed; push it later with `git push {remote} "
                f"model/{codename}`. {exc}")  # git's own lines, all of them, last
    echo(f"pushed:     model/{codename} to {remote} ({git.remote_url(root, remote)})")
    return None


def after_stop(progress, client) -> str:
    """What exists after a training stopped early, and the command that continues it: only
    one that can work."""
    from nf1prov.provenance import training

    name = progress.codename or progress.run_id
    if progress.run_id is None:
        return "Nothing was created."
    again = "run the same `nf1prov train` command again"
    if progress.discarded:
        return (f"Nothing was created: run {name} ended before its model commit, so it is no "
                f"model and was deleted; {again}.")
    if progress.sha is None or progress.codename is None:
        return (f"Run {name} ended before its model commit, so it is not a model and there is "
                f"nothing to resume: {again}.")
    if not progress.resumable:
        return (f"Run {name} was a --no-commit run on a dirty tree, which cannot be resumed: "
                f"{again}.")
    if not training.has_checkpoint(client, progress.run_id):
        return (f"Model {name} (commit {progress.sha[:12]}) stopped before its first "
                f"checkpoint, so there is nothing to resume: {again}.")
    return (f"Model {name} (commit {progress.sha[:12]}) keeps its last checkpoint; continue it "
            f"with `nf1prov train --resume {name}`.")


def outcome_record(outcome, client) -> dict:
    """What `train` reports about the model it made, as plain data (``--json``): its identity,
    and the best epoch's validation Dice and the instance parameters chosen for it, read back
    from its run (None when the store cannot say: the run holds them all the same)."""
    from nf1prov import tracking
    from nf1prov.segment.instances import PARAM_PREFIX, PARAM_PREFIX_3D, PostProcess

    model = outcome.kind == "model"
    record = {"codename": outcome.codename, "run_id": outcome.run_id,
              "experiment_id": outcome.experiment_id, "kind": outcome.kind,
              "commit": outcome.sha if model else None, "head": None if model else outcome.sha,
              "git_tag": f"model/{outcome.codename}" if model else None,
              "resumed": outcome.resumed,
              "tracking_uri": tracking.public_uri(outcome.tracking_uri),
              "mlflow_ui": tracking.ui_hint(outcome.tracking_uri),
              "run_url": tracking.run_url(outcome.tracking_uri, outcome.experiment_id,
                                          outcome.run_id),
              "best_epoch": None, "epochs_run": None, "best_val_dice": {}, "instances": None,
              "val_instance_f1": None, "instances3d": None, "val_instance3d_f1": None,
              "health": None}
    try:
        run = client.get_run(outcome.run_id)
    except Exception:
        return record
    metrics, params = run.data.metrics, run.data.params
    if "best_epoch" in metrics:
        record["best_epoch"] = int(metrics["best_epoch"])
        record["epochs_run"] = int(metrics.get("epochs_run", metrics["best_epoch"]))
    record["best_val_dice"] = {key.removeprefix("best_val_dice_"): value
                               for key, value in sorted(metrics.items())
                               if key.startswith("best_val_dice_")}
    chosen = PostProcess.from_mapping(params, prefix=PARAM_PREFIX)
    record["instances"] = chosen.values() if chosen is not None else None
    record["val_instance_f1"] = metrics.get("val_instance_f1")
    cells = PostProcess.from_mapping(params, prefix=PARAM_PREFIX_3D)
    record["instances3d"] = cells.values() if cells is not None else None
    record["val_instance3d_f1"] = metrics.get("val_instance3d_f1")
    record["health"] = run.data.tags.get(tracking.HEALTH)
    return record


def print_outcome(record: dict) -> None:
    from nf1prov import tracking

    click.echo(f"codename:   {record['codename']}")
    click.echo(f"run ID:     {record['run_id']}")
    click.echo(f"experiment: {record['experiment_id']}")
    if record["kind"] == "model":
        click.echo(f"commit:     {record['commit'] or '(no commit yet)'}")
        click.echo(f"git tag:    {record['git_tag']}")
    else:
        click.echo(f"HEAD:       {record['head'] or '(no commit yet)'}")
        click.echo("kind:       scratch (--no-commit: not a catalogued model)")
    click.echo(f"MLflow UI:  {record['mlflow_ui']}")
    click.echo("run page:   " + tracking.run_page_line(record["tracking_uri"],
                                                   record["experiment_id"], record["run_id"]))
    if record["best_epoch"] is not None:
        dice = ", ".join(f"{name} {record['best_val_dice'][name]:.3f}"
                         for name in ("inner-cell", "cell-boundary")
                         if name in record["best_val_dice"])
        click.echo(f"best epoch: {record['best_epoch']} of {record['epochs_run']}; "
                   f"val Dice {dice}")
    if record["instances"] is not None:
        from nf1prov.segment.instances import PostProcess

        scored = (f" (val instance F1 {record['val_instance_f1']:.3f})"
                  if record["val_instance_f1"] is not None else "")
        click.echo(f"instances:  {PostProcess(**record['instances']).describe()}{scored}")
    if record.get("instances3d") is not None:
        from nf1prov.segment.instances import PostProcess

        scored = (f" (val 3-D instance F1 {record['val_instance3d_f1']:.3f})"
                  if record["val_instance3d_f1"] is not None else "")
        click.echo(f"3-D cells:  {PostProcess(**record['instances3d']).describe()}{scored}")
    if record["health"] is not None:
        click.echo(f"health:     {'warning (below)' if record['health'] != 'ok' else 'ok'}")


def print_health_warnings(record: dict) -> None:
    """The model's health warnings (`nf1prov.train.health`), the last lines `train` prints."""
    from nf1prov.train.health import warning_lines

    for line in warning_lines(record["health"]):
        click.echo(line, err=True)
