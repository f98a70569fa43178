"""`nf1prov checkout`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("checkout")
def command() -> None:
    """Check out a model's code and weights by codename."""
    raise UserError("`nf1prov checkout` is not implemented yet.")
