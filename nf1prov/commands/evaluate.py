"""`nf1prov evaluate`."""

from __future__ import annotations

from pathlib import Path

import click

from nf1prov.commands.common import tracking_uri_option
from nf1prov.commands.predict import (
    cluster_threads,
    postprocess_options,
    run_id_option,
    scheduler_option,
    threads_option,
    use_threads,
    workers_option,
    z_ratio_option,
)


@click.command("evaluate")
@click.argument("model_ref", metavar="MODEL")
@click.option("--patients", multiple=True, metavar="P",
              help="Patients to evaluate on (repeatable; 'NF0014' also matches NF0014_T1...). "
                   "Default: the patients the run held out (data.holdout_patients).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Dataset root (default: the run's data.root, relative to the repository "
                   "root).")
@click.option("--baseline", is_flag=True,
              help="Also score the classical baseline (Gaussian, Otsu, distance watershed) on "
                   "the same stacks and show the difference.")
@postprocess_options
@z_ratio_option
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--no-log", is_flag=True, help="Print only; log nothing to the model's run.")
@click.option("--overlays", "overlays_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Also write the outline overlays (one PNG per field of view, model and "
                   "ground truth on the slice with the most cells) to this folder (created).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@scheduler_option
@workers_option
@threads_option
@run_id_option
@tracking_uri_option
def command(model_ref, patients, data_root, baseline, seed_threshold, foreground_threshold,
            min_size, z_ratio, batch_size, device, no_log, overlays_dir, no_progress, scheduler,
            workers, threads, run_id, tracking_uri) -> None:
    """Evaluate a model on holdout patients against a classical baseline.

    Prints per-class Dice/IoU and instance precision/recall/F1 (IoU 0.5) and average precision
    (IoU 0.5:0.95), per slice and of cells as 3-D objects (3-D IoU), per patient and overall,
    and logs the overall values to the model's run as holdout_<metric>_<class>,
    holdout_instance_*, holdout_instance3d_* (holdout_baseline_* with --baseline), with the
    per-patient table as the artifact evaluation/holdout_metrics.csv, an outline overlay per
    field of view (model against ground truth, and the baseline with --baseline) under
    evaluation/overlays/, and which patients and data root were scored (tags
    nf1prov.evaluation.patients, nf1prov.evaluation.data_root).
    Patients that are not holdout patients of the model are refused unless --no-log.

    With --scheduler or --workers each field of view is one task on a Dask cluster (the same
    scores as one after another); a field that fails there stops the evaluation, by name, and
    nothing is logged.
    """
    per_worker = cluster_threads(scheduler, workers, threads)
    use_threads(threads)
    import tempfile

    from nf1prov import git
    from nf1prov.commands.predict import chosen_postprocess, load_for_command
    from nf1prov.errors import UserError
    from nf1prov.segment.evaluate import (
        evaluate,
        evaluated_patients,
        format_report,
        holdout_fields,
        log_to_run,
    )

    # On a cluster the workers load the model on --device themselves: here only its settings.
    loaded, client = load_for_command(model_ref, tracking_uri, "cpu" if per_worker is not None
                                      else device, run_id, read_only=no_log)
    data = loaded.config.get("data", {})
    patients = list(patients) or list(data.get("holdout_patients", []))
    if data_root is None:
        root = Path(data.get("root", "data"))
        if not root.is_absolute():
            try:
                root = git.repo_root(".") / root
            except UserError:
                root = Path.cwd() / root
        data_root = root
    fields = holdout_fields(data_root, patients)
    check_patients(loaded, client, fields, logs=not no_log)
    if overlays_dir is not None:
        make_folder(overlays_dir)
    overrides = (seed_threshold, foreground_threshold, min_size)
    postprocess = chosen_postprocess(loaded, *overrides)
    cells = chosen_postprocess(loaded, *overrides, dims=3)
    click.echo(f"Evaluating {loaded.label} on {len(fields)} stack(s) of "
               f"{', '.join(patients)} under {data_root}; instances: {postprocess.describe()}; "
               f"3-D: {cells.describe()}.")
    logs = not no_log and client is not None and loaded.run_id is not None
    with tempfile.TemporaryDirectory(prefix="nf1prov-overlays-") as tmp:
        # drawn only where they go: --overlays, or the run (through a temporary folder)
        overlays = overlays_dir or (Path(tmp) if logs else None)
        options = dict(baseline=baseline, postprocess=postprocess,
                       baseline_min_size=10 if min_size is None else min_size,
                       batch_size=batch_size, overlays=overlays, postprocess3d=cells,
                       z_ratio=z_ratio)
        if per_worker is None:
            evaluation = evaluate(loaded, fields, progress=not no_progress, **options)
        else:
            from nf1prov.commands.predict import model_reference
            from nf1prov.segment.cluster import evaluate_on_cluster
            from nf1prov.segment.evaluate import summarise

            reference = model_reference(model_ref, tracking_uri, loaded.run_id, device)
            scored = evaluate_on_cluster(reference, fields, options, scheduler=scheduler,
                                         workers=workers, threads=per_worker,
                                         progress=not no_progress, echo=click.echo)
            evaluation = summarise(fields, scored, baseline)
        click.echo(format_report(evaluation, loaded.label))
        if overlays_dir is not None:
            click.echo(f"Wrote {len(evaluation.overlays)} overlay(s) to {overlays_dir}.")
        if no_log:
            return
        if not logs:
            click.echo("Not logged: MODEL is a local folder, not a run (pass its codename to "
                       "log).")
            return
        metrics = log_to_run(client, loaded.run_id, evaluation, data_root)
    click.echo(f"Logged {len(metrics)} holdout metrics, evaluation/holdout_metrics.csv and "
               f"{len(evaluation.overlays)} overlay(s) under evaluation/overlays/ to run "
               f"{loaded.run_id} (scored: {', '.join(evaluated_patients(evaluation))}).")


def make_folder(folder: Path) -> None:
    """Create --overlays' folder before anything is evaluated: a folder that cannot be made
    stops the command there, not after minutes of scoring."""
    from nf1prov.errors import UserError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the --overlays folder {folder}: {exc.strerror or exc}. "
                        "Pass a folder you can write to.") from None


def check_patients(loaded, client, fields, logs: bool) -> None:
    """Refuse to log scores of patients that are not the model's holdout patients (DESIGN 3.7:
    only holdout patients produce holdout_*); with nothing to log, say what they are."""
    from nf1prov import tracking
    from nf1prov.errors import UserError
    from nf1prov.segment.evaluate import check_holdout

    in_store = client is not None and loaded.run_id is not None
    splits_tag = client.get_run(loaded.run_id).data.tags.get(tracking.DATA_SPLITS) \
        if in_store else None
    holdout = loaded.config.get("data", {}).get("holdout_patients", [])
    outside = check_holdout(fields, holdout, splits_tag, loaded.label)
    if outside and logs and in_store:
        raise UserError(f"{outside}; only holdout patients' scores are logged as holdout_* "
                        "(the catalogue shows them beside 'Holdout patients'), so nothing was "
                        "evaluated or logged. Leave out --patients to evaluate on the model's "
                        "holdout patients, or add --no-log to print these scores without "
                        "logging them.")
    if outside:
        click.echo(f"Note: {outside}; these are not holdout scores.")
