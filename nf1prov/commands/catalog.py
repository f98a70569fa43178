"""`nf1prov catalog`: rebuild the README model catalogue from MLflow (DESIGN 3.4)."""

from __future__ import annotations

from pathlib import Path

import click

from nf1prov.commands.common import tracking_uri_option
from nf1prov.errors import CheckFailed, UserError


def _readme_and_root(readme: str | None) -> tuple[Path, Path | None]:
    """(README path, git repo root or None); the default README is <repo root>/README.md."""
    from nf1prov.provenance import git

    if readme is None:
        root = git.repo_root(".")
        return root / "README.md", root
    path = Path(readme).resolve()
    if path.is_dir():
        raise UserError(f"--readme {readme}: is a directory; pass the README file itself.")
    if not path.parent.is_dir():
        raise UserError(f"--readme {readme}: folder {path.parent} does not exist.")
    try:
        return path, git.repo_root(path.parent)
    except UserError:
        return path, None


def _commit(root: Path | None, readme: Path) -> str | None:
    """Commit README.md alone (other staged changes stay staged); None when nothing to commit."""
    from nf1prov.provenance import git
    from nf1prov.provenance.commit import commit_lock

    if root is None:
        raise UserError(f"--commit: {readme} is not inside a git repository.")
    rel = readme.relative_to(root.resolve()) if readme.is_relative_to(root.resolve()) else None
    if rel is None:
        raise UserError(f"--commit: {readme} is outside the repository {root}.")
    with commit_lock(root):  # never interleave with a training's stage + commit + tag
        return git.commit_paths(root, [str(rel)], "Update model catalogue")


@click.command("catalog")
@click.option("--readme", type=click.Path(dir_okay=True), default=None, metavar="PATH",
              help="README to update (default: <repo root>/README.md).")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 with a diff when the README is out of date.")
@click.option("--commit", "do_commit", is_flag=True,
              help="Commit README.md alone ('Update model catalogue') when it differs "
                   "from HEAD; other staged changes stay staged.")
@click.option("--template", "template_dir", type=click.Path(), default=None, metavar="DIR",
              help="Templates folder holding catalog.md.j2 (default: <repo>/templates, then "
                   "the packaged copy).")
@click.option("--import-history", is_flag=True,
              help="First tag runs named by pre-nf1prov model commits (any branch) as models.")
@tracking_uri_option
def command(readme, check, do_commit, template_dir, import_history, tracking_uri) -> None:
    """Rebuild the README model catalogue from MLflow.

    The catalogue goes between <!-- nf1prov:catalog:begin --> and <!-- nf1prov:catalog:end -->
    (added under '## Model Descriptions' when missing); the rest of the README is kept byte
    for byte.
    """
    from nf1prov import catalog
    from nf1prov.commands.common import open_store

    if check and (do_commit or import_history):
        raise UserError("--check only reads: use it without --commit and --import-history.")
    path, root = _readme_and_root(readme)
    _, uri, client = open_store(tracking_uri, path.parent)
    if import_history:
        if root is None:
            raise UserError(f"--import-history reads git history: {path} is not in a repository.")
        report = catalog.import_history(root, client)
        for line in report.lines():
            click.echo(line)
        click.echo(f"History: {len(report.tagged)} tagged, {len(report.skipped)} already "
                   f"tagged, {len(report.unmatched)} unmatched.")
    runs = catalog.fetch_runs(client)
    result = catalog.rebuild(path, runs, tracking_uri=uri, repo_root=root,
                             template_dir=Path(template_dir) if template_dir else None)
    if check:
        if result.changed:
            click.echo(catalog.unified_diff(result.old, result.new, path.name), nl=False)
            raise CheckFailed(f"{path} is out of date with MLflow ({result.model_count} models): "
                              "run `nf1prov catalog` and commit README.md.")
        click.echo(f"{path}: catalogue up to date ({result.model_count} models).")
        return
    if result.changed:
        catalog.write_atomic(path, result.new)
    click.echo(f"{path}: {result.model_count} models, "
               f"{'written' if result.changed else 'unchanged'}.")
    if do_commit:
        sha = _commit(root, path)
        click.echo(f"Committed README.md as {sha}." if sha else "Nothing to commit.")
