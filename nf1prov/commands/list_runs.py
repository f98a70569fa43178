"""`nf1prov list`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("list")
def command() -> None:
    """List models with status, SHA and best validation Dice."""
    raise UserError("`nf1prov list` is not implemented yet.")
