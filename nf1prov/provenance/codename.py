"""Codenames: the run name MLflow generates (e.g. ``fearless-eel-256``), made unique.

A codename is unique when no other run in the tracking store carries it as its run name and no
git tag ``model/<codename>`` exists in the repository. A colliding (or malformed) name is
replaced by a fresh one from MLflow's own generator.
"""

from __future__ import annotations

from pathlib import Path

from nf1prov import tracking
from nf1prov.errors import UserError
from nf1prov.provenance import git

MAX_ATTEMPTS = 50


def generate() -> str:
    """A fresh name from MLflow's run-name generator (adjective-noun-number)."""
    from mlflow.utils.name_utils import _generate_random_name

    return _generate_random_name()


def is_taken(client, name: str, run_id: str, root: Path | None) -> bool:
    """True when ``name`` is unusable for run ``run_id``: malformed, used by another run in the
    store (any experiment), or already a ``model/<name>`` tag in the repository."""
    if not git.CODENAME_RE.match(name or ""):
        return True
    if any(run.info.run_id != run_id for run in tracking.runs_by_codename(client, name)):
        return True
    return root is not None and git.tag_sha(root, git.MODEL_TAG_PREFIX + name) is not None


def make_unique(client, run_id: str, root: Path | None) -> str:
    """Keep the run's current name when it is unique, else rename the run; returns the name."""
    name = client.get_run(run_id).info.run_name
    for _ in range(MAX_ATTEMPTS):
        if not is_taken(client, name, run_id, root):
            break
        name = generate()
    else:  # pragma: no cover - 50 collisions in a row would mean a broken generator
        raise UserError("Could not find an unused codename after 50 attempts; the tracking "
                        "store seems to hold an unusual number of runs. Try again.")
    if client.get_run(run_id).info.run_name != name:
        client.update_run(run_id, name=name)
    client.set_tag(run_id, tracking.CODENAME, name)
    return name
