"""`nf1prov checkout CODENAME [--worktree PATH]`."""

from __future__ import annotations

from pathlib import Path

import click

from nf1prov.commands.common import open_store, tracking_uri_option


@click.command("checkout")
@click.argument("codename")
@click.option("--worktree", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Create a separate git worktree at PATH instead of switching this tree.")
@click.option("--run-id", default=None, help="Pick one run when the codename is ambiguous.")
@click.option("--all-artifacts", is_flag=True,
              help="Also download overlays and checkpoints (default: model, config, manifest).")
@tracking_uri_option
def command(codename: str, worktree: Path | None, run_id: str | None, all_artifacts: bool,
            tracking_uri: str | None) -> None:
    """Check out a model's code and weights by codename.

    CODENAME may also be a run ID or a model/<codename> tag. Switches this work tree to the
    model commit (detached HEAD) only when it is clean; with --worktree PATH the current tree is
    left alone. Weights, config and manifest go to .nf1prov/models/<codename>/. A --no-commit
    run trained on a dirty tree needs --worktree: its code was the base commit plus its logged
    git/uncommitted.diff, which the new worktree gets applied (or checkout refuses, saying why).

    Example: nf1prov checkout fearless-eel-256 --worktree ../fearless-eel-256
    """
    from nf1prov.errors import UserError
    from nf1prov.provenance.checkout import DEFAULT_ARTIFACTS, checkout_model, describe
    from nf1prov.provenance.resolve import resolve_model

    root, uri, client = open_store(tracking_uri, read_only=True)
    if root is None:
        raise UserError("nf1prov checkout must run inside the git repository that holds the "
                        "model commits.")
    model = resolve_model(client, codename, run_id=run_id, repo_root=root)
    checked_out = checkout_model(root, client, model, worktree=worktree,
                                 roots=None if all_artifacts else DEFAULT_ARTIFACTS)
    click.echo(describe(model, checked_out, root, uri))
