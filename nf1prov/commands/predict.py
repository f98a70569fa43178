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
@threads_option
@run_id_option
@tracking_uri_option
def command(model_ref, inputs, outdir, seed_threshold, foreground_threshold, min_size,
            instances, z_ratio, probabilities_dtype, batch_size, overlap, device, preview,
            no_progress, threads, run_id, tracking_uri) -> None:
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
    """
    use_threads(threads)
    from nf1prov.errors import UserError
    from nf1prov.segment.files import predict_files

    loaded, _ = load_for_command(model_ref, tracking_uri, device, run_id, read_only=True)
    if overlap is not None and overlap >= loaded.tile_size:
        raise UserError(f"--overlap {overlap} must be smaller than the model's tile size "
                        f"{loaded.tile_size} (its training crop size).")
    overrides = (seed_threshold, foreground_threshold, min_size)
    postprocess = chosen_postprocess(loaded, *overrides)
    cells = chosen_postprocess(loaded, *overrides, dims=3) if instances == "3d" else None
    click.echo(f"Model {loaded.label}: {loaded.input_slices} input slices, tiles of "
               f"{loaded.tile_size} px, {loaded.normalisation} normalisation, device "
               f"{loaded.device}; instances: {(cells or postprocess).describe()}"
               + ("; 2-D images per slice: " + postprocess.describe() if cells else "") + ".")
    n = 0
    for path, files in predict_files(loaded, inputs, outdir, postprocess=postprocess,
                                     batch_size=batch_size, overlap=overlap,
                                     probabilities_dtype=probabilities_dtype,
                                     progress=not no_progress, preview=preview,
                                     postprocess3d=cells, instances=instances,
                                     z_ratio=z_ratio):
        n += 1
        click.echo(f"{path}: {files.n_cells} cells -> {files.labels}")
    click.echo(f"Wrote predictions of {n} stack(s) to {outdir}.")
