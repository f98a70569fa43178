"""`nf1prov reproduce CODENAME [--data-root DIR]`."""

from __future__ import annotations

from pathlib import Path

import click

from nf1prov.commands.common import open_store, tracking_uri_option


@click.command("reproduce")
@click.argument("codename")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="This machine's copy of the training data (default: the folder the original "
                   "run read). Its content hashes must match the original's manifest.")
@click.option("--run-id", default=None, help="Pick one run when the codename is ambiguous.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a logged config value, e.g. --set train.device=cpu (the metrics "
                   "may then differ).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Largest |difference| of a metric still counted as reproduced.")
@click.option("--worktree", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Retrain in a worktree at PATH and keep it (default: a temporary one, "
                   "removed afterwards).")
@tracking_uri_option
def command(codename, data_root, run_id, overrides, tolerance, worktree, tracking_uri) -> None:
    """Retrain a model from its own commit and config; compare the metrics.

    Checks the data against the original content hashes, retrains in a worktree at the model's
    commit (the model's code, not today's; for a --no-commit run on a dirty tree, the base commit
    plus its logged diff, or a refusal), logs a new run tagged nf1prov.reproduces=<run id>
    and prints original vs reproduced metrics. Exit 0 when they agree within --tolerance,
    1 when they differ.

    Example: nf1prov reproduce fearless-eel-256 --data-root /data/nf1
    """
    from nf1prov.errors import UserError
    from nf1prov.provenance.reproduce import check_identical, format_comparison, reproduce
    from nf1prov.provenance.resolve import resolve_model

    root, uri, client = open_store(tracking_uri)
    if root is None:
        raise UserError("nf1prov reproduce must run inside the git repository that holds the "
                        "model commits.")
    model = resolve_model(client, codename, run_id=run_id, repo_root=root)
    result = reproduce(root, client, uri, model, data_root=data_root, overrides=overrides,
                       worktree=worktree, echo=click.echo)
    click.echo(format_comparison(result))
    check_identical(result, tolerance)
    click.echo(f"Reproduced: every metric of {model.codename} matches"
               + (" exactly." if result.identical else f" within {tolerance:g}."))
