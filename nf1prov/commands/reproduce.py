"""`nf1prov reproduce`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("reproduce")
def command() -> None:
    """Retrain a model from its own commit and compare metrics."""
    raise UserError("`nf1prov reproduce` is not implemented yet.")
