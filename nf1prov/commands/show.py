"""`nf1prov show`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("show")
def command() -> None:
    """Show one model's tags, params, metrics and commit."""
    raise UserError("`nf1prov show` is not implemented yet.")
