"""`nf1prov train`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("train")
def command() -> None:
    """Train a model, commit its code and tag its MLflow run."""
    raise UserError("`nf1prov train` is not implemented yet.")
