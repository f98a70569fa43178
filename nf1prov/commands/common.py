"""Options and helpers shared by several verbs."""

from __future__ import annotations

from pathlib import Path

import click

tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    metavar="URI",
    help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db).",
)


def open_store(tracking_uri: str | None, start: Path | str = "."):
    """(repo_root or None, resolved URI, checked MlflowClient) for a verb that reads the store."""
    from nf1prov import tracking
    from nf1prov.errors import UserError
    from nf1prov.provenance import git

    try:
        root = git.repo_root(start)
    except UserError:
        root = None
    uri = tracking.resolve_tracking_uri(tracking_uri, root)
    return root, uri, tracking.client(uri)
