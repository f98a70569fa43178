"""`nf1prov register CODENAME [--alias NAME]`."""

from __future__ import annotations

import click

from nf1prov.commands.common import open_store, tracking_uri_option


@click.command("register")
@click.argument("codename")
@click.option("--alias", default=None, metavar="NAME",
              help="Move this alias (e.g. champion) to the model's version; predict and "
                   "evaluate then accept models:/<experiment>@NAME.")
@click.option("--run-id", default=None, help="Pick one run when the codename is ambiguous.")
@tracking_uri_option
def command(codename: str, alias: str | None, run_id: str | None,
            tracking_uri: str | None) -> None:
    """Register a model in the MLflow Model Registry.

    Each experiment has one registered model, named after it; each nf1prov model is one version
    of it (tags nf1prov.codename, nf1prov.commit), registered once. --alias moves an alias to
    that version. CODENAME may also be a run ID or a models:/ URI.

    Example: nf1prov register fearless-eel-256 --alias champion
    """
    from nf1prov.provenance.resolve import resolve_model
    from nf1prov.share import registry

    if alias is not None:
        registry.check_alias(alias)
    _, _, client = open_store(tracking_uri)
    model = resolve_model(client, codename, run_id=run_id)
    registration = registry.register(client, model, alias=alias)
    click.echo(f"Model {model.codename} (run {model.run_id}) {registration.describe()}.")
