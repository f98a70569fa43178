"""`nf1prov note`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("note")
def command() -> None:
    """Append a note to a model (shown in the catalogue)."""
    raise UserError("`nf1prov note` is not implemented yet.")
