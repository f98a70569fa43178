"""`nf1prov demo-data`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("demo-data")
def command() -> None:
    """Write a synthetic NF1 organoid dataset in the upstream layout."""
    raise UserError("`nf1prov demo-data` is not implemented yet.")
