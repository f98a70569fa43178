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


def locate_store(tracking_uri: str | None, start: Path | str = "."):
    """(repo_root or None, resolved tracking URI) for a verb that uses the store."""
    from nf1prov import git, tracking
    from nf1prov.errors import UserError

    try:
        root = git.repo_root(start)
    except UserError:
        root = None
    return root, tracking.resolve_tracking_uri(tracking_uri, root)


def open_store(tracking_uri: str | None, start: Path | str = ".", read_only: bool = False):
    """(repo_root or None, resolved URI, checked MlflowClient) for a verb that uses the store;
    ``read_only``: the verb only reads it, so a store this user cannot write will do."""
    from nf1prov import tracking

    root, uri = locate_store(tracking_uri, start)
    return root, uri, tracking.client(uri, read_only=read_only)


def read_store(tracking_uri: str | None, answer, start: Path | str = "."):
    """(repo_root or None, resolved URI, ``answer(root, uri, store)``) for a verb that only
    reads the store: ``store`` is a `tracking.reader` (MLflow not imported) where there is one;
    else, or when that read cannot go on (`store_read.Unreadable`), a checked read-only
    MlflowClient. ``answer`` computes everything the verb prints and prints nothing, so that
    it can start over through MLflow."""
    from nf1prov import store_read, tracking

    root, uri = locate_store(tracking_uri, start)
    store = tracking.reader(uri)
    if store is not None:
        try:
            return root, uri, answer(root, uri, store)
        except store_read.Unreadable:
            pass
    return root, uri, answer(root, uri, tracking.client(uri, read_only=True))


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
