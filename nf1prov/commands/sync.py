"""`nf1prov sync`: log what trainings could not log while the tracking store was away.

A training whose store stopped answering keeps its unlogged metrics, params, tags, artifacts and
the run's end in `.nf1prov/outbox/<run_id>/` (`nf1prov.outbox`); this sends them, in order, to
the store each was meant for (or --tracking-uri), and removes each spool once it has arrived.
"""

from __future__ import annotations

import click

from nf1prov.errors import UserError


@click.command("sync")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Send everything to this store instead of the one each training logged to "
                   "(e.g. the server moved). $MLFLOW_TRACKING_URI is not used: a spool knows "
                   "its store.")
def command(tracking_uri) -> None:
    """Log what trainings could not log while the tracking store was away."""
    from nf1prov import git, outbox, tracking
    from nf1prov.provenance.preflight import CACHE_DIR

    root = git.repo_root(".")
    spools = outbox.saved(outbox.outbox_root(root / CACHE_DIR))
    if not spools:
        click.echo(f"Nothing to sync: no training in {root} has logging waiting.")
        return
    clients: dict[str, object] = {}
    for spool in spools:
        uri = tracking_uri or outbox.saved_store(spool) or tracking.resolve_tracking_uri(None, root)
        what = outbox.describe_saved(spool)
        try:
            if uri not in clients:
                clients[uri] = tracking.client(uri)
            outbox.replay(clients[uri], spool)
        except Exception as exc:
            if not (isinstance(exc, ConnectionError) or outbox.is_unreachable(exc)):
                raise
            reason = str(exc) if isinstance(exc, UserError) else f"{uri}: {exc}"
            raise UserError(f"{reason} The logging of run {spool.name} ({what}) stays in "
                            f"{spool}: run `nf1prov sync` again once the store answers "
                            "(--tracking-uri URI if it has moved).") from None
        click.echo(f"run {spool.name}: logged {what} to {uri}")
