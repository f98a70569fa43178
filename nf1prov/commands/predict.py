"""`nf1prov predict`."""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("predict")
def command() -> None:
    """Segment z-stacks with a trained model."""
    raise UserError("`nf1prov predict` is not implemented yet.")
