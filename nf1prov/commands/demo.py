"""`nf1prov demo`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("demo")
def command() -> None:
    """Run the whole loop in a throwaway workspace."""
    raise UserError("`nf1prov demo` is not implemented yet.")
