"""Options and helpers shared by several verbs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    metavar="URI",
    help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db).",
)


def open_store(tracking_uri: str | None, start: Path | str = ".", read_only: bool = False):
    """(repo_root or None, resolved URI, checked MlflowClient) for a verb that uses the store;
    ``read_only``: the verb only reads it, so a store this user cannot write will do."""
    from nf1prov import git, tracking
    from nf1prov.errors import UserError

    try:
        root = git.repo_root(start)
    except UserError:
        root = None
    uri = tracking.resolve_tracking_uri(tracking_uri, root)
    return root, uri, tracking.client(uri, read_only=read_only)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to standard output, by this process and the processes it starts,
    to standard error until the block ends, so that a ``--json`` verb's standard output holds its
    JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
