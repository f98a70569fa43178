"""`nf1prov catalog --import-history`: backfill the nf1prov tags on runs trained before nf1prov,
from the upstream commit subjects (`Model run codename: X Run ID: Y Experiment ID: Z` and older
forms). It writes MLflow tags from git history.
"""


from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nf1prov import tracking

# --- --import-history -------------------------------------------------------------------------

SUBJECT_RE = re.compile(
    r"(?:model\s*run\s*)?"
    r"(?:code\s*name\s*:\s*(?P<codename>\S+?)\s*,?\s*)?"
    r"run\s*id\s*:\s*(?P<run_id>[0-9a-f]{32})\b\s*,?\s*"
    r"experiment\s*id\s*:\s*(?P<experiment_id>[\w-]+)",
    re.IGNORECASE,
)


def parse_subject(subject: str) -> dict | None:
    """``{"codename", "run_id", "experiment_id"}`` of a model commit subject, else None."""
    match = SUBJECT_RE.search(subject)
    return match.groupdict() if match else None


@dataclass
class ImportReport:
    tagged: list[tuple[str, str, str | None]] = field(default_factory=list)  # sha, run, codename
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # sha, run, why
    unmatched: list[tuple[str, str, str]] = field(default_factory=list)  # sha, run, why

    def lines(self) -> list[str]:
        out = [f"tagged {run} (commit {sha}){f' as {name}' if name else ''}"
               for sha, run, name in self.tagged]
        out += [f"skipped {run} (commit {sha}): {why}" for sha, run, why in self.skipped]
        out += [f"unmatched: commit {sha} run {run}: {why}" for sha, run, why in self.unmatched]
        return out


def model_commits(root: Path) -> list[tuple[str, dict]]:
    """(sha, parsed subject) of every model commit on any ref, oldest first, one per run ID.

    A run ID named by several commits (a rebased or cherry-picked copy) keeps the oldest.
    """
    from nf1prov import git

    found: dict[str, tuple[str, dict]] = {}
    rows = sorted(git.log_subjects(root, all_refs=True), key=lambda r: r[2])
    for sha, subject, _ in rows:
        parsed = parse_subject(subject)
        if parsed and parsed["run_id"] not in found:
            found[parsed["run_id"]] = (sha, parsed)
    return list(found.values())


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def backfill_tags(root: Path, run, sha: str) -> dict[str, str]:
    """The nf1prov tags a pre-nf1prov model run gets from its commit."""
    from nf1prov import git

    tags = {tracking.GIT_COMMIT: sha, tracking.KIND: tracking.KIND_MODEL}
    name = run.info.run_name or ""
    if git.CODENAME_RE.match(name):
        tags[tracking.CODENAME] = name
        if git.tag_sha(root, git.model_tag(name)) is not None:
            tags[tracking.GIT_TAG] = git.model_tag(name)
    return tags


def import_history(root: Path, client) -> ImportReport:
    """Tag runs named by model commits on any branch; never touch a run nf1prov already tags."""
    from mlflow.entities import RunTag

    report = ImportReport()
    for sha, parsed in model_commits(root):
        run_id = parsed["run_id"]
        run = _get_run(client, run_id)
        if run is None:
            report.unmatched.append((sha, run_id, "no such run in the tracking store"))
            continue
        if run.data.tags.get(tracking.KIND):
            report.skipped.append((sha, run_id, "already has nf1prov tags"))
            continue
        tags = backfill_tags(root, run, sha)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        report.tagged.append((sha, run_id, tags.get(tracking.CODENAME)))
    return report
