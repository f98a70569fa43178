"""`nf1prov catalog`: rebuild the README model catalogue from MLflow (DESIGN 3.4)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from nf1prov.commands.common import tracking_uri_option
from nf1prov.errors import CheckFailed, UserError
from nf1prov.tracking import gc_paused


def _models(count: int) -> str:
    return f"{count} model" + ("" if count == 1 else "s")


def _readme_and_root(readme: str | None) -> tuple[Path, Path | None]:
    """(README path, git repo root or None); the default README is <repo root>/README.md."""
    from nf1prov import git

    if readme is None:
        root = git.repo_root(".")
        return root / "README.md", root
    path = Path(readme).absolute()
    if path.parent.is_dir():  # the folder resolved (no `..` in what is printed), not the file:
        path = path.parent.resolve() / path.name  # a symlinked README stays a link
    if path.is_dir():
        raise UserError(f"--readme {readme}: is a directory; pass the README file itself.")
    if not path.parent.is_dir():
        raise UserError(f"--readme {readme}: folder {path.parent} does not exist.")
    try:
        return path, git.repo_root(path.parent)
    except UserError:
        return path, None


def _point_out_nearer_readme(root: Path, path: Path) -> None:
    """From a sub-project's folder (a monorepo), say that its own README is not the one meant
    by default, and how to pick it."""
    from nf1prov.catalog import repository

    nearer = repository.nearer_readme(root, Path.cwd(), path)
    if nearer is not None:
        click.echo(f"nf1prov catalog: note: the catalogue goes into the repository's top "
                   f"README {path}, not {nearer}; to use that one, run `nf1prov catalog "
                   f"--readme {os.path.relpath(nearer)}`.", err=True)


@click.command("catalog")
@click.option("--readme", type=click.Path(dir_okay=True), default=None, metavar="PATH",
              help="README to update (default: <repo root>/README.md).")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 with a diff when the README is out of date.")
@click.option("--commit", "do_commit", is_flag=True,
              help="Commit the catalogue change alone ('Update model catalogue') when it "
                   "differs from HEAD; other edits to the README stay uncommitted and other "
                   "staged changes stay staged.")
@click.option("--force", is_flag=True,
              help="Overwrite uncommitted hand edits between the markers (refused otherwise).")
@click.option("--template", "template_dir", type=click.Path(), default=None, metavar="DIR",
              help="Templates folder holding catalog.md.j2 (default: <repo>/templates, then "
                   "the packaged copy).")
@click.option("--import-history", is_flag=True,
              help="First tag runs named by pre-nf1prov model commits (any branch) as models.")
@tracking_uri_option
@gc_paused()  # a short command that builds many objects (MLflow's imports, every model's
# values): the cyclic collector's scans of them would be about a tenth of its time
def command(readme, check, do_commit, force, template_dir, import_history, tracking_uri) -> None:
    """Rebuild the README model catalogue from MLflow.

    The catalogue goes between the lines <!-- nf1prov:catalog:begin --> and
    <!-- nf1prov:catalog:end --> (markers quoted in text or fenced code do not count; added
    under '## Model Descriptions' when missing); the rest of the README is kept byte for byte.
    Uncommitted hand edits between the markers are refused unless --force.
    """
    from nf1prov import catalog
    from nf1prov.catalog import repository
    from nf1prov.commands.common import open_store, read_store

    if check and (do_commit or import_history or force):
        raise UserError("--check only reads: use it without --commit, --force and "
                        "--import-history.")
    from nf1prov.provenance.commit import MODEL_COMMIT_ENV

    model_commit = os.environ.get(MODEL_COMMIT_ENV)
    if check and model_commit:
        # A model commit cannot hold its own catalogue entry (the entry names the commit), so
        # the documented pre-commit hook must not refuse it; every other commit is checked.
        click.echo(f"nf1prov catalog --check: skipped for the model commit of {model_commit}.")
        return
    path, root = _readme_and_root(readme)
    repository.refuse_unsafe_link(path, root)
    if readme is None and root is not None:
        _point_out_nearer_readme(root, path)
    if import_history:  # the only option that writes to the store
        if root is None:
            raise UserError(f"--import-history reads git history: {path} is not in a repository.")
        report = catalog.import_history(root, open_store(tracking_uri, path.parent)[2])
        for line in report.lines():
            click.echo(line)
        click.echo(f"History: {len(report.tagged)} tagged, {len(report.skipped)} already "
                   f"tagged, {len(report.unmatched)} unmatched.")
    from nf1prov.share import registry

    # the catalogue is rebuilt from a store this user cannot write too, MLflow not imported
    # where the store is read directly (`read_store`)
    _, uri, (runs, registered) = read_store(
        tracking_uri, lambda _root, _uri, store: (catalog.fetch_runs(store),
                                                  registry.labels_by_run(store)), path.parent)
    result = catalog.rebuild(path, runs, tracking_uri=uri, repo_root=root,
                             template_dir=Path(template_dir) if template_dir else None,
                             registered=registered)
    if check:
        if result.changed:
            click.echo(catalog.unified_diff(result.old, result.new, path.name), nl=False)
            raise CheckFailed(f"{path} is out of date with MLflow ({_models(result.model_count)}): "
                              "run `nf1prov catalog` and commit README.md.")
        click.echo(f"{path}: catalogue up to date ({_models(result.model_count)}).")
        return
    if not force:
        repository.refuse_hand_edits(result, root)
    if do_commit:
        repository.check_commit(root, result)
    if result.changed:
        catalog.write_atomic(path, result.new)
        repository.remember_written(root, path, result.new_block)
    click.echo(f"{path}: {_models(result.model_count)}, "
               f"{'written' if result.changed else 'unchanged'}.")
    if do_commit:
        sha = repository.commit_catalogue(root, result)
        click.echo(f"Committed {path.name} as {sha} (the catalogue change only)." if sha
                   else "Nothing to commit.")
