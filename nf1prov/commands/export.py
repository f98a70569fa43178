"""`nf1prov export CODENAME --format bioimageio -o OUT.zip`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nf1prov.commands.common import open_store, tracking_uri_option


@click.command("export")
@click.argument("codename")
@click.option("--format", "fmt", type=click.Choice(["bioimageio"]), default="bioimageio",
              show_default=True, help="Package format: a bioimage.io model (rdf.yaml 0.5).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="OUT.zip", help="The zip to write (replaced only once complete).")
@click.option("--set", "overrides", multiple=True, metavar="export.KEY=VALUE",
              help="Override a key of the model's [export] config, e.g. --set "
                   "export.license=MIT (repeatable): how a model trained without one gets a "
                   "licence and citation.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Where the model's data is now, when it moved since training "
                                  "(the test tensors are cut from a validation stack).")
@click.option("--no-test", is_flag=True,
              help="Skip bioimage.io's test_model on the package (run by default: a package "
                   "that fails it is not written).")
@click.option("--run-id", default=None, help="Pick one run when the codename is ambiguous.")
@tracking_uri_option
def command(codename: str, fmt: str, output: Path, overrides: tuple[str, ...],
            data_root: Path | None, no_test: bool, run_id: str | None,
            tracking_uri: str | None) -> None:
    """Export a model as a bioimage.io model package.

    The zip holds the weights (PyTorch state dict with the architecture's source from the model's
    commit, and TorchScript), test tensors cut from the model's own validation data, a README
    from its catalogue entry, and its codename, commit, run ID and data manifest digest. The
    licence and citation come from the model's [export] config, or --set. The package is
    checked with bioimage.io's test_model before it is written. Needs the optional extra:
    pip install -e '.[export]' in the repository. See docs/sharing.md.

    Example: nf1prov export fearless-eel-256 -o fearless-eel-256.zip --set export.license=MIT
    """
    from nf1prov import tracking
    from nf1prov.errors import UserError
    from nf1prov.provenance import signals
    from nf1prov.provenance.resolve import resolve_model
    from nf1prov.share.bioimageio import export_model, require_bioimageio

    require_bioimageio()
    root, uri, client = open_store(tracking_uri, read_only=True)
    if root is None:
        raise UserError("nf1prov export must run inside the git repository that holds the "
                        "model commits: the package's architecture code comes from the model's "
                        "commit.")
    model = resolve_model(client, codename, run_id=run_id)
    if model.run.data.tags.get(tracking.KIND) != tracking.KIND_MODEL:
        raise UserError(f"{model.codename} is a --no-commit scratch run, not a model: a package "
                        "records the model's commit and tag, which it has not. Train it without "
                        "--no-commit, then export that model.")
    model = resolve_model(client, codename, run_id=run_id, repo_root=root)
    click.echo(f"Exporting {model.codename} (commit {model.sha}, run {model.run_id}) as a "
               f"{fmt} package...")
    try:
        # SIGTERM as an exception, so the half-built package and its temp folder are removed
        with signals.sigterm_as_exception():
            done = export_model(root, client, uri, model, output, overrides=overrides,
                                data_root=data_root, test=not no_test)
    except signals.Interrupted as exc:
        click.echo(f"nf1prov: export stopped ({exc.reason}); nothing was written.", err=True)
        sys.exit(exc.exit_code)
    size = done.test.input.shape
    verdict = (f"bioimage.io test_model: {done.status}" if done.status
               else "not tested (--no-test)")
    click.echo(f"Wrote {done.path} ({done.path.stat().st_size // 1024} KiB): weights "
               f"pytorch_state_dict + torchscript, test tensors {size[-2]}x{size[-1]} from "
               f"validation field {done.test.fov_id}; {verdict}.")
