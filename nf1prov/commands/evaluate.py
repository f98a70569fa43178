"""`nf1prov evaluate`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("evaluate")
def command() -> None:
    """Evaluate a model on holdout patients against a classical baseline."""
    raise UserError("`nf1prov evaluate` is not implemented yet.")
