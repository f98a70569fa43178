"""`nf1prov catalog`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("catalog")
def command() -> None:
    """Rebuild the README model catalogue from MLflow."""
    raise UserError("`nf1prov catalog` is not implemented yet.")
