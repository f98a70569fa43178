"""`nf1prov predict`."""

from __future__ import annotations

from pathlib import Path

import click

from nf1prov.commands.common import tracking_uri_option

run_id_option = click.option("--run-id", default=None, metavar="RUN_ID",
                             help="The run to use when a codename names several runs.")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, metavar="N",
    help="Torch CPU threads. Default: OMP_NUM_THREADS when set, else the CPUs this process may "
         "use (docs/training.md, CPU threads on a shared machine).")


scheduler_option = click.option(
    "--scheduler", default=None, metavar="tcp://HOST:PORT",
    help="Run on this Dask distributed cluster, one task per stack (docs/predict.md, A screen "
         "on a cluster); paths must be the same on its workers.")
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, metavar="N",
    help="Run on a local Dask cluster of N worker processes, each with the usable CPUs // N "
         "torch threads (unless --threads).")


def use_threads(threads: int | None) -> None:
    """This process's torch threads and OpenMP waiting, set before torch is first imported
    (`nf1prov.threads`): the first thing a verb that predicts does."""
    from nf1prov.threads import use_in_this_process

    use_in_this_process(threads or 0)


def postprocess_options(command):
    """--seed-threshold, --foreground-threshold, --min-size: override the instance parameters
    chosen for the model at the end of its training (`nf1prov.segment.instances`)."""
    threshold = click.FloatRange(0, 1, min_open=True, max_open=True)
    for option in reversed([
        click.option("--seed-threshold", type=threshold, default=None,
                     help="Inner-cell probability above which a pixel seeds a cell. Default: "
                          "the model's (chosen on its validation data)."),
        click.option("--foreground-threshold", type=threshold, default=None,
                     help="1 - background probability above which a pixel belongs to a cell. "
                          "Default: the model's."),
        click.option("--min-size", type=click.IntRange(min=0), default=None,
                     help="Objects smaller than this many pixels (per slice) are merged into "
                          "the cell they touch, or removed. Default: the model's."),
    ]):
        command = option(command)
    return command


def chosen_postprocess(loaded, seed_threshold, foreground_threshold, min_size, dims: int = 2):
    """The model's instance parameters (per slice, or with ``dims=3`` of 3-D cells) with the
    command line's overrides."""
    return loaded.instance_params(dims).replace(seed_threshold=seed_threshold,
                                                foreground_threshold=foreground_threshold,
                                                min_size=min_size)


z_ratio_option = click.option(
    "--z-ratio", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
    help="The z step over the xy pixel size, for cells in 3-D. Default: each stack's physical "
         "sizes (OME or ImageJ metadata), else the model's postprocess.z_ratio (1).")


def load_for_command(model_ref: str, tracking_uri: str | None, device: str,
                     run_id: str | None = None, read_only: bool = False):
    """(LoadedModel, MlflowClient or None) from a local folder (no store needed) or a codename /
    run ID; ``read_only``: the verb will not write to the store (a read-only one will do)."""
    import os

    from nf1prov.provenance.models import load_model

    # MLflow's own download progress bars would interleave with ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if Path(model_ref).expanduser().exists():
        return load_model(model_ref, device=device), None
    from nf1prov.commands.common import open_store

    _, uri, client = open_store(tracking_uri, read_only=read_only)
    return load_model(model_ref, client=client, tracking_uri=uri, run_id=run_id,
                      device=device), client


@click.command("predict")
@click.argument("model_ref", metavar="MODEL")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path),
              help="Folder for the outputs (created; mirrors the inputs' sub-folders).")
@postprocess_options
@click.option("--instances", type=click.Choice(["2d", "3d"]), default="3d", show_default=True,
              help="3d: each cell one label through the slices it spans (stacks of several "
                   "slices; a 2-D image is labelled as with 2d); 2d: each slice labelled on "
                   "its own.")
@z_ratio_option
@click.option("--probabilities-dtype", type=click.Choice(["float16", "float32"]),
              default="float32", show_default=True,
              help="float32: an OME-TIFF every reader opens; float16: half the size, a plain "
                   "TIFF that Fiji/ImageJ cannot open (napari and tifffile can).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Tiles per forward pass.")
@click.option("--overlap", default=None, type=click.IntRange(min=0),
              help="Tile overlap in pixels (default: half the training crop size).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--preview", is_flag=True,
              help="Also write <name>_preview.png: the model's cell outlines on the slice "
                   "with the most cells, titled with the model.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True,
              help="Redo every stack. Default: a stack whose <name>_nf1prov.json names the same "
                   "model, instance parameters, input sha256 and outputs is skipped, its files "
                   "untouched (a rerun resumes where a stopped one ended).")
@scheduler_option
@workers_option
@threads_option
@run_id_option
@tracking_uri_option
def command(model_ref, inputs, outdir, seed_threshold, foreground_threshold, min_size,
            instances, z_ratio, probabilities_dtype, batch_size, overlap, device, preview,
            no_progress, overwrite, scheduler, workers, threads, run_id,
            tracking_uri) -> None:
    """Segment z-stacks with a trained model.

    MODEL is a codename, a run ID, or a local MLflow model folder (e.g.
    .nf1prov/models/<codename>/model from `nf1prov checkout`) with the training config beside it
    (config.toml) or in ../config/config.toml. INPUT is a z-stack (.tif), a folder (its
    *_TRANS.tif files, else all .tif/.tiff) or a glob pattern.

    For each stack writes <name>_probabilities.ome.tif (class probabilities, C,Z,Y,X, float32;
    <name>_probabilities.tif with --probabilities-dtype float16),
    <name>_classes.ome.tif (uint8 class map) and <name>_labels.ome.tif (instance labels,
    uint16, uint32 above 65535 cells; by default each cell one label through the stack, see
    --instances), each with the input's physical pixel sizes and the model named in its
    OME-XML, then <name>_nf1prov.json (model, input sha256, outputs, which instances): its
    presence means the stack is done. napari opens the outputs with nf1prov's reader.
    A rerun skips the stacks done the same way (--overwrite redoes them).

    With --scheduler or --workers each stack is one task on a Dask cluster; a stack that fails
    there is reported by name and the others go on (exit code 1 if any failed).
    """
    from nf1prov.errors import UserError

    per_worker = cluster_threads(scheduler, workers, threads)
    use_threads(threads)
    from nf1prov.segment.files import predict_files

    # On a cluster the workers load the model on --device themselves: here only its settings.
    loaded, _ = load_for_command(model_ref, tracking_uri, "cpu" if per_worker is not None
                                 else device, run_id, read_only=True)
    if overlap is not None and overlap >= loaded.tile_size:
        raise UserError(f"--overlap {overlap} must be smaller than the model's tile size "
                        f"{loaded.tile_size} (its training crop size).")
    overrides = (seed_threshold, foreground_threshold, min_size)
    postprocess = chosen_postprocess(loaded, *overrides)
    cells = chosen_postprocess(loaded, *overrides, dims=3) if instances == "3d" else None
    where = f"{loaded.device}" if per_worker is None else f"{device} on the workers"
    click.echo(f"Model {loaded.label}: {loaded.input_slices} input slices, tiles of "
               f"{loaded.tile_size} px, {loaded.normalisation} normalisation, device "
               f"{where}; instances: {(cells or postprocess).describe()}"
               + ("; 2-D images per slice: " + postprocess.describe() if cells else "") + ".")
    options = dict(postprocess=postprocess, postprocess3d=cells, batch_size=batch_size,
                   overlap=overlap, probabilities_dtype=probabilities_dtype, preview=preview,
                   z_ratio=z_ratio, overwrite=overwrite)
    if per_worker is None:
        from nf1prov.segment.cluster import StackOutcome

        outcomes = (StackOutcome(path, files) for path, files in predict_files(
            loaded, inputs, outdir, progress=not no_progress, instances=instances, **options))
    else:
        from nf1prov.segment.cluster import predict_on_cluster
        from nf1prov.segment.files import stack_jobs

        reference = model_reference(model_ref, tracking_uri, loaded.run_id, device)
        outcomes = predict_on_cluster(reference, stack_jobs(inputs, outdir), options,
                                      scheduler=scheduler, workers=workers,
                                      threads=per_worker, progress=not no_progress,
                                      echo=click.echo)
    report(outcomes, outdir)


def cluster_threads(scheduler: str | None, workers: int | None,
                    threads: int | None) -> int | None:
    """None without --scheduler or --workers (the serial path), else each Dask worker's torch
    threads (`worker_threads`); both together are refused."""
    from nf1prov.errors import UserError

    if scheduler and workers:
        raise UserError("Pass --scheduler (an existing Dask cluster) or --workers N (a local "
                        "one), not both.")
    return worker_threads(threads, workers) if scheduler or workers else None


def worker_threads(threads: int | None, workers: int | None) -> int:
    """Torch threads of each Dask worker: --threads; else, on a local cluster, OMP_NUM_THREADS
    or the usable CPUs shared out among the workers (at least one each); else (--scheduler) 0:
    each worker's own OMP_NUM_THREADS (dask's nanny sets 1), else its CPUs."""
    from nf1prov.threads import choose

    if threads or workers:
        return choose(threads or 0, processes=workers or 1, setting_name="--threads").threads
    return 0


def model_reference(model_ref: str, tracking_uri: str | None, run_id: str | None, device: str):
    """What a Dask worker loads the model from (`ModelReference`): a folder's absolute path,
    or the codename / run ID with the store's resolved URI and the run it resolved to here."""
    from nf1prov.commands.common import locate_store
    from nf1prov.provenance.models import ModelReference

    folder = Path(model_ref).expanduser()
    if folder.exists():
        return ModelReference(str(folder.resolve()), device=device)
    return ModelReference(model_ref, locate_store(tracking_uri)[1], run_id, device)


def report(outcomes, outdir: Path) -> None:
    """One line per stack as it finishes, then the summary; CheckFailed (exit 1) listing the
    stacks that failed, by name and reason."""
    from nf1prov.errors import CheckFailed

    written, skipped, failed = 0, 0, []
    for outcome in outcomes:
        if outcome.error is not None:
            failed.append(outcome)
            click.echo(f"{outcome.path}: failed: {outcome.error}", err=True)
        elif outcome.files.skipped:
            skipped += 1
            click.echo(f"{outcome.path}: done before, skipped")
        else:
            written += 1
            click.echo(f"{outcome.path}: {outcome.files.n_cells} cells -> "
                       f"{outcome.files.labels}")
    click.echo(f"Wrote predictions of {written} stack(s) to {outdir}"
               + (f"; skipped {skipped} done before by the same model with the same instance "
                  "parameters (--overwrite redoes them)" if skipped else "") + ".")
    if failed:
        lines = "\n".join(f"  {outcome.path}: {outcome.error}" for outcome in failed)
        raise CheckFailed(f"{len(failed)} stack(s) failed; the others are done:\n{lines}\n"
                          "Fix or remove these files and rerun the same command: the stacks "
                          "done are skipped.")
