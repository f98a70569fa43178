"""The `nf1prov` command line: one click group; each verb lives in its own module under
`nf1prov/commands/`. Errors a user can fix arrive as `Nf1provError` and leave as a one-paragraph
message with exit code 2 (1 for a failed check), never as a traceback.
"""

from __future__ import annotations

import sys

import click

from nf1prov import __version__
from nf1prov.commands import (
    catalog,
    checkout,
    demo,
    demo_data,
    evaluate,
    export,
    list_runs,
    note,
    predict,
    register,
    reproduce,
    search_join,
    show,
    sync,
    train,
)
from nf1prov.errors import Nf1provError, disk_full, quiet_disk_full_logging


class Nf1provGroup(click.Group):
    """Turns an Nf1provError from any verb into its message and exit code, so the same
    behaviour holds for `nf1prov`, `python -m nf1prov` and click's test runner. A full disk
    met anywhere (ENOSPC, sqlite's "database or disk is full") becomes such an error too."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Nf1provError as exc:
            click.echo(f"nf1prov: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:
            if disk_full(exc) is None:
                raise
            full = disk_full(exc, default_store_database())
            click.echo(f"nf1prov: error: {full}", err=True)
            ctx.exit(full.exit_code)


def default_store_database():
    """The sqlite file of $MLFLOW_TRACKING_URI or of this repository's default store (what a
    full-disk message names when sqlite's error names no file), else None."""
    from nf1prov import git, tracking

    try:
        return tracking.sqlite_path(tracking.resolve_tracking_uri(None, git.repo_root(".")))
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return None


@click.group(cls=Nf1provGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nf1prov")
def cli() -> None:
    """Train NF1 organoid cell segmenters; one git commit and one MLflow run per model.

    The MLflow store is --tracking-uri, else $MLFLOW_TRACKING_URI, else
    sqlite:///<repo root>/mlflow.db.
    """
    quiet_disk_full_logging()  # here, so that click's test runner gets it too


for module in (demo_data, train, catalog, checkout, reproduce, list_runs, show, note, predict,
               evaluate, export, register, sync, search_join, demo):
    cli.add_command(module.command)


def quiet_mlflow() -> None:
    """MLflow's per-file download bars and schema-creation INFO lines drown our own output."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    quiet_mlflow()
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting; an
        # Nf1provError has become its message and exit code in Nf1provGroup.invoke.
        code = cli.main(args=argv, prog_name="nf1prov", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("nf1prov: aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
