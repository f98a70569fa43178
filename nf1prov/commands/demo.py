"""`nf1prov demo [PATH]`: the whole loop in a throwaway workspace (logic in `nf1prov.demo`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.argument("path", type=click.Path(path_type=Path), default="demo-workspace",
                required=False)
@click.option("--fast", is_flag=True,
              help="Tiny data and a tiny network (1 epoch, width 4): every step runs, faster, "
                   "and the models learn next to nothing. A quick check, for tests.")
@click.option("--replace", is_flag=True,
              help="Delete an earlier demo workspace at PATH first (only a folder the demo "
                   "made itself, marked by its .nf1prov-demo file).")
def command(path: Path, fast: bool, replace: bool) -> None:
    """Run the whole loop in a throwaway workspace.

    Creates a fresh git repository at PATH (default ./demo-workspace) with a copy of models/,
    templates/ and configs/, then runs, each as a real `nf1prov` command inside it: demo-data,
    train (twice, with a config change between), list, evaluate --baseline, catalog and
    checkout --worktree. The workspace has its own mlflow.db: your repository and tracking
    server are never touched.

    Example: nf1prov demo --replace
    """
    from nf1prov.demo import run_demo

    run_demo(path, fast=fast, replace=replace, echo=click.echo)
